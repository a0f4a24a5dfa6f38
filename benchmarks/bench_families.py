"""The family table as a report, and what the family matrix costs.

Prints a markdown table with one row per family in ``shortgpt_hf.families``
(and per vision-language wrapper): what removal rewrites for it, what is
refused and why, whether prefill skipping supports it. For every family that
the test suite covers with a tiny model, it also times the matrix's work on
that model: build, ``prune(verify=True)`` (identity reference, cache parity)
and ``save_pruned`` (which reloads through the Auto class and compares
logits), so the suite's share of CI time is visible family by family.

    python benchmarks/bench_families.py [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from harness import timing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import FAMILIES as TINY  # noqa: E402
from tiny_models import MODEL_TYPES, removal, tiny_config, tiny_model  # noqa: E402

from shortgpt_hf import prune, save_pruned  # noqa: E402
from shortgpt_hf.families import FAMILIES, VISION_LANGUAGE, Family  # noqa: E402


def handling(family: Family) -> str:
    parts = []
    if family.per_layer:
        parts.append("slices " + ", ".join(f"`{k}`" for k in family.per_layer))
    if family.layer_indices:
        parts.append("renumbers " + ", ".join(f"`{k}`" for k in family.layer_indices))
    if family.thresholds:
        parts.append("recounts " + ", ".join(f"`{k}`" for k in family.thresholds))
    for p in family.periodic:
        if p.excluded:
            parts.append(f"makes {p.kind} layers explicit (`{p.period}`=1, `{p.excluded}`)")
        else:
            parts.append(f"refits `{p.period}`/`{p.offset}` ({p.kind})")
    if family.reset:
        parts.append("resets " + ", ".join(f"`{k}`={v}" for k, v in family.reset.items()))
    if family.rebuild:
        parts.append("rebuilds shared blocks and weight ties")
    return "; ".join(parts) or "layer list and `layer_idx` only"


def refused(family: Family) -> str:
    reasons = [f"`{r.field}`: {r.reason}" for r in family.refusals]
    reasons += [f"a removal that `{p.period}`/`{p.offset}` cannot describe" for p in family.periodic if not p.excluded]
    if family.attention_layers:
        reasons.append("a removal that keeps no attention layer")
    return "; ".join(reasons) or "-"


def time_family(key: str) -> float:
    """Wall seconds of the test matrix's work on the family's tiny model: build, prune, save and reload."""
    with timing() as spent:
        model = tiny_model(key)
        prune(model, layers=removal(key), verify=True)  # the test matrix's removal
        with tempfile.TemporaryDirectory() as tmp:
            save_pruned(model, Path(tmp) / "out")
    return spent.wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tiny_by_type: dict[str, list[str]] = {}
    for key in TINY:
        tiny_by_type.setdefault(MODEL_TYPES.get(key, key), []).append(key)
        tiny_by_type.setdefault(tiny_config(key).get_text_config(decoder=True).model_type, []).append(key)
    time_family("llama")  # warm-up: the first model pays for imports

    rows = [
        "| family | `model_type` | status | on removal | refused | prefill skip | matrix s |",
        "|---|---|---|---|---|---|---:|",
    ]
    total = 0.0
    for model_type, family in FAMILIES.items():
        keys = tiny_by_type.get(model_type, [])
        text_only = [k for k in keys if MODEL_TYPES.get(k, k) not in VISION_LANGUAGE]
        seconds = time_family(text_only[0]) if text_only else None
        total += seconds or 0.0
        status = "supported" if text_only else "supported, inside its vision-language model" if keys else "refused"
        rows.append(
            f"| {family.name} | `{model_type}` | {status} | {handling(family)} | {refused(family)} | "
            f"{family.prefill_kv or 'no'} | {f'{seconds:.2f}' if seconds is not None else '-'} |"
        )
    for model_type, name in VISION_LANGUAGE.items():
        seconds = sum(time_family(k) for k in tiny_by_type[model_type])
        total += seconds
        rows.append(
            f"| {name} | `{model_type}` | supported (text decoder pruned) | as its text family | "
            f"prefill skipping and healing (one-line refusal) | no | {seconds:.2f} |"
        )
    table = "\n".join(rows)
    print(table)
    print(f"\nmatrix work, all families: {total:.1f} s (1 torch thread)")
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
