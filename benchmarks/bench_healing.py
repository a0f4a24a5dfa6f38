"""How much of the pruning damage does LoRA healing win back in a fixed CPU budget?

SmolLM2-135M with its 8 lowest-BI layers (25%) removed, healed with LoRA
(r=8, all linear layers of the decoder blocks) on the packaged calibration
plays, 2 x 128-token batches, lr 1e-3, for about ``--budget`` seconds each:
cross-entropy only, and cross-entropy + KL to the dense model (kd_weight 0.5).
The step count for each variant comes from a short timing probe so both get
the same wall-clock budget. Held-out perplexity (Othello, 2048 tokens) is
measured every ``--every`` steps. Reported: the fraction of the gap between
the unhealed and the dense perplexity that healing recovers, and a plot.

Target: at least half of the gap recovered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import timing, write_json

from shortgpt_hf import load_builtin, perplexity, prune, score_layers
from shortgpt_hf.recovery import heal
from shortgpt_hf.texts import calibration_texts, heldout_texts

TRAIN = dict(lr=1e-3, seq_len=128, batch_size=2, kd_weight=0.5, progress=False)  # as recorded: CE + KD at 0.5
EVAL = dict(seq_len=128, max_tokens=2048)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=600, help="seconds of training per variant")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("healing_curves.png"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    dense, tok = load_builtin("smollm2-135m", dtype=torch.float32)
    dense.eval()
    held_out = [heldout_texts()[0]]
    layers = score_layers(dense, tokenizer=tok, max_tokens=4096, progress=False).lowest(8)
    ppl_dense = perplexity(dense, tok, held_out, **EVAL)

    def pruned():
        model, _ = load_builtin("smollm2-135m", dtype=torch.float32)
        return prune(model, layers=layers)

    ppl_unhealed = perplexity(pruned(), tok, held_out, **EVAL)
    results = {"layers": layers, "dense": ppl_dense, "unhealed": ppl_unhealed, "variants": {}}
    for name, teacher in (("CE", None), ("CE+KD", dense)):
        with timing() as probe:
            heal(pruned(), calibration_texts(), tokenizer=tok, steps=5, teacher=teacher, **TRAIN)
        per_step = probe.wall / 5
        steps = max(args.every, int(args.budget / per_step))
        curve = [(0, ppl_unhealed)]

        def record(step, model, logs, curve=curve, steps=steps):
            if step % args.every == 0 or step == steps:
                curve.append((step, perplexity(model, tok, held_out, **EVAL)))

        with timing() as spent:
            heal(pruned(), calibration_texts(), tokenizer=tok, steps=steps, teacher=teacher, callback=record, **TRAIN)
        seconds = spent.wall
        final = curve[-1][1]
        recovered = (ppl_unhealed - final) / (ppl_unhealed - ppl_dense)
        results["variants"][name] = {
            "steps": steps,
            "seconds": seconds,
            "curve": curve,
            "final": final,
            "gap_recovered": recovered,
        }
        print(
            f"{name}: {steps} steps in {seconds:.0f}s (incl. {len(curve) - 1} evaluations): "
            f"perplexity {ppl_unhealed:.1f} -> {final:.1f}, gap recovered {recovered:.2f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in results["variants"].items():
        ax.plot(
            *zip(*v["curve"], strict=True), marker="o", markersize=3, label=f"{name} ({v['gap_recovered']:.0%} of gap)"
        )
    ax.axhline(ppl_dense, color="black", linestyle="--", label=f"dense ({ppl_dense:.1f})")
    ax.axhline(ppl_unhealed, color="tab:red", linestyle=":", label=f"pruned, unhealed ({ppl_unhealed:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("LoRA steps (2 x 128 tokens)")
    ax.set_ylabel("held-out perplexity (Othello)")
    ax.set_title(f"Healing SmolLM2-135M after removing 8 of 30 layers (~{args.budget:.0f}s CPU each)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"dense {ppl_dense:.2f}, unhealed {ppl_unhealed:.2f}; plot: {args.plot}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
