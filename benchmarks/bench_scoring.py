"""What does Block Influence scoring cost, compared with just running the model?

``score_layers`` measures BI with forward hooks on the decoder layers: each
layer's raw input and output, row-wise cosine in fp32, padding masked out, one
running sum per layer kept, no logits. The claim to check is that this costs
little more than the forward pass itself (target: at most 1.10x a bare forward)
and far less memory than the reference code's approach.

Three approaches, on the real SmolLM2-135M (fp32, CPU), over the SAME token
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

Timings are interleaved (each round runs A, B, C in a rotated order) and the
median per approach is reported, so the noise of a shared machine hits all
three alike. Peak memory is measured per approach in a fresh subprocess
(``--only A|B|C``): ``ru_maxrss`` after the run minus the RSS right after the
model is loaded (weights faulted in, peak counter reset where the kernel
allows), i.e. the extra memory the approach needs.

Usage::

    python benchmarks/bench_scoring.py [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

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
}


def _rss_kib() -> int:
    """Current resident set size in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (also what ru_maxrss reports); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def setup():
    """Load the model and build the calibration batches once."""
    from shortgpt_hf import load_builtin
    from shortgpt_hf.calibration import prepare_calibration

    model, tok = load_builtin(MODEL)
    model.eval()
    windows = prepare_calibration(None, tok, seq_len=SEQ_LEN, max_tokens=MAX_TOKENS)
    batches = list(windows.batches(batch_size=BATCH_SIZE, pad_id=PAD_ID))
    # The same windows as one padded dict, for score_layers: it recovers each
    # window from the mask and re-batches them in order -> identical batches.
    width = max(len(w) for w in windows.windows)
    ids = torch.full((len(windows.windows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, w in enumerate(windows.windows):
        ids[row, : len(w)] = w
        mask[row, : len(w)] = 1
    calib = {"input_ids": ids, "attention_mask": mask}
    again = prepare_calibration(calib, None, seq_len=SEQ_LEN, max_tokens=None)
    assert len(again.windows) == len(windows.windows) and all(
        torch.equal(a, b) for a, b in zip(again.windows, windows.windows)
    ), "score_layers would not see the same windows"
    # safetensors weights are memory-mapped and faulted in lazily: touch them all
    # now so no approach is charged for paging in weights (C alone reads lm_head).
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
        model.base_model(input_ids=ids[:1, :16], attention_mask=mask[:1, :16], use_cache=False)  # warm-up
    return model, tok, windows, batches, calib


def run_a(model, batches, calib):
    from shortgpt_hf.scoring import score_layers

    scores = score_layers(
        model, calib, "bi", seq_len=SEQ_LEN, batch_size=BATCH_SIZE, max_tokens=None, progress=False
    )
    return scores.lowest(N_REMOVE)


@torch.no_grad()
def run_b(model, batches, calib):
    for ids, mask in batches:
        model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    return None


def _reference_block_influence(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sramshetty/ShortGPT metrics.block_influence: N x N product, then its diagonal."""
    d = x.shape[-1]
    x = x.reshape(-1, d)
    y = y.reshape(-1, d)
    sim = (x @ y.T) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True))
    sim = sim.diagonal().nan_to_num(nan=0.5)
    return 1 - sim


@torch.no_grad()
def run_c(model, batches, calib):
    num_layers = model.config.num_hidden_layers
    importances = [0.0] * num_layers
    for ids, mask in batches:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hiddens = out.hidden_states
        for i in range(len(hiddens) - 1):
            importances[i] += _reference_block_influence(hiddens[i], hiddens[i + 1]).sum().cpu().item()
        del out, hiddens
    return sorted(sorted(range(num_layers), key=lambda i: (importances[i], i))[:N_REMOVE])


RUNNERS = {"A": run_a, "B": run_b, "C": run_c}


def memory_worker(which: str) -> None:
    """Child process: load, settle, reset the peak counter, run one approach once, print JSON."""
    model, tok, windows, batches, calib = setup()
    gc.collect()
    base_rss = _rss_kib()
    reset = _reset_peak()
    peak_before = _maxrss_kib()
    t0 = time.perf_counter()
    layers = RUNNERS[which](model, batches, calib)
    seconds = time.perf_counter() - t0
    peak = _maxrss_kib()
    print(
        "RESULT "
        + json.dumps(
            {
                "approach": which,
                "rss_after_load_mib": base_rss / 1024,
                "peak_reset": reset,
                "peak_before_run_mib": peak_before / 1024,
                "peak_mib": peak / 1024,
                "extra_peak_mib": (peak - base_rss) / 1024,
                "seconds": seconds,
                "layers": layers,
            }
        ),
        flush=True,
    )


def measure_memory(which: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--only", which],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"memory run {which} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def machine_info() -> dict:
    import transformers

    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(RUNNERS), help="(internal) run one approach once and report its peak memory")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-approach memory subprocesses")
    parser.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    args = parser.parse_args()

    if args.only:
        memory_worker(args.only)
        return

    info = machine_info()
    print(f"machine: {info}", flush=True)
    t_load = time.perf_counter()
    model, tok, windows, batches, calib = setup()
    print(
        f"model {MODEL} ({model.dtype}, {model.config.num_hidden_layers} layers) + {windows.num_tokens} tokens "
        f"in {len(batches)} batches of {BATCH_SIZE}x{SEQ_LEN} ready in {time.perf_counter() - t_load:.1f}s",
        flush=True,
    )

    order = list(RUNNERS)
    times: dict[str, list[float]] = {k: [] for k in order}
    layers: dict[str, list[int] | None] = {}
    for r in range(args.rounds):
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for which in rotated:
            gc.collect()
            t0 = time.perf_counter()
            layers[which] = RUNNERS[which](model, batches, calib)
            times[which].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds} {which}: {times[which][-1]:.2f}s", flush=True)
    dtype = str(model.dtype)
    del model, batches, calib
    gc.collect()

    memory = {}
    if not args.no_memory:
        for which in order:
            memory[which] = measure_memory(which)
            print(f"memory {which}: +{memory[which]['extra_peak_mib']:.0f} MiB", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in order:
        rows.append(
            {
                "approach": k,
                "what": APPROACHES[k],
                "median_s": med[k],
                "times_s": times[k],
                "ratio_to_bare": med[k] / med["B"],
                "extra_peak_rss_mib": memory[k]["extra_peak_mib"] if k in memory else None,
                f"lowest_{N_REMOVE}_layers": layers[k],
            }
        )

    print()
    print(f"| approach | median s | x bare fwd | extra peak RSS MiB | lowest-{N_REMOVE} BI layers |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        mem = "n/a" if row["extra_peak_rss_mib"] is None else f"{row['extra_peak_rss_mib']:.0f}"
        chosen = "-" if row[f"lowest_{N_REMOVE}_layers"] is None else str(row[f"lowest_{N_REMOVE}_layers"])
        print(f"| {row['approach']}: {row['what']} | {row['median_s']:.2f} | {row['ratio_to_bare']:.3f} | {mem} | {chosen} |")
    ratio = med["A"] / med["B"]
    print()
    print(f"target A <= 1.10x B: {'MET' if ratio <= 1.10 else 'NOT met'} ({ratio:.3f}x)")
    if layers["A"] != layers["C"]:
        print(f"A and C differ in chosen layers: only A {sorted(set(layers['A']) - set(layers['C']))}, "
              f"only C {sorted(set(layers['C']) - set(layers['A']))}")

    if args.json:
        result = {
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "machine": info,
            "model": MODEL,
            "dtype": dtype,
            "num_tokens": windows.num_tokens,
            "seq_len": SEQ_LEN,
            "batch_size": BATCH_SIZE,
            "rounds": args.rounds,
            "rows": rows,
            "memory_detail": memory,
            "ratio_A_over_B": ratio,
            "target_met": ratio <= 1.10,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
