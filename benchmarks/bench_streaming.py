"""Models larger than memory: layer-by-layer scoring and materialize against
accelerate disk offload, on a synthetic Llama checkpoint of about 4 GB.

``--make DIR`` writes the checkpoint (random weights, fp32, 24 layers of
hidden size 2048, in 500 MB shards). Each measurement then runs in a fresh
child process (`harness.run_child`), so that its peak RSS is its own:

- **sequential**: `score_layers_sequentially` (one layer resident at a time,
  the calibration hidden states kept between layers);
- **offload**: the same Block Influence through `score_layers` on the model
  loaded with ``device_map="auto"`` and a small ``max_memory``, so accelerate
  offloads most layers to disk and reads each back for every batch;
- **materialize**: writing the checkpoint with 6 of the 24 layers removed,
  tensor by tensor (without the verification walks, which read the base and
  the result once more each);
- **repair**: `fit_linear_sequentially` for the same 6 layers (one gap), at
  16 batches (4,096 tokens: a 2048 x 2048 map needs at least 2,048), saved
  as a recipe with its map;
- **materialize-repaired**: materialize of that recipe, the map folded into
  the kept layer before the gap.

Scoring runs at 1, 4 and 16 calibration batches (one 256-token window each),
so the growth with the number of batches shows: sequential reads the
checkpoint once whatever the count, disk offload once per batch. Reported:
wall seconds, peak RSS over the checkpoint size, and peak RSS above the
interpreter's own (the memory the operation needs), plus the per-layer
figures that the 70B estimate is worked out from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from harness import drop_page_cache, machine_info, memory_cgroup, peak_rss, report, run_child, timing, write_json

HIDDEN, LAYERS, INTERMEDIATE, VOCAB, HEADS = 2048, 24, 4096, 32000, 16
SEQ_LEN = 256
BATCH_COUNTS = (1, 4, 16)
REMOVED = list(range(8, 14))
OFFLOAD_MEMORY = "1GiB"  # what accelerate may keep resident; the rest goes to disk
# Llama-3-70B (bf16): 80 layers of hidden 8192, MLP 28672, 8 KV heads of 128; vocab 128256.
LLAMA_70B = dict(layers=80, hidden=8192, intermediate=28672, kv=1024, vocab=128256, bytes_per_param=2)


def make(folder: Path) -> None:
    """A random-weight Llama checkpoint, built and saved in shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="500MB")


def recipe_of(folder: str | Path) -> Path:
    """Where the repair child leaves its recipe for the materialize-repaired child."""
    return Path(f"{folder}-repair-recipe")


def calibration(batches: int):
    import torch

    return torch.randint(3, VOCAB, (batches, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def child(kind: str, folder: str, batches: int) -> None:
    import torch

    if kind == "make":
        make(Path(folder))
        report({"kind": "make"})
        return

    from shortgpt_hf import fit_linear_sequentially, materialize, save_recipe, score_layers, score_layers_sequentially
    from shortgpt_hf.streaming import pruned_record

    torch.set_num_threads(2)
    data = calibration(batches)
    with peak_rss() as peak, timing() as spent:
        if kind == "sequential":
            scores = score_layers_sequentially(
                folder, data, seq_len=SEQ_LEN, batch_size=1, device="cpu", progress=False
            ).scores
        elif kind == "offload":
            from transformers import AutoModelForCausalLM

            offload = tempfile.mkdtemp(prefix="offload-")
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                device_map="auto",
                max_memory={"cpu": OFFLOAD_MEMORY},
                offload_folder=offload,
                dtype=torch.float32,
            )
            scores = score_layers(model, data, seq_len=SEQ_LEN, batch_size=1, progress=False).scores
            shutil.rmtree(offload, ignore_errors=True)
        elif kind == "repair":
            repair = fit_linear_sequentially(
                folder, REMOVED, data, seq_len=SEQ_LEN, batch_size=1, device="cpu", progress=False
            )
            save_recipe(pruned_record(folder, REMOVED, repair=repair), recipe_of(folder), maps=repair.tensors)
            [gap] = repair.entry["gaps"]
            scores = [gap["relative_error_plain"], gap["relative_error_repaired"]]
        else:
            out = Path(tempfile.mkdtemp(prefix="materialized-")) / "out"
            repaired = kind == "materialize-repaired"
            source, layers = (recipe_of(folder), None) if repaired else (folder, REMOVED)
            materialize(source, out, removed_layers=layers, max_shard_size="500MB", verify=False, progress=False)
            scores = []
            shutil.rmtree(out.parent, ignore_errors=True)
    report(
        {
            "kind": kind,
            "batches": batches,
            "seconds": spent.wall,
            # VmHWM after the kernel's peak counter was reset: ru_maxrss would start from the parent's peak
            "peak_mib": peak.vmhwm_mib if peak.reset else peak.maxrss_mib,
            "extra_mib": peak.extra_vmhwm_mib if peak.reset else peak.extra_mib,
            "before_mib": peak.before_mib,
            "scores": scores,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", type=Path, help="write the synthetic checkpoint here first (if missing)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FOLDER", "BATCHES"))
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--memory-limit",
        type=float,
        metavar="GIB",
        help="run each child in a memory cgroup of this many GiB, page cache emptied before each (root): a "
        "checkpoint larger than the limit is then read from disk, as on a machine that cannot hold it",
    )
    parser.add_argument(
        "--only", choices=("scoring", "materialize", "repair"), help="run one group of measurements, not all three"
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    folder = args.make
    if not (folder / "config.json").is_file():  # in a child too: this process must stay small for the peaks
        with timing() as made:
            run_child(__file__, "--child", "make", str(folder), "0")
        print(f"made {folder} in {made.wall:.0f} s")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"checkpoint: {size / 2**30:.2f} GiB in {len(list(folder.glob('*.safetensors')))} shards; {machine_info()}")
    with contextlib.ExitStack() as stack:
        cgroup = stack.enter_context(memory_cgroup(int(args.memory_limit * 2**30))) if args.memory_limit else None
        if cgroup:
            print(f"each child runs in a {args.memory_limit} GiB memory cgroup, the page cache emptied first")

        def measure(kind: str, batches: int) -> dict:
            if cgroup:
                drop_page_cache()
            else:  # every variant starts with the files in the page cache
                for shard in folder.glob("*.safetensors"):
                    with open(shard, "rb") as f:
                        while f.read(1 << 26):
                            pass
            return run_child(__file__, "--child", kind, str(folder), str(batches), cgroup=cgroup)

        rows = []
        if args.only in (None, "scoring"):
            for batches in BATCH_COUNTS:
                for kind in ("sequential", "offload"):
                    rows.append(measure(kind, batches))
        if args.only in (None, "materialize"):
            rows.append(measure("materialize", 0))
        if args.only in (None, "repair"):
            shutil.rmtree(recipe_of(folder), ignore_errors=True)
            rows.append(measure("repair", BATCH_COUNTS[-1]))
            rows.append(measure("materialize-repaired", 0))
            shutil.rmtree(recipe_of(folder), ignore_errors=True)
    print("| operation | batches | wall s | peak RSS / checkpoint | peak RSS MiB | above interpreter MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['batches'] or '-'} | {r['seconds']:.1f} | {r['peak_mib'] * 2**20 / size:.3f} | "
            f"{r['peak_mib']:.0f} | {r['extra_mib']:.0f} |"
        )
    by = {(r["kind"], r["batches"]): r for r in rows}
    for batches in BATCH_COUNTS if args.only in (None, "scoring") else ():
        seq, off = by[("sequential", batches)], by[("offload", batches)]
        same = max(abs(a - b) for a, b in zip(seq["scores"], off["scores"], strict=True))
        print(
            f"{batches} batches: offload / sequential time {off['seconds'] / seq['seconds']:.2f}x; "
            f"max score difference {same:.1e}"
        )
    if ("repair", BATCH_COUNTS[-1]) in by:
        plain, repaired = by[("repair", BATCH_COUNTS[-1])]["scores"]
        print(f"the gap's relative error: {plain:.4f} removed plainly, {repaired:.4f} with its map")
    layer_bytes = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) * 4
    print(json.dumps({"layer_bytes": layer_bytes}))
    if args.json:
        write_json(
            args.json, {"machine": machine_info(), "checkpoint_bytes": size, "rows": rows, "layer_bytes": layer_bytes}
        )


if __name__ == "__main__":
    main()
