"""Does loading a recipe cost only the kept layers?

A recipe that removes 25% of SmolLM2-135M's layers (the 8 lowest-BI of 30) is
loaded with ``PrunedForCausalLM.from_pretrained`` and compared with a plain
``AutoModelForCausalLM.from_pretrained`` of the full base. Each load runs in a
fresh subprocess (``--only full|recipe``), interleaved over several rounds,
after the same warm-up imports in both; reported are the wall time of the
``from_pretrained`` call (with every weight touched) and the peak RSS
increase over the RSS after imports (so the interpreter, torch and
transformers, identical in both, do not dilute the ratio), plus the total peak.

Target: recipe peak memory <= (kept parameter fraction + 10%) of the full
load's, and recipe load time no worse than the full load's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import peak_rss, report, rotated, run_child, timing, write_json

REMOVED = [12, 13, 14, 15, 16, 17, 25, 26]  # SmolLM2-135M's 8 lowest-BI layers on the packaged text


def child(kind: str, recipe: str) -> None:
    """One load in this (fresh) process; reports its time, peak memory over the start, total peak."""
    import torch
    from transformers import AutoModelForCausalLM

    from shortgpt_hf import PrunedForCausalLM, builtin_path

    base = builtin_path("smollm2-135m")
    # Same one-time imports in both children (transformers imports model code lazily,
    # ~1-3 s cold), so the timer measures loading, not whichever import came first.
    from transformers import AutoConfig
    from transformers.models.llama import modeling_llama  # noqa: F401

    AutoConfig.from_pretrained(base)
    with peak_rss() as peak, timing() as spent:
        if kind == "full":
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        else:
            model = PrunedForCausalLM.from_pretrained(recipe, dtype=torch.float32)
        for p in model.parameters():  # touch every weight: mmap'd tensors count once paged in
            p.data.sum()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report(
        {
            "kind": kind,
            "seconds": spent.wall,
            "extra_mib": peak.extra_mib,
            "peak_mib": peak.maxrss_mib,
            "params": params,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["full", "recipe"])
    parser.add_argument("--recipe")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.only:
        child(args.only, args.recipe)
        return

    from transformers import AutoConfig

    from shortgpt_hf import ShortGPTConfig, builtin_path, save_recipe

    layers = AutoConfig.from_pretrained(builtin_path("smollm2-135m")).num_hidden_layers
    recipe = Path(tempfile.mkdtemp()) / "recipe"
    save_recipe(
        ShortGPTConfig(
            removed_layers=REMOVED,
            original_num_hidden_layers=layers,
            model_type="llama",
            base_model_name_or_path="smollm2-135m",
        ),
        recipe,
    )
    runs: dict[str, list[dict]] = {"full": [], "recipe": []}
    for r in range(args.rounds):
        for kind in rotated(("full", "recipe"), r):
            runs[kind].append(run_child(__file__, "--only", kind, "--recipe", str(recipe)))
    summary = {}
    for kind, rows in runs.items():
        summary[kind] = {
            key: statistics.median(row[key] for row in rows) for key in ("seconds", "extra_mib", "peak_mib")
        } | {"params": rows[0]["params"]}
    kept = summary["recipe"]["params"] / summary["full"]["params"]
    mem_ratio = summary["recipe"]["extra_mib"] / summary["full"]["extra_mib"]
    time_ratio = summary["recipe"]["seconds"] / summary["full"]["seconds"]
    print(
        f"removed {len(REMOVED)} of {layers} layers; kept parameter fraction {kept:.3f}; {args.rounds} rounds, medians"
    )
    print("| load | from_pretrained s | extra peak RSS MiB | total peak RSS MiB | parameters |")
    print("|---|---:|---:|---:|---:|")
    for kind, row in summary.items():
        print(f"| {kind} | {row['seconds']:.2f} | {row['extra_mib']:.0f} | {row['peak_mib']:.0f} | {row['params']:,} |")
    target = kept + 0.10
    print(f"memory ratio {mem_ratio:.3f} (target <= {target:.3f}): {'MET' if mem_ratio <= target else 'NOT MET'}")
    print(f"time ratio {time_ratio:.3f} (target <= 1.0): {'MET' if time_ratio <= 1.0 else 'NOT MET'}")
    if args.json:
        write_json(
            args.json,
            {
                "summary": summary,
                "runs": runs,
                "kept_fraction": kept,
                "memory_ratio": mem_ratio,
                "time_ratio": time_ratio,
            },
        )


if __name__ == "__main__":
    main()
