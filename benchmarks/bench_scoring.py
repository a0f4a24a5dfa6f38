"""What does Block Influence scoring cost, compared with just running the model?

``score_layers`` measures BI with forward hooks on the decoder layers: each
layer's raw input and output, row-wise cosine in fp32, padding masked out, one
running sum per layer kept, no logits. The claim to check is that this costs
little more than the forward pass itself (target: at most 1.10x a bare forward)
and far less memory than the reference code's approach.

Four approaches, on the real SmolLM2-135M (fp32, CPU), over the SAME token
batches (the packaged default calibration text, Shakespeare, cut into
256-token windows, 4096 tokens, batch size 8):

  A  ``score_layers(model, tokens, "bi")`` (pre-tokenized, so no tokenization
     is timed).
  B  a bare ``torch.no_grad()`` forward of the decoder,
     ``model.base_model(input_ids, attention_mask, use_cache=False)``: the floor.
  C  the reference approach (sramshetty/ShortGPT ``short_hf.py`` + ``metrics.py``):
     ``model(..., output_hidden_states=True)`` (full model, logits included),
     then per layer i the cosine of hidden_states[i] and hidden_states[i+1] as
     ``(X @ Y.T).diagonal()`` over the batch's flattened token matrix (an N x N
     product for N = batch x seq tokens), in the model dtype, pad tokens
     included, last layer compared with the final-normed state.
  D  the ``short-transformers`` package (PyPI 1.0.0), as its
     ``ShortTransformer.from_model(model)`` + ``analyse_layers`` score: it
     replaces every decoder layer's ``forward`` with a wrapper; in each
     forward of the FULL model (logits included) the wrapper clones every
     layer's output to the CPU, keeps all of them, and for each pair i <= j
     computes a distance from the input of layer i to the output of layer j
     (465 pairs for 30 layers), kept as a running mean over forward calls in
     a 30 x 30 matrix. Its metric is NOT BI: the default
     ``angular_distance_last_token`` (Gromov et al., "The Unreasonable
     Ineffectiveness of the Deeper Layers") is arccos(cos)/pi of the LAST
     token of each sequence only. It picks a contiguous block rather than
     single layers: ``get_best_pruning_start(result, 8)`` then removes layers
     s..s+7, but it reads matrix row 8, i.e. the distance from the input of
     layer s to the output of layer s+8, which spans 9 layers (the paper's
     d(x_l, x_l+n) spans the n removed layers, row 7 here). D's picks are the
     library's; the run also reports the 8-block by row 7 and the 8 lowest
     single layers by row 0.

D needs an adapter to run with transformers 5.24; nothing else of the
library is changed (its wrapper, clones, pair loop, running mean and block
choice all run as shipped):

  1. Decoder layers return a tensor in transformers 5, a tuple in 4. The
     wrapper reads ``result[0]`` (the first SEQUENCE of a tensor, 2-D), so
     its metric fails (IndexError, re-raised as a bare RuntimeError). The
     adapter makes each layer return a 1-tuple inside the library's wrapper
     and unwraps it outside.
  2. The default metric calls ``.item()`` on a batch-sized tensor, so it
     runs at batch size 1 only (``remove_layers`` asserts batch_size == 1).
     For the same batches of 8 as A/B/C, D is given (through the library's
     own ``distance=`` argument) ``angular_distance_last_token`` applied to
     each sequence and averaged over the batch: with equal batch sizes the
     same mean over sequences as the batch-1 running mean, and the same
     number of metric calls. A check (``--no-native-check`` skips it) runs
     D again one window at a time with the unmodified metric and compares.

D is called on pre-tokenized batches as ``analyse_layers`` calls the model
(``model(**inputs)`` under ``torch.no_grad()``), so, like A, no tokenization
is timed. In timing, D installs itself on the shared model and is removed
again for every batch (charged to D, like A's per-call setup).

Timings are interleaved per batch: in each round, for each batch, A, B, C
and D run back to back in a rotating order, so the noise of a shared machine
hits all four alike. Reported: the median over rounds of each approach's total
and its ratio to B, the median of the per-batch paired ratios (X/B measured
seconds apart), and the ratio of the summed per-batch minima. The target is
judged on the paired ratio (CPU-time ratios are in the JSON). In timing, A is
one score_layers call per batch (its per-call setup is charged to A); the
memory run makes one call over all batches, as a user would.

Each set of four records its contention: the share of the cores this run's
threads need that other processes took meanwhile (``/proc/stat`` busy time
minus this process's CPU time, beyond the cores the run leaves free). Sets
with contention under 5% give a second paired ratio, "quiet sets", the one
to read on a shared machine: contention does not just add noise, it
distorts the ratios, because it slows a forward's many small multi-threaded
ops far more than one large matrix product (e.g. C's and D's
full-vocabulary lm_head). When another job holds one core for the whole
run, ``--threads 1`` measures on the other.

Peak memory is measured per approach in a fresh subprocess (``--only A|B|C|D``),
run before the parent loads anything (a child's ``ru_maxrss`` starts from its
parent's peak): ``ru_maxrss`` after the run minus the RSS right after the
model is loaded (weights faulted in, peak counter reset where the kernel
allows), i.e. the extra memory the approach needs. The children run with
``MALLOC_MMAP_THRESHOLD_=131072`` (``--default-malloc`` to drop it): glibc's
dynamic threshold otherwise leaves a varying amount of freed temporaries in
the heap, which made A's peak swing by 2-3x between runs.

Usage (D needs the ``bench`` extra, ``pip install -e '.[bench]'``)::

    python benchmarks/bench_scoring.py [--rounds 3] [--threads N] [--no-native-check] [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version

import numpy as np
import torch
from harness import (
    MMAP_THRESHOLD,
    QUIET,
    Interleaved,
    add_threads_argument,
    command_line,
    machine_info,
    peak_rss,
    report,
    run_child,
    set_threads,
    timing,
    write_json,
)
from short_transformers import ShortTransformer
from short_transformers.dist import angular_distance_last_token
from short_transformers.utils import get_best_pruning_start

MODEL = "smollm2-135m"
SEQ_LEN = 256
MAX_TOKENS = 4096
BATCH_SIZE = 8
PAD_ID = 0
N_REMOVE = 8
APPROACHES = {
    "A": "score_layers (hooks)",
    "B": "bare decoder forward",
    "C": "reference (hidden_states + X@Y.T)",
    "D": "short-transformers 1.0.0 (last-token angular)",
}
# What ShortTransformer.from_model sets on the model; removed again after D.
SHORT_TRANSFORMERS_ATTRS = (
    "layer_count",
    "distance",
    "memory",
    "clear_memory",
    "analyse_layers",
    "prune",
    "remove_layers",
    "set_metric",
)


def setup():
    """Load the model and build the calibration batches once."""
    from shortgpt_hf import load_builtin
    from shortgpt_hf.calibration import prepare_calibration

    model, tok = load_builtin(MODEL)
    model.eval()
    windows = prepare_calibration(None, tok, seq_len=SEQ_LEN, max_tokens=MAX_TOKENS)
    batches = list(windows.batches(batch_size=BATCH_SIZE, pad_id=PAD_ID))
    # score_layers gets the same batches as padded {"input_ids", "attention_mask"}
    # dicts: it recovers each window from the mask and re-batches them in order.
    for ids, mask in batches:
        again = prepare_calibration({"input_ids": ids, "attention_mask": mask}, None, seq_len=SEQ_LEN)
        assert list(again.batches(BATCH_SIZE, PAD_ID))[0][0].equal(ids), "score_layers would see other batches"
    # safetensors weights are memory-mapped and faulted in lazily: touch them all
    # now so no approach is charged for paging in weights (C alone reads lm_head).
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
        model.base_model(input_ids=batches[0][0][:1, :16], attention_mask=batches[0][1][:1, :16], use_cache=False)
    return model, windows, batches


def _score(model, ids, mask):
    """score_layers over pre-tokenized ``(ids, mask)``, so no tokenization is timed."""
    from shortgpt_hf.scoring import score_layers

    calibration = {"input_ids": ids, "attention_mask": mask}
    return score_layers(
        model, calibration, "bi", seq_len=SEQ_LEN, batch_size=BATCH_SIZE, max_tokens=None, progress=False
    )


def step_a(model, ids, mask) -> list[float]:
    """score_layers on one batch; returns per-layer sums of (1 - cos) over its tokens."""
    s = _score(model, ids, mask)
    return [v * s.num_tokens for v in s.scores]


@torch.no_grad()
def step_b(model, ids, mask) -> None:
    model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)


def _reference_block_influence(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sramshetty/ShortGPT metrics.block_influence: N x N product, then its diagonal."""
    d = x.shape[-1]
    x = x.reshape(-1, d)
    y = y.reshape(-1, d)
    sim = (x @ y.T) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True))
    sim = sim.diagonal().nan_to_num(nan=0.5)
    return 1 - sim


@torch.no_grad()
def step_c(model, ids, mask) -> list[float]:
    """The reference: full model with all hidden states, then per layer (X @ Y.T).diagonal()."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hiddens = out.hidden_states
    return [_reference_block_influence(hiddens[i], hiddens[i + 1]).sum().cpu().item() for i in range(len(hiddens) - 1)]


def _returning_tuple(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        return (forward(*args, **kwargs),)

    return wrapped


def _returning_first(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        return forward(*args, **kwargs)[0]

    return wrapped


def angular_distance_last_token_batched(x: torch.Tensor, y: torch.Tensor) -> float:
    """short-transformers' default metric per sequence, averaged over the batch.

    Its ``angular_distance_last_token`` calls ``.item()`` on one value per
    sequence, so it fails at batch size > 1; applied to each sequence it is
    unchanged, and the batch mean keeps its running mean a mean over sequences.
    """
    return statistics.fmean(angular_distance_last_token(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0]))


@contextmanager
def short_transformer(model, distance: Callable = angular_distance_last_token_batched) -> Iterator:
    """``ShortTransformer.from_model(model)`` adapted to transformers 5, undone on exit.

    The library's layer wrapper reads ``result[0]`` of a decoder layer's
    output, a tuple in transformers 4 but a tensor in 5: each layer's forward
    returns a 1-tuple inside the wrapper and is unwrapped outside it. Exit
    restores the class forwards and drops the attributes the library set.
    """
    layers = model.model.layers
    for layer in layers:
        layer.forward = _returning_tuple(layer.forward)
    ShortTransformer.from_model(model, distance=distance)
    for layer in layers:
        layer.forward = _returning_first(layer.forward)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
        for name in SHORT_TRANSFORMERS_ATTRS:
            delattr(model, name)


@torch.no_grad()
def step_d(model, ids, mask) -> np.ndarray:
    """short-transformers on one batch: its 30 x 30 matrix of distances (layer i's input to layer j's output)."""
    with short_transformer(model) as st:
        st(input_ids=ids, attention_mask=mask)  # as its analyse_layers: model(**inputs), full model
        return st.memory.result.copy()


STEPS = {"A": step_a, "B": step_b, "C": step_c, "D": step_d}


def lowest(sums: list[float] | np.ndarray, n: int = N_REMOVE) -> list[int]:
    from shortgpt_hf import LayerScores

    return LayerScores("bi", [float(v) for v in sums], len(sums)).lowest(n)


def library_block(result: np.ndarray, n: int = N_REMOVE) -> list[int]:
    """The layers short-transformers' ``remove_layers`` would remove (its ``get_best_pruning_start``, row n)."""
    start = int(get_best_pruning_start(result, block_size=n))
    return list(range(start, start + n))


def paper_block(result: np.ndarray, n: int = N_REMOVE) -> list[int]:
    """The n-layer block with the lowest distance across exactly those n layers (row n - 1)."""
    start = int(np.argmin(result[n - 1, : result.shape[0] - n + 1]))
    return list(range(start, start + n))


def pick(which: str, total: np.ndarray) -> list[int]:
    """The layers an approach would remove, from its per-layer sums (A, C) or distance matrix (D)."""
    return library_block(total) if which == "D" else lowest(total)


def run_whole(which: str, model, batches) -> list[int] | None:
    """One approach over all batches, as a user would run it (A: ONE score_layers call; D: installed once)."""
    if which == "A":
        width = max(ids.shape[1] for ids, _ in batches)  # all batches as one padded dict, pad id 0
        ids = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1]), value=PAD_ID) for i, _ in batches])
        mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in batches])
        return _score(model, ids, mask).lowest(N_REMOVE)
    if which == "D":
        with short_transformer(model) as st, torch.no_grad():
            for ids, mask in batches:
                st(input_ids=ids, attention_mask=mask)
            return library_block(st.memory.result)
    total = None
    for ids, mask in batches:
        res = STEPS[which](model, ids, mask)
        if res is not None:
            total = np.asarray(res) if total is None else total + np.asarray(res)
    return None if total is None else pick(which, total)


@torch.no_grad()
def native_check(model, batches, batched: np.ndarray) -> dict:
    """D unbatched with short-transformers' unmodified metric: does the batch adapter change its matrix?

    ``batched`` is D's matrix summed over the batches; the library's running
    mean over forward calls is that sum over the number of batches.
    """
    with short_transformer(model, distance=angular_distance_last_token) as st:
        for ids, mask in batches:
            for i in range(ids.shape[0]):
                st(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        native = st.memory.result.copy()
    mean = batched / len(batches)
    return {
        "max_abs_diff": float(np.abs(native - mean).max()),
        "max_value": float(np.abs(native).max()),
        "library_block": library_block(native),
        "same_library_block": library_block(native) == library_block(mean),
        "same_paper_block": paper_block(native) == paper_block(mean),
        "same_single_lowest": lowest(native[0]) == lowest(mean[0]),
    }


def memory_worker(which: str) -> None:
    """Child process: load, settle, reset the peak counter, run one approach once, print JSON."""
    model, windows, batches = setup()
    gc.collect()
    with peak_rss() as peak, timing() as spent:
        layers = run_whole(which, model, batches)
    report(
        {
            "approach": which,
            "rss_after_load_mib": peak.before_mib,
            "peak_reset": peak.reset,
            "maxrss_before_run_mib": peak.maxrss_before_mib,
            "maxrss_mib": peak.maxrss_mib,
            "vmhwm_mib": peak.vmhwm_mib,
            "extra_peak_mib": peak.extra_mib,
            "extra_peak_vmhwm_mib": peak.extra_vmhwm_mib,
            "seconds": spent.wall,
            "layers": layers,
        }
    )


def measure_memory(which: str, default_malloc: bool = False, threads: int | None = None) -> dict:
    """One approach's peak memory, from a fresh child process (``--only``)."""
    args = ["--only", which] + (["--threads", str(threads)] if threads else [])
    return run_child(__file__, *args, fixed_malloc=not default_malloc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", choices=sorted(STEPS), help="(internal) run one approach once and report its peak memory"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    add_threads_argument(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-approach memory subprocesses")
    parser.add_argument(
        "--no-native-check",
        action="store_true",
        help="skip rerunning D one window at a time with short-transformers' unmodified metric",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="memory children keep glibc's dynamic mmap threshold (noisier peaks) "
        "instead of MALLOC_MMAP_THRESHOLD_=131072",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    set_threads(args.threads)

    if args.only:
        memory_worker(args.only)
        return

    t_start = time.perf_counter()
    info = machine_info()
    print(f"machine: {info}", flush=True)
    order = list(STEPS)

    # Memory first, while this process is still small: a child's ru_maxrss starts
    # from the parent's peak (the kernel carries it across fork/exec).
    memory = {}
    if not args.no_memory:
        for which in order:
            memory[which] = measure_memory(which, args.default_malloc, args.threads)
            m = memory[which]
            print(
                f"memory {which}: +{m['extra_peak_mib']:.0f} MiB (ru_maxrss), "
                f"+{m['extra_peak_vmhwm_mib']:.0f} MiB (VmHWM), {m['seconds']:.1f}s, layers {m['layers']}",
                flush=True,
            )

    t_load = time.perf_counter()
    model, windows, batches = setup()
    dtype = str(model.dtype)
    num_layers = model.config.num_hidden_layers
    print(
        f"model {MODEL} ({dtype}, {num_layers} layers) + {windows.num_tokens} tokens "
        f"in {len(batches)} batches of {BATCH_SIZE}x{SEQ_LEN} ready in {time.perf_counter() - t_load:.1f}s",
        flush=True,
    )

    # Interleaved per batch: set r * nb + b is batch b of round r, in which the
    # four approaches run back to back in a rotating order, so A/B, C/B, D/B can
    # be compared within each set (paired ratios).
    nb = len(batches)
    sets = Interleaved(order)
    cpu_s: dict[str, list[float]] = {k: [] for k in order}  # CPU seconds per set, beside the wall seconds in sets
    totals: dict[str, np.ndarray] = {}  # per-layer sums (A, C), distance matrix sums (D)

    def timed_step(which: str, ids: torch.Tensor, mask: torch.Tensor, first_round: bool) -> float:
        gc.collect()
        with timing() as spent:
            res = STEPS[which](model, ids, mask)
        cpu_s[which].append(spent.cpu)
        if first_round and res is not None:
            totals[which] = np.asarray(res) + totals.get(which, 0)
        return spent.wall

    def per_round(per_set: list[float]) -> list[list[float]]:
        return [per_set[r * nb : (r + 1) * nb] for r in range(args.rounds)]

    for r in range(args.rounds):
        for ids, mask in batches:
            sets.run(timed_step, ids, mask, r == 0)
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {sum(sets.values[k][-nb:]):.2f}s" for k in order),
            flush=True,
        )
    wall = {k: per_round(sets.values[k]) for k in order}
    cpu = {k: per_round(cpu_s[k]) for k in order}
    contention = per_round(sets.contention)
    layers = {k: pick(k, v) for k, v in totals.items()}
    layers["B"] = None
    d_matrix = totals["D"] / nb  # the library's running mean over forward calls
    d_paper_block = paper_block(d_matrix)
    d_single = lowest(d_matrix[0])

    round_wall = {k: [sum(x) for x in wall[k]] for k in order}
    round_cpu = {k: [sum(x) for x in cpu[k]] for k in order}
    med = {k: statistics.median(v) for k, v in round_wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in round_cpu.items()}
    best = {k: sum(min(wall[k][r][b] for r in range(args.rounds)) for b in range(nb)) for k in order}
    paired = {k: sets.paired(k, "B") for k in order}
    quiet_sets = [divmod(i, nb) for i in sets.quiet()]  # (round, batch)
    paired_quiet = {k: sets.paired(k, "B", quiet=True) for k in order}
    rows = []
    for k in order:
        rows.append(
            {
                "approach": k,
                "what": APPROACHES[k],
                "median_s": med[k],
                "round_totals_s": round_wall[k],
                "ratio_to_bare": med[k] / med["B"],
                "paired_ratio_to_bare": paired[k],
                "paired_ratio_to_bare_quiet_sets": paired_quiet[k],
                "min_s": best[k],
                "min_ratio_to_bare": best[k] / best["B"],
                "median_cpu_s": med_cpu[k],
                "cpu_ratio_to_bare": med_cpu[k] / med_cpu["B"],
                "extra_peak_rss_mib": memory[k]["extra_peak_mib"] if k in memory else None,
                f"layers_picked_{N_REMOVE}": layers[k],
            }
        )

    print()
    print(
        f"| approach | median s | x bare (medians) | x bare (paired) | x bare (paired, quiet sets) | x bare (min) "
        f"| extra peak RSS MiB | {N_REMOVE} layers picked |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        mem = "n/a" if row["extra_peak_rss_mib"] is None else f"{row['extra_peak_rss_mib']:.0f}"
        chosen = "-" if row[f"layers_picked_{N_REMOVE}"] is None else str(row[f"layers_picked_{N_REMOVE}"])
        quiet = (
            "n/a" if row["paired_ratio_to_bare_quiet_sets"] is None else f"{row['paired_ratio_to_bare_quiet_sets']:.3f}"
        )
        print(
            f"| {row['approach']}: {row['what']} | {row['median_s']:.2f} | {row['ratio_to_bare']:.3f} | "
            f"{row['paired_ratio_to_bare']:.3f} | {quiet} | {row['min_ratio_to_bare']:.3f} | {mem} | {chosen} |"
        )
    per_set = sets.contention
    print(
        f"quiet sets (contention under {QUIET:.0%}): {len(quiet_sets)} of {len(per_set)}; "
        f"contention per set: median {statistics.median(per_set):.0%}, max {max(per_set):.0%}"
    )
    ratio = med["A"] / med["B"]
    met = paired["A"] <= 1.10  # the paired ratio is the one a shared machine's noise disturbs least
    print()
    print(
        f"target A <= 1.10x B (judged on the paired ratio): {'MET' if met else 'NOT met'} ({paired['A']:.3f}x paired; "
        f"{ratio:.3f}x by medians, {best['A'] / best['B']:.3f}x by minima"
        + ("" if paired_quiet["A"] is None else f", {paired_quiet['A']:.3f}x paired over quiet sets")
        + ")"
    )
    for k in ("C", "D"):
        if layers["A"] != layers[k]:
            print(
                f"A and {k} differ in chosen layers: only A {sorted(set(layers['A']) - set(layers[k]))}, "
                f"only {k} {sorted(set(layers[k]) - set(layers['A']))}"
            )
    print(
        f"D (short-transformers, last-token angular distance): library block {layers['D']} (row {N_REMOVE}, "
        f"spans {N_REMOVE + 1} layers); {N_REMOVE}-block by row {N_REMOVE - 1} {d_paper_block}; "
        f"{N_REMOVE} lowest single layers (row 0) {d_single}"
    )
    native = None
    if not args.no_native_check:
        t_check = time.perf_counter()
        native = native_check(model, batches, totals["D"])
        native["seconds"] = time.perf_counter() - t_check
        print(
            f"D native check (batch 1, unmodified metric, {native['seconds']:.0f}s): "
            f"max |diff| {native['max_abs_diff']:.2e} (values up to {native['max_value']:.2f}); "
            f"same library block {native['same_library_block']}, same row-{N_REMOVE - 1} block "
            f"{native['same_paper_block']}, same single lowest {native['same_single_lowest']}"
        )
    for k in ("A", "C", "D"):
        if k in memory and memory[k]["layers"] != layers[k]:
            print(f"warning: {k} chose {memory[k]['layers']} over all batches at once but {layers[k]} batch by batch")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f}s")

    if args.json:
        result = {
            "command": command_line(),
            "machine": info,
            "model": MODEL,
            "dtype": dtype,
            "num_layers": num_layers,
            "num_tokens": windows.num_tokens,
            "seq_len": SEQ_LEN,
            "batch_size": BATCH_SIZE,
            "rounds": args.rounds,
            "rows": rows,
            "per_batch_wall_s": wall,
            "per_batch_cpu_s": cpu,
            "per_batch_contention": contention,
            "quiet_sets": quiet_sets,
            "memory_detail": memory,
            "ratio_A_over_B": ratio,
            "paired_ratio_A_over_B": paired["A"],
            "min_ratio_A_over_B": best["A"] / best["B"],
            "short_transformers": {
                "version": version("short-transformers"),
                "metric": "angular_distance_last_token (per sequence, batch mean)",
                "distance_matrix_mean": d_matrix.tolist(),
                "library_block": layers["D"],
                f"block_by_row_{N_REMOVE - 1}": d_paper_block,
                "single_layer_lowest": d_single,
                "native_check": native,
            },
            "malloc_mmap_threshold": None
            if args.default_malloc
            else os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD),
            "target_met": met,
            "total_s": total,
        }
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
