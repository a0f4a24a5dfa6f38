"""Which calibration a linear repair generalizes from, measured on the held-out suite.

SmolLM2-135M with its 8 lowest-BI layers removed (25%), each variant measured
against the dense model on the suite's four genres (``evaluate(..., ["suite"],
reference=dense)``: perplexity ratio, KL(dense || pruned) per token, top-1
agreement; about 4,000 tokens per genre in 256-token windows), with the mean
over the genres the packaged calibration never reads (unseen):

- plain removal;
- linear repair calibrated on the packaged plays (Shakespeare, the default);
- linear repair calibrated on an equal mixture of the plays and source code
  (standard-library modules the suite's code genre does not read);
- each repair again with ``shrinkage="auto"``: pulled toward plain removal by
  the amount that leaves the least error on a held-out fifth of its
  calibration batches.

Also reports whether Block Influence on the mixture picks other layers than
on the plays. Every variant repairs the same removal with the same number of
calibration tokens (``--tokens``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import command_line, machine_info, timing, write_json

from shortgpt_hf import evaluate, load_builtin, prune, score_layers
from shortgpt_hf.domains import DOMAINS, code_calibration_texts
from shortgpt_hf.pruning import restored_after
from shortgpt_hf.texts import calibration_texts

GENRES = [d.name for d in DOMAINS]


def figures(report) -> dict:
    row = {}
    for name in GENRES:
        task = f"fidelity:{name}"
        row[name] = {m: round(report.get(task, m), 4) for m in ("perplexity_ratio", "kl_mean", "top1_agreement")}
    row["unseen"] = {
        m: round(report.get("suite:unseen", f"{m}_mean"), 4) for m in ("perplexity_ratio", "kl_mean", "top1_agreement")
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens of each repair")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    dense, tok = load_builtin("smollm2-135m")
    model, _ = load_builtin("smollm2-135m")
    with tempfile.TemporaryDirectory() as folder:
        plays, code = Path(folder) / "plays.txt", Path(folder) / "code.txt"
        plays.write_text("\n\n".join(calibration_texts()))
        code.write_text("\n\n".join(code_calibration_texts()))
        mixture = {str(plays): 1.0, str(code): 1.0}
        bi_plays = score_layers(model, tokenizer=tok, progress=False).lowest(8)
        bi_mixture = score_layers(model, mixture, tokenizer=tok, progress=False).lowest(8)
        variants = {
            "plain removal": (None, 0.0),
            "linear, plays": (str(plays), 0.0),
            "linear, plays, shrinkage auto": (str(plays), "auto"),
            "linear, plays + code": (mixture, 0.0),
            "linear, plays + code, shrinkage auto": (mixture, "auto"),
        }
        results = {}
        for label, (calibration, shrinkage) in variants.items():
            with restored_after(model), timing() as cost:
                options = {"max_tokens": args.tokens, "shrinkage": shrinkage, "progress": False}
                kwargs = {} if calibration is None else dict(recovery="linear", recovery_options=options)
                prune(model, bi_plays, recovery_data=calibration, tokenizer=tok, **kwargs)
                report = evaluate(model, tok, ["suite"], reference=dense, progress=False)
                steps = model.config.shortgpt.get("recovery") or []  # read before the model is restored
                shrunk = [gap["shrinkage"] for step in steps for gap in step["gaps"]]
            results[label] = figures(report) | {"wall_s": round(cost.wall, 1), "shrinkage": shrunk}
    print(f"BI on the plays: {bi_plays}; BI on plays + code: {bi_mixture}")
    print(
        "shrinkage chosen per gap: " + "; ".join(f"{k}: {v['shrinkage']}" for k, v in results.items() if v["shrinkage"])
    )
    header = "| variant | " + " | ".join(GENRES) + " | unseen mean |"
    for measure in ("perplexity_ratio", "kl_mean", "top1_agreement"):
        print(f"\n{measure}\n{header}\n|---|" + "---:|" * (len(GENRES) + 1))
        for label, row in results.items():
            print(f"| {label} | " + " | ".join(f"{row[g][measure]:.3f}" for g in [*GENRES, "unseen"]) + " |")
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine_info(),
                "command": command_line(),
                "bi_plays": bi_plays,
                "bi_mixture": bi_mixture,
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
