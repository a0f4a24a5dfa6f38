"""Training-free linear repair against plain removal and LoRA healing, side by side.

For each built-in model and removal ratio, five variants of the same removal
budget, each measured on the same held-out text and questions:

- plain BI: ShortGPT's lowest-BI layers removed;
- BI + linear: the same layers, each removed gap replaced by a least-squares
  linear map folded into the kept weights (``prune(..., recovery="linear")``);
- repair-aware + linear: layers chosen greedily by the error left after the
  maps (``linear_residual``), then the same repair;
- BI + LoRA: LoRA healing for about ``--lora-budget`` seconds (r=8 on every
  linear layer, 2 x 128-token batches, lr 1e-3: the settings and budget of
  ``bench_healing.py``);
- BI + linear + LoRA: the repair, then the same healing.

Measures: held-out perplexity (Othello and Twelfth Night, never used for
calibration or training; 4,096 tokens in 256-token windows), BIG-bench
general_knowledge accuracy (70 questions), and the cost of each variant in
CPU seconds (process time, all threads) and wall seconds: selection, fit and
training, not evaluation. Calibration and training use the packaged
calibration plays.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from harness import Seconds, timing, write_json

from shortgpt_hf import heal, load_builtin, multiple_choice, perplexity, prune, score_layers
from shortgpt_hf.layers import find_decoder_layers
from shortgpt_hf.pruning import restored_after
from shortgpt_hf.selection import removal_count
from shortgpt_hf.texts import calibration_texts, heldout_texts

TRAIN = dict(lr=1e-3, seq_len=128, batch_size=2, teacher=None, progress=False)  # cross-entropy, as recorded


def plus(*costs: Seconds) -> dict:
    """CPU and wall seconds of several steps together, as reported."""
    return {"cpu_s": round(sum(c.cpu for c in costs), 1), "wall_s": round(sum(c.wall for c in costs), 1)}


def bench_model(
    name: str,
    args: argparse.Namespace,
    ratios: list[float],
    lora_ratios: list[float],
    all_calibration: list[float],
    wanted: Callable[[str], bool],
    held_out: list[str],
) -> dict:
    """Every wanted variant at every ratio on one built-in model: its dense report with a row per variant."""
    model, tok = load_builtin(name, dtype=torch.float32)
    model.eval()

    def measure(m) -> dict:
        mc = multiple_choice(m, tok, "general_knowledge")
        return {
            "perplexity": round(perplexity(m, tok, held_out, seq_len=256, max_tokens=4096), 2),
            "mc_acc": round(mc["acc"], 3),
        }

    n_layers = len(find_decoder_layers(model).layers)
    counts = {r: removal_count(n_layers, ratio=r) for r in ratios}
    selection: dict[str, Seconds] = {}
    with timing() as selection["bi"]:
        bi = score_layers(model, tokenizer=tok, max_tokens=args.selection_tokens, progress=False)
    aware = None
    if wanted("repair-aware + linear"):
        with timing() as selection["repair_aware"]:
            aware = score_layers(
                model,
                tokenizer=tok,
                metric="linear_residual",
                max_tokens=args.selection_tokens,
                max_layers=max(counts.values()),
                progress=False,
            )
    report = {
        "layers": n_layers,
        "dense": measure(model),
        "selection_cost": {k: plus(v) for k, v in selection.items()},
        "ratios": {},
    }
    print(name, report, flush=True)

    def run(
        label: str,
        scores,
        n: int,
        repair: bool,
        lora: bool,
        steps: int | None = None,
        max_tokens: int | None = args.calibration_tokens,
    ) -> dict:
        spent: list[Seconds] = []
        with restored_after(model):
            with timing() as fit:
                repair_options = dict(
                    recovery="linear", tokenizer=tok, recovery_options=dict(max_tokens=max_tokens, progress=False)
                )
                prune(model, n_layers=n, scores=scores, **(repair_options if repair else {}))
            spent.append(fit)
            row = {"layers": sorted(scores.lowest(n))}
            target = model
            if lora:
                trainable = {p: p.requires_grad for p in model.parameters()}
                with timing() as train:
                    target = heal(model, calibration_texts(), tokenizer=tok, steps=steps, **TRAIN)
                spent.append(train)
                row["lora_steps"] = steps
            row.update(measure(target))
            if lora:
                for p, flag in trainable.items():
                    p.requires_grad_(flag)
        row["cost"] = plus(selection["bi" if scores is bi else "repair_aware"], *spent)
        print(f"  {n} layers  {label:26s} {row}", flush=True)
        return row

    lora_steps = args.lora_steps
    for ratio, n in counts.items():
        rows = {}
        if wanted("plain BI"):
            rows["plain BI"] = run("plain BI", bi, n, False, False)
        if wanted("BI + linear"):
            rows["BI + linear"] = run("BI + linear", bi, n, True, False)
        if ratio in all_calibration and wanted("BI + linear, all calibration"):
            rows["BI + linear, all calibration"] = run(
                "BI + linear, all calibration", bi, n, True, False, max_tokens=None
            )
        if wanted("repair-aware + linear"):
            rows["repair-aware + linear"] = run("repair-aware + linear", aware, n, True, False)
        if ratio in lora_ratios and (wanted("BI + LoRA") or wanted("BI + linear + LoRA")):
            if lora_steps is None:  # steps that fill the budget, from a short timing probe on this model
                with restored_after(model):
                    prune(model, n_layers=n, scores=bi)
                    trainable = {p: p.requires_grad for p in model.parameters()}
                    with timing() as probe:
                        heal(model, calibration_texts(), tokenizer=tok, steps=5, **TRAIN)
                    lora_steps = max(5, int(args.lora_budget / (probe.wall / 5)))
                    for p, flag in trainable.items():
                        p.requires_grad_(flag)
            if wanted("BI + LoRA"):
                rows["BI + LoRA"] = run("BI + LoRA", bi, n, False, True, lora_steps)
            if wanted("BI + linear + LoRA"):
                rows["BI + linear + LoRA"] = run("BI + linear + LoRA", bi, n, True, True, lora_steps)
        report["ratios"][str(ratio)] = {"removed": n, "variants": rows}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--ratios", default="0.1,0.25,0.3")
    parser.add_argument("--lora-ratios", default=None, help="ratios that also get the two LoRA variants (default: all)")
    parser.add_argument(
        "--lora-budget", type=float, default=600, help="seconds of LoRA training per variant (timing probe)"
    )
    parser.add_argument(
        "--lora-steps",
        type=int,
        default=None,
        help="fixed LoRA steps instead of the timing probe (353 = 600 s on the 2-core machine)",
    )
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants to run (default: all)")
    parser.add_argument("--calibration-tokens", type=int, default=32768, help="tokens the linear maps are fitted on")
    parser.add_argument(
        "--selection-tokens", type=int, default=8192, help="tokens for BI and the repair-aware selection"
    )
    parser.add_argument(
        "--all-calibration-ratios",
        default="0.25",
        help="ratios that also get BI + linear fitted on every calibration token",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    lora_ratios = ratios if args.lora_ratios is None else [float(r) for r in args.lora_ratios.split(",") if r]
    all_calibration = [float(r) for r in args.all_calibration_ratios.split(",") if r]
    chosen = None if args.variants is None else {v.strip() for v in args.variants.split(",")}

    def wanted(variant: str) -> bool:
        return chosen is None or variant in chosen

    held_out = heldout_texts()
    results = {"settings": vars(args) | {"json": str(args.json)}, "models": {}}

    for name in args.models.split(","):
        results["models"][name] = bench_model(name, args, ratios, lora_ratios, all_calibration, wanted, held_out)
        if args.json:
            write_json(args.json, results)

    for name, report in results["models"].items():
        dense = report["dense"]
        print(
            f"\n{name} ({report['layers']} layers): dense perplexity {dense['perplexity']}, "
            f"general_knowledge {dense['mc_acc']}"
        )
        print("| removed | variant | perplexity | x dense | general_knowledge acc | CPU s | wall s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for ratio, block in report["ratios"].items():
            for variant, row in block["variants"].items():
                print(
                    f"| {block['removed']} ({float(ratio):.0%}) | {variant} | {row['perplexity']} "
                    f"| {row['perplexity'] / dense['perplexity']:.2f} | {row['mc_acc']} "
                    f"| {row['cost']['cpu_s']:.0f} | {row['cost']['wall_s']:.0f} |"
                )


if __name__ == "__main__":
    main()
