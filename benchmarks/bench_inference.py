"""Does removing 8 of 30 layers make inference 30/22 = 1.364x faster?

ShortGPT's speed claim is that a model with n of L layers removed runs in
about (L - n) / L of the time. On SmolLM2-135M (fp32, CPU) this compares the
dense model with the same model minus its 8 lowest-BI layers (scored with
``score_layers(model, None, "bi", tokenizer=tok)``, the packaged default
calibration), loaded twice the same way so both models' weights live in the
same kind of memory (``copy.deepcopy`` would put the pruned copy's weights in
anonymous memory and the dense model's in the file mapping).

  prefill  one ``torch.no_grad()`` forward over a prompt of 256 or 1024
           tokens of packaged held-out text (Othello, never used for
           calibration), with a cache and ``logits_to_keep=1``, as
           ``generate`` runs its prefill.
  decode   ``generate(prompt, max_new_tokens=64, min_new_tokens=64,
           do_sample=False)`` after a fixed 256-token prompt; a streamer
           timestamps every token, and tokens/s = 63 / (time from the first
           generated token to the 64th), so prefill is excluded and
           ``generate``'s per-step work is included.

Every round runs each measurement on both models back to back, the order
alternating per round, so the noise of a shared machine hits both alike.
Reported per measurement: the median over rounds for each model and the
median of the per-round paired speed-ups (dense time / pruned time), next to
the ideal L / (L - n) and the fraction of it achieved.

Each pair records its contention: the share of the cores this run's
threads need that other processes took meanwhile (``/proc/stat`` busy time
minus this process's CPU time, beyond the cores the run leaves free). Pairs
with contention under 5% give a second speed-up, "quiet pairs", the one to
read on a shared machine: contention slows small multi-threaded ops far
more than large ones, so it distorts the ratios, not only adds noise. When
another job holds one core for the whole run, ``--threads 1`` measures on
the other.

Parameter counts are printed too: the embedding, tied to the lm_head, is not
removed, so the weights read per decoded token shrink by less than 22/30.

Usage::

    python benchmarks/bench_inference.py [--rounds 5] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from harness import (
    Interleaved,
    add_threads_argument,
    command_line,
    machine_info,
    set_threads,
    timing,
    write_json,
)
from transformers.generation.streamers import BaseStreamer

from shortgpt_hf import load_builtin, prune, score_layers
from shortgpt_hf.texts import heldout_texts

MODEL = "smollm2-135m"
N_REMOVE = 8
PREFILL_LENGTHS = (256, 1024)
DECODE_PROMPT = 256
DECODE_TOKENS = 64
PROMPT_OFFSET = 1000  # skip the play's title page and cast list
MODELS = ("dense", "pruned")


class TokenClock(BaseStreamer):
    """Timestamps each ``put`` of ``generate``: the prompt first, then one per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def summary(measure: str, unit: str, pairs: Interleaved) -> dict:
    """Medians per model, and the median paired speed-up over all pairs and over quiet pairs.

    ``unit`` "s" is a time (speed-up = dense / pruned); otherwise a rate (pruned / dense).
    """
    num, den = ("dense", "pruned") if unit == "s" else ("pruned", "dense")
    speedups = pairs.ratios(num, den)
    medians = pairs.medians()
    return {
        "measure": measure,
        "unit": unit,
        "dense": medians["dense"],
        "pruned": medians["pruned"],
        "speedup": pairs.paired(num, den),
        "speedup_min": min(speedups),
        "speedup_max": max(speedups),
        "quiet_pairs": len(pairs.quiet()),
        "speedup_quiet": pairs.paired(num, den, quiet=True),
        "contention": pairs.contention,
    }


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    """One prefill as ``generate`` runs it: filling a cache, logits for the last position only."""
    with timing() as spent:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return spent.wall


def decode_rate(model, ids: torch.Tensor, pad_id: int) -> float:
    """Tokens/s over generated tokens 2..64: prefill and the first token excluded."""
    clock = TokenClock()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=DECODE_TOKENS,
        min_new_tokens=DECODE_TOKENS,
        do_sample=False,
        pad_token_id=pad_id,
        streamer=clock,
    )
    assert out.shape[1] - ids.shape[1] == DECODE_TOKENS == len(clock.times) - 1
    return (DECODE_TOKENS - 1) / (clock.times[-1] - clock.times[1])


def parameter_counts(model) -> dict[str, int]:
    """Total (tied embedding counted once), decoder-layer and embedding parameters."""
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "decoder_layers": sum(p.numel() for p in model.model.layers.parameters()),
        "embedding_tied_lm_head": model.get_input_embeddings().weight.numel(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_threads_argument(parser)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    set_threads(args.threads)

    t_start = time.perf_counter()
    info = machine_info()
    print(f"machine: {info}", flush=True)
    dense, tok = load_builtin(MODEL)
    pruned, _ = load_builtin(MODEL)
    dense.eval()
    pruned.eval()
    scores = score_layers(dense, None, "bi", tokenizer=tok, progress=False)
    removed = scores.lowest(N_REMOVE)
    prune(pruned, n_layers=N_REMOVE, scores=scores)
    models = {"dense": dense, "pruned": pruned}
    num_layers = len(dense.model.layers)
    ideal = num_layers / len(pruned.model.layers)
    params = {name: parameter_counts(m) for name, m in models.items()}
    print(
        f"removed layers {removed} of {num_layers} (BI on {scores.num_tokens} calibration tokens); ideal speed-up "
        f"{num_layers}/{num_layers - N_REMOVE} = {ideal:.3f}",
        flush=True,
    )
    for name, p in params.items():
        print(
            f"{name}: {p['total']:,} parameters ({p['decoder_layers']:,} in decoder layers, "
            f"{p['embedding_tied_lm_head']:,} embedding = tied lm_head)"
        )
    param_ratio = params["dense"]["total"] / params["pruned"]["total"]
    print(f"total parameters dense / pruned = {param_ratio:.3f}", flush=True)

    stream = torch.tensor(tok(heldout_texts()[0], add_special_tokens=False).input_ids)
    prompts = {n: stream[PROMPT_OFFSET : PROMPT_OFFSET + n][None] for n in set(PREFILL_LENGTHS) | {DECODE_PROMPT}}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    measures: dict[int | str, Callable[[str], float]] = {
        n: (lambda name, n=n: prefill_seconds(models[name], prompts[n])) for n in PREFILL_LENGTHS
    }
    measures["decode"] = lambda name: decode_rate(models[name], prompts[DECODE_PROMPT], pad_id)
    for measure in measures.values():  # warm-up: first calls pay one-time allocation and dispatch costs
        for name in MODELS:
            measure(name)

    # measure -> one pair per round, the models' order alternating
    pairs = {key: Interleaved(MODELS) for key in measures}
    for r in range(args.rounds):
        for key, measure in measures.items():
            pairs[key].run(measure)
        last = {key: {name: v[-1] for name, v in p.values.items()} for key, p in pairs.items()}
        print(
            f"round {r + 1}/{args.rounds} (dense/pruned): "
            + ", ".join(f"prefill {n} {last[n]['dense']:.3f}/{last[n]['pruned']:.3f}s" for n in PREFILL_LENGTHS)
            + f", decode {last['decode']['dense']:.1f}/{last['decode']['pruned']:.1f} tok/s"
            + "; contention "
            + "/".join(f"{p.contention[-1]:.0%}" for p in pairs.values()),
            flush=True,
        )

    names = {n: (f"prefill {n} tokens", "s") for n in PREFILL_LENGTHS}
    names["decode"] = (f"decode {DECODE_TOKENS} tokens after {DECODE_PROMPT}", "tok/s")
    rows = [summary(*names[key], pairs[key]) for key in measures]
    for row in rows:
        row["ideal"] = ideal
        row["fraction_of_ideal"] = row["speedup"] / ideal
        row["fraction_of_ideal_quiet"] = None if row["speedup_quiet"] is None else row["speedup_quiet"] / ideal

    print()
    print(
        "| measure | dense | pruned | speed-up (paired median) | range over rounds | quiet pairs "
        "| speed-up (quiet pairs) | ideal | fraction of ideal (all / quiet) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        digits = 3 if row["unit"] == "s" else 2
        quiet = "n/a" if row["speedup_quiet"] is None else f"{row['speedup_quiet']:.3f}"
        quiet_fraction = "n/a" if row["speedup_quiet"] is None else f"{row['fraction_of_ideal_quiet']:.2f}"
        print(
            f"| {row['measure']} | {row['dense']:.{digits}f} {row['unit']} "
            f"| {row['pruned']:.{digits}f} {row['unit']} | {row['speedup']:.3f} "
            f"| {row['speedup_min']:.3f}-{row['speedup_max']:.3f} | {row['quiet_pairs']}/{args.rounds} "
            f"| {quiet} | {ideal:.3f} | {row['fraction_of_ideal']:.2f} / {quiet_fraction} |"
        )
    total = time.perf_counter() - t_start
    print(f"total {total:.0f}s")

    if args.json:
        result = {
            "command": command_line(),
            "machine": info,
            "model": MODEL,
            "dtype": str(dense.dtype),
            "num_layers": num_layers,
            "removed_layers": removed,
            "calibration_tokens": scores.num_tokens,
            "ideal_speedup": ideal,
            "parameters": params,
            "total_parameter_ratio": param_ratio,
            "rounds": args.rounds,
            "rows": rows,
            "prefill_s": {f"{name}_{n}": pairs[n].values[name] for n in PREFILL_LENGTHS for name in MODELS},
            "decode_tok_s": pairs["decode"].values,
            "total_s": total,
        }
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
