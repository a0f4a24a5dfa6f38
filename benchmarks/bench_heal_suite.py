"""Does healing recover general ability, or adapt to its training text? Measured on the held-out suite.

SmolLM2-135M (or ``--model gemma3-270m``) with 25% of its layers removed by
Block Influence (8 of 30; 5 of 18) and the training-free
repair (``linear``, 32,768 tokens of the default mixture) applied, then healed
for the same wall-clock budget each (2 x 128-token batches; LoRA r=8 on
every linear layer of the decoder blocks, lr 1e-3) (``--budget`` seconds;
the step count comes from a short timing probe):

- cross-entropy on the default calibration mixture (plays + Wikipedia + code);
- distillation from the dense model on the same mixture (``kd_weight=1``: the
  loss is KL(dense || pruned) only);
- the last two kept layers tuned whole instead (``partial``, lr 1e-4),
  distilled on the mixture: what Lu et al. (2024) found better than LoRA;
- LoRA with cross-entropy on the plays alone, to show what adapting to one
  genre does.

Each is measured against the dense model on the suite's five genres
(perplexity ratio, KL, top-1 agreement; the first ``--eval-tokens`` of each genre), with
the mean over the two genres no training text comes from (unseen), and
zero-shot multiple-choice accuracy (BIG-bench general_knowledge, emoji_movie).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from bench_domains import GENRES, MEASURES, figures
from harness import command_line, machine_info, timing, write_json

from shortgpt_hf import evaluate, load_builtin, prune, score_layers
from shortgpt_hf.multiple_choice import PACKAGED_TASKS
from shortgpt_hf.recovery import recover
from shortgpt_hf.selection import removal_count
from shortgpt_hf.texts import CALIBRATION_SOURCES

TRAIN = dict(lr=1e-3, seq_len=128, batch_size=2, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model")
    parser.add_argument("--budget", type=float, default=600, help="seconds of training per variant")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="tokens of each genre measured")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens of the training-free repair")
    parser.add_argument("--only", nargs="*", default=None, help="run only the variants whose labels contain a word")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    dense, tok = load_builtin(args.model)
    count = removal_count(len(dense.model.layers), ratio=0.25)  # halves up: 5 of 18, 8 of 30
    layers = score_layers(dense, tokenizer=tok, progress=False).lowest(count)

    plain, _ = load_builtin(args.model)
    prune(plain, layers)
    base, _ = load_builtin(args.model)
    options = {"max_tokens": args.tokens, "progress": False}
    prune(base, layers, tokenizer=tok, recovery="linear", recovery_options=options)

    def repaired():  # a fresh copy of the repaired model for each run: the fit is done once
        return copy.deepcopy(base)

    def measured(model) -> dict:
        return figures(
            evaluate(model, tok, ["suite", "mc"], reference=dense, max_tokens=args.eval_tokens, progress=False)
        )

    def say(label: str, row: dict) -> None:  # each result as it comes: a long run keeps what it finished
        print(f"{label}: " + json.dumps(row), flush=True)

    results = {"plain removal": measured(plain), "linear repair (no training)": measured(base)}
    for label, row in results.items():
        say(label, row)
    with tempfile.TemporaryDirectory() as folder:
        plays = Path(folder) / "plays.txt"
        plays.write_text("\n\n".join(CALIBRATION_SOURCES["shakespeare"]()))
        distilled = {"teacher": dense, "kd_weight": 1.0}
        variants = {
            "linear + LoRA, cross-entropy on the mixture": ("lora", None, {"teacher": None}),
            "linear + LoRA, distilled from dense on the mixture": ("lora", None, distilled),
            "linear + last 2 layers tuned, distilled on the mixture": ("partial", None, {**distilled, "lr": 1e-4}),
            "linear + LoRA, cross-entropy on the plays only": ("lora", str(plays), {"teacher": None}),
        }
        chosen = {k: v for k, v in variants.items() if not args.only or any(word in k for word in args.only)}
        for label, (method, data, options) in chosen.items():
            stamps: list[float] = []  # the cost of a step alone, from a short run on a copy that is dropped:
            probe = {**TRAIN, **options, "callback": lambda *_, at=stamps: at.append(time.perf_counter())}
            recover(repaired(), method, data, tokenizer=tok, steps=5, **probe)  # data preparation is not a step
            steps = max(5, int(args.budget / ((stamps[-1] - stamps[0]) / (len(stamps) - 1))))
            model = repaired()
            with timing() as spent:
                model = recover(model, method, data, tokenizer=tok, steps=steps, **{**TRAIN, **options})
            results[label] = measured(model) | {"steps": steps, "train_s": round(spent.wall, 1)}
            say(label, results[label])
    header = "| variant | " + " | ".join(GENRES) + " | unseen mean | all mean |"
    for measure in MEASURES:
        print(f"\n{measure}\n{header}\n|---|" + "---:|" * (len(GENRES) + 2))
        for label, row in results.items():
            print(f"| {label} | " + " | ".join(f"{row[g][measure]:.3f}" for g in [*GENRES, "unseen", "all"]) + " |")
    print("\nmultiple choice (acc)\n| variant | " + " | ".join(PACKAGED_TASKS) + " |\n|---|" + "---:|" * 2)
    for label, row in results.items():
        print(f"| {label} | " + " | ".join(f"{row['mc'][t]:.3f}" for t in PACKAGED_TASKS) + " |")
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine_info(),
                "command": command_line(),
                "model": args.model,
                "layers": layers,
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
