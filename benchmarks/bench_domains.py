"""Which training-free repair generalizes, measured on the held-out suite and against the dense model.

SmolLM2-135M (or ``--model gemma3-270m``) with 25% of its layers removed by
Block Influence, each variant measured against the dense model on the
suite's five genres (``evaluate(..., ["suite", "mc"], reference=dense)``:
perplexity ratio, KL(dense || pruned) per token, top-1 agreement, about 4,000
tokens per genre in 256-token windows), with the mean over the two genres the
default calibration never reads (technical, legal: the *unseen* mean), and
zero-shot multiple-choice accuracy on the packaged BIG-bench tasks:

- plain removal;
- least squares (``linear``) calibrated on the plays alone (the old default);
- least squares on the default mixture (plays + Wikipedia + stdlib code);
- the same with ``shrinkage="auto"`` (pulled toward plain removal by the
  amount that leaves the least error on a held-out fifth of its batches);
- ReplaceMe's cosine-distance objective (``cosine``) on the mixture;
- least squares on the mixture for the layers the repair-aware metric
  (``linear_residual``, on the mixture) removes instead of BI's.

Every repair uses the same removal and ``--tokens`` calibration tokens. Also
reports whether Block Influence on the mixture picks other layers than on the
plays, and, when it does, plain removal and the mixture's least squares with
the plays' choice.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import command_line, machine_info, timing, write_json

from shortgpt_hf import evaluate, load_builtin, prune, score_layers
from shortgpt_hf.domains import DOMAINS
from shortgpt_hf.multiple_choice import PACKAGED_TASKS
from shortgpt_hf.pruning import restored_after
from shortgpt_hf.selection import removal_count
from shortgpt_hf.texts import CALIBRATION_SOURCES

GENRES = [d.name for d in DOMAINS]
MEASURES = ("perplexity_ratio", "kl_mean", "top1_agreement")
QUICK = ("plain removal", "linear, mixture (default calibration)", "cosine, mixture")


def figures(report) -> dict:
    row = {name: {m: round(report.get(f"fidelity:{name}", m), 4) for m in MEASURES} for name in GENRES}
    for group in ("unseen", "all"):
        row[group] = {m: round(report.get(f"suite:{group}", f"{m}_mean"), 4) for m in MEASURES}
    row["mc"] = {task: round(report.get(f"mc:{task}", "acc"), 4) for task in PACKAGED_TASKS}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens of each repair")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each genre to measure on")
    parser.add_argument("--quick", action="store_true", help="only plain removal and the two objectives on the mixture")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    dense, tok = load_builtin(args.model)
    model, _ = load_builtin(args.model)
    count = removal_count(len(model.model.layers), ratio=0.25)  # halves up: 5 of 18, 8 of 30
    with tempfile.TemporaryDirectory() as folder:
        plays = Path(folder) / "plays.txt"
        plays.write_text("\n\n".join(CALIBRATION_SOURCES["shakespeare"]()))
        bi_mixture = score_layers(model, tokenizer=tok, progress=False).lowest(count)
        bi_plays = score_layers(model, str(plays), tokenizer=tok, progress=False).lowest(count)
        aware = None
        if not args.quick:
            aware = score_layers(model, metric="linear_residual", tokenizer=tok, progress=False).lowest(count)
        variants = {
            "plain removal": (bi_mixture, None, None, {}),
            "linear, plays only": (bi_mixture, "linear", str(plays), {}),
            "linear, mixture (default calibration)": (bi_mixture, "linear", None, {}),
            "linear, mixture, shrinkage auto": (bi_mixture, "linear", None, {"shrinkage": "auto"}),
            "cosine, mixture": (bi_mixture, "cosine", None, {}),
            "linear, mixture, layers chosen by linear_residual": (aware, "linear", None, {}),
        }
        if args.quick:
            variants = {k: v for k, v in variants.items() if k in QUICK}
        elif bi_plays != bi_mixture:
            variants["plain removal, BI on the plays"] = (bi_plays, None, None, {})
            variants["linear, mixture, BI on the plays"] = (bi_plays, "linear", None, {})
        results = {}
        for label, (layers, method, calibration, options) in variants.items():
            with restored_after(model):
                kwargs = {}
                if method is not None:
                    options = {"max_tokens": args.tokens, "progress": False, **options}
                    kwargs = dict(recovery=method, recovery_options=options, recovery_data=calibration)
                with timing() as cost:
                    prune(model, layers, tokenizer=tok, **kwargs)
                report = evaluate(
                    model, tok, ["suite", "mc"], reference=dense, max_tokens=args.eval_tokens, progress=False
                )
                steps = model.config.shortgpt.get("recovery") or []  # read before the model is restored
                shrunk = [gap["shrinkage"] for step in steps for gap in step["gaps"]]
            results[label] = figures(report) | {"layers": layers, "fit_s": round(cost.wall, 1), "shrinkage": shrunk}
            print(f"{label}: done", flush=True)
        dense_mc = evaluate(dense, tok, ["mc"], progress=False)
    print(f"{args.model}, {count} layers removed; BI on the mixture: {bi_mixture}; BI on the plays: {bi_plays}")
    print(f"linear_residual on the mixture: {aware}")
    print("dense multiple choice: " + ", ".join(f"{t} {dense_mc.get(f'mc:{t}', 'acc'):.3f}" for t in PACKAGED_TASKS))
    for label, row in results.items():
        print(
            f"{label}: fit {row['fit_s']} s" + (f", shrinkage per gap {row['shrinkage']}" if row["shrinkage"] else "")
        )
    header = "| variant | " + " | ".join(GENRES) + " | unseen mean | all mean |"
    for measure in MEASURES:
        print(f"\n{measure}\n{header}\n|---|" + "---:|" * (len(GENRES) + 2))
        for label, row in results.items():
            print(f"| {label} | " + " | ".join(f"{row[g][measure]:.3f}" for g in [*GENRES, "unseen", "all"]) + " |")
    print(
        "\nmultiple choice (acc)\n| variant | "
        + " | ".join(PACKAGED_TASKS)
        + " |\n|---|"
        + "---:|" * len(PACKAGED_TASKS)
    )
    for label, row in results.items():
        print(f"| {label} | " + " | ".join(f"{row['mc'][t]:.3f}" for t in PACKAGED_TASKS) + " |")
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine_info(),
                "command": command_line(),
                "model": args.model,
                "bi_plays": bi_plays,
                "bi_mixture": bi_mixture,
                "linear_residual_mixture": aware,
                "dense_mc": {t: dense_mc.get(f"mc:{t}", "acc") for t in PACKAGED_TASKS},
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
