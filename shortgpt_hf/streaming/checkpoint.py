"""A model's safetensors checkpoint, read safely, and the skeleton it fills.

`Checkpoint` knows which file holds each tensor and refuses what cannot be read
safely or completely. `meta_skeleton` builds the model on the meta device;
`load_tensors` fills chosen parts of it through transformers' own loading, so
key renamings and conversions (MoE experts stored one by one and fused on
load, say) apply exactly as in ``from_pretrained``; `prune_skeleton` prunes
it with the same `prune` as in memory, so configs and records agree.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidRequest, SourceUnavailable
from ..families import native_class
from ..pruning import prune
from ..scoring import LayerScores
from ..sources import Source

INDEX = "model.safetensors.index.json"


SINGLE = "model.safetensors"


DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass
class Checkpoint:
    """The safetensors files of a model folder and which file holds each tensor.

    Refuses what cannot be read safely or completely: a checkpoint with only
    pickle files (``.bin``), a shard the index names that is missing, an index
    that does not match its files."""

    folder: Path
    files: dict[str, str]  # tensor name -> shard file name
    reads: list[str] = field(default_factory=list)  # every tensor read, in order (what a test spies on)

    @classmethod
    def open(cls, source: Source) -> Checkpoint:
        if source.where == "hub":
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    source.name, revision=source.revision, allow_patterns=["*.json", "*.safetensors"], **source.hub
                )
            )
        else:
            folder = Path(source.location)
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise SourceUnavailable(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise SourceUnavailable(f"{folder} is missing shard {missing[0]} that its {INDEX} names")
            checkpoint = cls(folder, dict(weight_map))
            checkpoint._check_index()
            return checkpoint
        if (folder / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(folder / SINGLE, "pt") as f:
                return cls(folder, {key: SINGLE for key in f.keys()})
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise SourceUnavailable(
                f"{folder} holds only pickle weights (.bin/.pt); shortgpt_hf reads safetensors only: "
                "convert them first (load the model and save_pretrained it)"
            )
        raise SourceUnavailable(f"{folder} has no safetensors weights ({SINGLE} or {INDEX})")

    def _check_index(self) -> None:
        from safetensors import safe_open

        for shard in sorted(set(self.files.values())):
            with safe_open(self.folder / shard, "pt") as f:
                present = set(f.keys())
            named = {k for k, v in self.files.items() if v == shard}
            if named - present:
                raise SourceUnavailable(
                    f"{INDEX} in {self.folder} does not match its files: {shard} lacks {sorted(named - present)[0]}"
                )

    def meta_tensors(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Shape and dtype of each tensor, as meta tensors, from the files' headers (no data read)."""
        from safetensors import safe_open

        out = {}
        for shard in sorted({self.files[k] for k in keys}):
            with safe_open(self.folder / shard, "pt") as f:
                for key in (k for k in keys if self.files[k] == shard):
                    piece = f.get_slice(key)
                    out[key] = torch.empty(piece.get_shape(), dtype=DTYPES[piece.get_dtype()], device="meta")
        return out

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors ``keys``, one at a time, each file opened once per call."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.files:
                raise SourceUnavailable(f"the checkpoint in {self.folder} has no tensor {key}")
            by_file.setdefault(self.files[key], []).append(key)
        for shard, names in by_file.items():
            with safe_open(self.folder / shard, "pt") as f:
                for key in names:
                    self.reads.append(key)
                    yield key, f.get_tensor(key)


def checkpoint_bytes(source: Source) -> int:
    """The size of a model's weights on disk, from its safetensors index or files (no tensor read)."""
    checkpoint = Checkpoint.open(source)
    index = checkpoint.folder / INDEX
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    return sum((checkpoint.folder / f).stat().st_size for f in set(checkpoint.files.values()))


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes a model could take now: free GPU memory on CUDA, the kernel's MemAvailable otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def meta_skeleton(source: Source, dtype: torch.dtype | str | None = None) -> nn.Module:
    """The model ``source`` describes, with parameters on the meta device and real
    buffers (rotary frequencies and the like are computed from the config, not read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.location, **source.hub_kwargs())
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = native_class(config)._from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does: a tied head is the embedding, read and written once
    model.eval()
    model.name_or_path = model.config.name_or_path = source.portable
    return model


def prune_skeleton(
    model: nn.Module,
    removed: Sequence[int],
    scores: LayerScores | None,
    recipe: Any = None,
    repair: Any = None,
    request: dict[str, Any] | None = None,
) -> None:
    """`prune` on the meta device: the same refusals, config fix and record as in memory
    (plus a recipe's own record, or a repair fitted layer by layer, and the request carried out)."""
    prune(model, list(removed), scores=scores, verify=False)
    if request is not None:
        model.config.shortgpt = {**model.config.shortgpt, "request": request}
    if recipe is not None:  # a recipe's own record (metric, scores, calibration) is what its checkpoint carries
        own = {k: v for k, v in recipe.to_dict().items() if v is not None}
        model.config.shortgpt = {**model.config.shortgpt, **own}
    if repair is not None:
        if sorted(repair.removed_layers) != sorted(removed):
            raise InvalidRequest(
                f"the linear repair was fitted for removing layers {repair.removed_layers}, not {sorted(removed)}"
            )
        record = model.config.shortgpt
        model.config.shortgpt = {**record, "recovery": [*(record.get("recovery") or []), repair.entry]}


def load_tensors(
    model: nn.Module,
    checkpoint: Checkpoint,
    keys: Sequence[str],
    device: torch.device,
    renamed: dict[str, str] | None = None,
) -> None:
    """Read checkpoint ``keys`` into the meta skeleton, through transformers' own
    loading: its key renamings and conversions (MoE experts stored one by one and
    fused on load, say) apply exactly as in ``from_pretrained``. ``renamed``: the
    name a key has in a pruned skeleton, where kept layers are renumbered."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    dtype = model.dtype
    config = LoadStateDictConfig(
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=get_model_conversion_mapping(model),
        device_map={"": device},
    )
    state = {(renamed or {}).get(key, key): tensor for key, tensor in checkpoint.read(keys)}
    quiet = hf_logging.is_progress_bar_enabled()  # our bar counts layers; one bar per layer's load is noise
    hf_logging.disable_progress_bar()
    recorded = getattr(model, "_weight_conversions", None)  # each load would record only the conversions it used
    try:
        convert_and_load_state_dict_in_model(model=model, state_dict=state, load_config=config)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
        if recorded is not None:
            model._weight_conversions = recorded


def record_conversions(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Record on the skeleton the weight conversions that loading the whole checkpoint
    uses, as ``from_pretrained`` records them: ``save_pretrained`` (and our writing)
    reverts exactly those, so tensors go back under the names they were stored under.
    Only names are matched; no tensor is read."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [c for c in mapping if isinstance(c, WeightRenaming)]
    converters = [c for c in mapping if isinstance(c, WeightConverter)]
    for key in checkpoint.files:
        rename_source_key(key, renamings, converters)
    model._weight_conversions = [c for c in mapping if c.was_used()]


def layer_keys(checkpoint: Checkpoint, prefix: str, num_layers: int, where: str) -> list[list[str]]:
    """The checkpoint's tensor names, per decoder layer (as stored: before any conversion)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    by_layer: list[list[str]] = [[] for _ in range(num_layers)]
    for key in checkpoint.files:
        match = pattern.match(key)
        if match is not None and int(match.group(1)) < num_layers:
            by_layer[int(match.group(1))].append(key)
    empty = [i for i, keys in enumerate(by_layer) if not keys]
    if len(empty) == num_layers:
        raise SourceUnavailable(
            f"the checkpoint of {where} stores its decoder layers under other names than {prefix}N. (as "
            "vision-language checkpoints do): working layer by layer needs the two to match; load it in memory"
        )
    if empty:
        raise SourceUnavailable(
            f"the checkpoint of {where} has no tensors under {prefix}{empty[0]}.: it does not match its config"
        )
    return by_layer
