"""What `shortgpt heal` costs in memory and time per step: this checkout against an older revision.

SmolLM2-135M minus its 8 lowest-BI layers of 30, saved as a pruned checkpoint
and healed the way ``shortgpt heal PRUNED --out DIR [--teacher smollm2-135m]``
heals it: the CLI's loading (``dtype="auto"``, float32 here) and defaults
(LoRA r=8, alpha 16 on every linear layer of the decoder blocks, 4 x 256-token
batches, lr 2e-4, kd_weight 0.5, held-out perplexity before and after on the
first held-out play), for ``--steps`` steps instead of 50: a few give the
per-step time and the peak, which does not grow with the step count. Every
run is a fresh process (`run_child`) that imports the package either from
this checkout ("after") or from ``git archive`` of ``--before`` ("before");
the two alternate, with and without the teacher, the order rotating from
round to round.

Reported per run: peak RSS (VmHWM, what ``/usr/bin/time`` reports as maximum
resident set size) during the loading, the evaluations and the training, the
largest of them being the process's peak; seconds per training step (median of
steps 2..N, step 1 including the setup) and the contention during those steps
(the share of this run's cores that other processes took); the seconds of the
two evaluations. Ratios after / before are paired within a round.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from harness import (
    Contention,
    add_threads_argument,
    command_line,
    machine_info,
    peak_rss,
    report,
    rotated,
    run_child,
    set_threads,
    write_json,
)

REMOVED = [12, 13, 14, 15, 16, 17, 25, 26]  # SmolLM2-135M's 8 lowest-BI layers on the packaged text
CLI_DEFAULTS = dict(lr=2e-4, r=8, alpha=16, layers="all", seq_len=256, batch_size=4, kd_weight=0.5)
PHASES = ("loading", "evaluation", "training")
REPO = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    """One heal in this fresh process, with the package imported from ``args.code``."""
    sys.path.insert(0, args.code)
    set_threads(args.threads)
    import shortgpt_hf.evaluation as evaluation
    from shortgpt_hf.loading import load_model
    from shortgpt_hf.recovery import RECOVERY_METHODS, heal
    from shortgpt_hf.texts import heldout_texts

    assert Path(evaluation.__file__).is_relative_to(args.code), evaluation.__file__
    peaks: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def measured(phase: str, fn: Callable, *a: Any, **k: Any) -> Any:
        """``fn(*a, **k)``, adding its seconds and its peak RSS (the larger, if run twice) to ``phase``."""
        start = time.perf_counter()
        with peak_rss() as peak:
            result = fn(*a, **k)
        peaks[phase] = max(peaks.get(phase, 0.0), peak.vmhwm_mib)
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start
        return result

    def load() -> tuple[Any, Any, Any]:
        model, tok = load_model(args.pruned, dtype="auto")
        return model, tok, (load_model("smollm2-135m", dtype="auto")[0] if args.teacher else None)

    model, tok, teacher = measured("loading", load)
    perplexity, lora = evaluation.perplexity, RECOVERY_METHODS["lora"]
    apply = lora.apply  # both are looked up at call time: wrapping them measures each phase, in old code too
    evaluation.perplexity = lambda *a, **k: measured("evaluation", perplexity, *a, **k)
    lora.apply = lambda *a, **k: measured("training", apply, *a, **k)
    stamps: list[float] = []
    meter: list[Contention] = []  # over the timed steps, 2..N
    contention: list[float] = []

    def tick(step: int, peft_model: Any, logs: dict) -> None:
        stamps.append(time.perf_counter())
        if step == 1:
            meter.append(Contention())
        elif step == args.steps:
            contention.append(meter[0].share())

    heal(
        model,
        None,
        tokenizer=tok,
        steps=args.steps,
        teacher=teacher,
        eval_data=heldout_texts()[:1],
        callback=tick,
        progress=False,
        **CLI_DEFAULTS,
    )
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    report(
        {
            "peaks_mib": peaks,
            "seconds": seconds,
            "s_per_step": statistics.median(steps),
            "steps": steps,
            "contention": contention[0],
        }
    )


def export(revision: str) -> str:
    """The package as committed at ``revision``, extracted to a temporary folder."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "shortgpt_hf"], capture_output=True, check=True
    ).stdout
    folder = tempfile.mkdtemp(prefix=f"shortgpt-{revision}-")
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="the git revision whose package is the baseline (required)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (at least 3)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--fixed-malloc",
        action="store_true",
        help="run the children with a fixed glibc mmap threshold: the memory held, not what glibc keeps besides",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--pruned", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", action="store_true", help=argparse.SUPPRESS)
    add_threads_argument(parser)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.before is None:
        parser.error("--before is required: the git revision to compare with")
    if args.steps < 3:
        parser.error("--steps must be at least 3: step 1 includes the setup")

    from shortgpt_hf import load_builtin, prune, save_pruned

    code = {"before": export(args.before), "after": str(REPO)}
    pruned = Path(tempfile.mkdtemp()) / "pruned"
    model, tok = load_builtin("smollm2-135m", dtype="auto")
    save_pruned(prune(model, layers=REMOVED), pruned, tok)
    del model
    print(machine_info())
    print(command_line())
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for teacher in (False, True):
            for version in rotated(("before", "after"), r):
                name = f"{version}, {'CE+KD' if teacher else 'CE'}"
                options = ["--code", code[version], "--pruned", str(pruned), "--steps", str(args.steps)]
                options += ["--teacher"] if teacher else []
                options += ["--threads", str(args.threads)] if args.threads else []
                result = run_child(__file__, "--child", *options, fixed_malloc=args.fixed_malloc)
                runs.setdefault(name, []).append(result)
                print(name, result, flush=True)

    def median(name: str, key: Callable[[dict], float]) -> float:
        return statistics.median(key(row) for row in runs[name])

    print(f"\n{args.rounds} round(s), medians; peak RSS in GiB")
    print("| run | process peak | loading | evaluation | training | s/step | contention | evaluations s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in runs:
        cells = [median(name, lambda row: max(row["peaks_mib"].values())) / 1024]
        cells += [median(name, lambda row, p=phase: row["peaks_mib"][p]) / 1024 for phase in PHASES]
        cells += [median(name, lambda row, k=key: row[k]) for key in ("s_per_step", "contention")]
        cells += [median(name, lambda row: row["seconds"]["evaluation"])]
        print(
            f"| {name} | " + " | ".join(f"{c:.{d}f}" for c, d in zip(cells, (2, 2, 2, 2, 1, 2, 0), strict=True)) + " |"
        )
    for kind in ("CE", "CE+KD"):
        pairs = list(zip(runs[f"after, {kind}"], runs[f"before, {kind}"], strict=True))

        def ratio(key: Callable[[dict], float], pairs: list = pairs) -> float:
            return statistics.median(key(a) / key(b) for a, b in pairs)

        print(
            f"{kind}, after / before (paired medians): process peak "
            f"{ratio(lambda row: max(row['peaks_mib'].values())):.2f}, "
            f"training peak {ratio(lambda row: row['peaks_mib']['training']):.2f}, "
            f"s/step {ratio(lambda row: row['s_per_step']):.2f}"
        )
    if args.json:
        write_json(args.json, {"machine": machine_info(), "command": command_line(), "runs": runs})


if __name__ == "__main__":
    main()
