"""ShortGPT-gen on CPU: time to first token and decode speed, dense vs prefill skipping.

SmolLM2-135M (30 layers), the 8 lowest-BI layers (25%) skipped during
prefill. The same model object is timed dense, with skipping and boundary
handling (the last prompt token runs dense), and with skipping alone, back to
back at each prompt length (256, 1024, 2048 tokens of packaged held-out
text), rotating the order every round; speed-ups are medians of the
per-round paired ratios. Time to first token = ``generate(max_new_tokens=1)``.
Decode speed = 64 single-token forwards over a cache filled (in that mode)
with a 256-token prompt. The ideal prefill speed-up is L / (L - skipped) = 30 / 22.

Target: at 2048 tokens, at least 85% of the ideal speed-up (boundary on).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from harness import Interleaved, timing, write_json

from shortgpt_hf import disable_prefill_skip, enable_prefill_skip, load_builtin, score_layers
from shortgpt_hf.texts import heldout_texts

LENGTHS = (256, 1024, 2048)
DECODE_TOKENS = 64


def timed(model, ids, new_tokens: int) -> float:
    with timing() as spent:
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return spent.wall


@torch.no_grad()
def decode_rate(model, ids) -> float:
    """Tokens/s of DECODE_TOKENS single-token forwards over a cache holding the prompt."""
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.cache, ids[:, -1:]
    with timing() as spent:
        for _ in range(DECODE_TOKENS):
            cache = model(input_ids=token, cache=cache, use_cache=True).cache
    return DECODE_TOKENS / spent.wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model, tok = load_builtin("smollm2-135m", dtype=torch.float32)
    model.eval()
    layers = score_layers(model, tokenizer=tok, max_tokens=4096, progress=False).lowest(8)
    total = len(model.model.layers)
    ideal = total / (total - len(layers))
    stream = torch.tensor(tok(heldout_texts()[0], add_special_tokens=False).input_ids)
    prompts = {n: stream[1000 : 1000 + n][None] for n in LENGTHS}
    timed(model, prompts[256], 2)  # warm-up

    modes = {"dense": None, "skip": True, "skip_no_boundary": False}

    def set_mode(mode: str) -> None:
        disable_prefill_skip(model)
        if modes[mode] is not None:
            enable_prefill_skip(model, layers, boundary=modes[mode])

    def ttft_of(mode: str, n: int) -> float:
        set_mode(mode)
        return timed(model, prompts[n], 1)

    ttft = {n: Interleaved(modes) for n in LENGTHS}  # per length, the modes back to back, rotating
    decode = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for n in LENGTHS:
            ttft[n].run(ttft_of, n)
        for mode in modes:
            set_mode(mode)
            decode[mode].append(decode_rate(model, prompts[256]))
    set_mode("dense")

    rows = []
    print(f"skipped layers {layers} of {total}; ideal prefill speed-up {ideal:.3f}; {args.rounds} rounds")
    print(
        "| prompt tokens | dense TTFT s | skip TTFT s | speed-up | speed-up / ideal "
        "| no-boundary skip TTFT s | speed-up | / ideal |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in LENGTHS:
        row = {"tokens": n, "ideal": ideal}
        for mode, median in ttft[n].medians().items():
            row[f"{mode}_s"] = median
        for mode in ("skip", "skip_no_boundary"):
            row[f"{mode}_speedup"] = ttft[n].paired("dense", mode)
        rows.append(row)
        print(
            f"| {n} | {row['dense_s']:.3f} | {row['skip_s']:.3f} | {row['skip_speedup']:.3f} "
            f"| {row['skip_speedup'] / ideal:.2f} | {row['skip_no_boundary_s']:.3f} "
            f"| {row['skip_no_boundary_speedup']:.3f} | {row['skip_no_boundary_speedup'] / ideal:.2f} |"
        )
    rates = {mode: statistics.median(v) for mode, v in decode.items()}
    print(
        "decode tokens/s after a 256-token prompt: "
        + ", ".join(f"{m} {v:.1f}" for m, v in rates.items())
        + f" (skip/dense {rates['skip'] / rates['dense']:.3f})"
    )
    at_2048 = rows[-1]["skip_speedup"] / ideal
    met = "MET" if at_2048 >= 0.85 else "NOT MET"
    print(f"target: speed-up at 2048 (boundary on) >= 85% of ideal: {met} ({at_2048:.2f})")
    if args.json:
        raw = {f"{mode}_{n}": ttft[n].values[mode] for mode in modes for n in LENGTHS}
        write_json(args.json, {"layers": layers, "ideal": ideal, "rows": rows, "decode_tok_s": rates, "raw_ttft": raw})


if __name__ == "__main__":
    main()
