"""Models larger than memory: scoring and linear repair one layer at a time, and
writing pruned checkpoints tensor by tensor, straight from the base's
safetensors shards.

All of it works from a skeleton of the model built on the meta device
(parameters take no memory; buffers such as rotary frequencies are real), and
reads only the tensors it needs with ``safe_open``:

- **the layer walk** (`score_layers_sequentially`, `fit_linear_sequentially`)
  first runs every calibration window through the model with each decoder
  layer replaced by a stand-in that records what the model hands it: the
  hidden state, the attention mask for that layer's type (sliding or full)
  and the rotary embeddings. These are exactly what the full model would
  pass, because the model's own forward computed them. Then it loads one
  layer at a time (through transformers' own loading, so stored-per-expert
  MoE weights are fused as ``from_pretrained`` fuses them), runs the
  recorded inputs through it, keeps the outputs as the next layer's inputs
  and frees the layer. Scoring adds up the same per-token terms as
  `score_layers`; the repair gathers the same normal equations as
  ``prune(..., recovery="linear")``. Memory is one layer plus the
  activations (tokens x hidden).
- **materialize** (`materialize`) prunes the skeleton with the same `prune`
  that in-memory pruning uses, so the config, the tensor names and the shard
  layout are what `save_pruned` writes; it then copies each kept tensor from
  the base's shards into the new ones, one tensor in memory at a time, with
  any repair folded into the few tensors it changes. Removed layers are
  never read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationData, TokenWindows, is_tokenized, prepare_calibration
from .config import ShortGPTConfig
from .errors import ShortGPTError
from .evaluation import HEADLINE, PerplexitySettings, negative_log_likelihood, perplexity_batches
from .families import native_class
from .layers import find_decoder_layers, probe_ids
from .loading import load_tokenizer
from .recovery import RECOVERY_METHODS
from .recovery.linear import (
    MAPS_FILE,
    LinearMap,
    NormalEquations,
    check_finite,
    fitted_map,
    fold_maps,
    fold_rule,
    fold_targets,
    gaps_of,
    load_maps,
    maps_from_record,
    recovery_entry,
    save_maps,
    token_rows,
    unrepairable,
)
from .scoring import HIDDEN_STATE_METRICS, LayerScores, layer_term
from .sources import Source, resolve
from .verification import logits_close, parity_tolerance

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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
                raise ShortGPTError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise ShortGPTError(f"{folder} is missing shard {missing[0]} that its {INDEX} names")
            checkpoint = cls(folder, dict(weight_map))
            checkpoint._check_index()
            return checkpoint
        if (folder / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(folder / SINGLE, "pt") as f:
                return cls(folder, {key: SINGLE for key in f.keys()})
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise ShortGPTError(
                f"{folder} holds only pickle weights (.bin/.pt); shortgpt_hf reads safetensors only: "
                "convert them first (load the model and save_pretrained it)"
            )
        raise ShortGPTError(f"{folder} has no safetensors weights ({SINGLE} or {INDEX})")

    def _check_index(self) -> None:
        from safetensors import safe_open

        for shard in sorted(set(self.files.values())):
            with safe_open(self.folder / shard, "pt") as f:
                present = set(f.keys())
            named = {k for k, v in self.files.items() if v == shard}
            if named - present:
                raise ShortGPTError(
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
                    out[key] = torch.empty(piece.get_shape(), dtype=_DTYPES[piece.get_dtype()], device="meta")
        return out

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors ``keys``, one at a time, each file opened once per call."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.files:
                raise ShortGPTError(f"the checkpoint in {self.folder} has no tensor {key}")
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


def _load_into(
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


def _record_conversions(model: nn.Module, checkpoint: Checkpoint) -> None:
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


def _layer_keys(checkpoint: Checkpoint, prefix: str, num_layers: int, where: str) -> list[list[str]]:
    """The checkpoint's tensor names, per decoder layer (as stored: before any conversion)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    by_layer: list[list[str]] = [[] for _ in range(num_layers)]
    for key in checkpoint.files:
        match = pattern.match(key)
        if match is not None and int(match.group(1)) < num_layers:
            by_layer[int(match.group(1))].append(key)
    empty = [i for i, keys in enumerate(by_layer) if not keys]
    if empty:
        raise ShortGPTError(
            f"the checkpoint of {where} has no tensors under {prefix}{empty[0]}.: it does not match its config"
        )
    return by_layer


class _Recorder(nn.Module):
    """Stands in for one decoder layer while the model's own forward computes what
    each layer receives; passes the hidden state through unchanged."""

    def __init__(self, index: int, last: bool, store: dict[int, tuple[tuple, dict]]):
        super().__init__()
        self.index, self.last, self.store = index, last, store

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.store[self.index] = (args, kwargs)
        if self.index == 0:
            self.store[-1] = ((hidden_states,), {})
        if self.last:
            raise _Recorded
        return hidden_states


class _Recorded(Exception):
    pass


OnBatch = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (batch, layer input, output, token mask)
Visit = Callable[[int, nn.Module], AbstractContextManager[OnBatch]]


class _LayerWalk:
    """A dense model's decoder layers run one at a time over the calibration windows, each
    read from the checkpoint just before and freed just after.

    On creation only the tensors of the decoder outside its layers are read (the
    embeddings), the model's own forward records what every layer receives, and
    they are freed again. `run` then walks the layers once: each one's outputs
    become the next one's inputs, and a visitor sees every (input, output) pair.
    `logits` finishes with the model's own head.
    """

    def __init__(
        self,
        source: Source,
        checkpoint: Checkpoint,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        dtype: torch.dtype | str | None,
        device: torch.device,
        parked: torch.device,
    ):
        from accelerate.utils import set_module_tensor_to_device

        self.model = meta_skeleton(source, dtype)
        self.checkpoint, self.device, self.parked, self.where = checkpoint, device, parked, source.describe()
        found = find_decoder_layers(self.model)
        self.layers = found.layers
        n = len(self.layers)
        layer_prefix = f"{found.path}."
        decoder_prefix = found.path[: -len(found.attr)]
        self.by_layer = _layer_keys(checkpoint, layer_prefix, n, self.where)
        self.outside_layers = [k for k in checkpoint.files if not k.startswith(layer_prefix)]
        outside = [k for k in checkpoint.files if k.startswith(decoder_prefix) and not k.startswith(layer_prefix)]
        _load_into(self.model, checkpoint, outside, device)
        store: dict[int, tuple[tuple, dict]] = {}
        setattr(found.decoder, found.attr, nn.ModuleList(_Recorder(i, i == n - 1, store) for i in range(n)))
        self.batches: list[tuple[torch.Tensor, torch.Tensor, list[tuple[tuple, dict]]]] = []
        try:  # per batch: token mask, hidden state, and each layer's other arguments
            for ids, mask in batches:
                store.clear()
                try:
                    found.decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _Recorded:
                    pass
                hidden = store.pop(-1)[0][0].to(parked)
                self.batches.append((mask.reshape(-1).bool().to(device), hidden, [store[i] for i in range(n)]))
        finally:
            setattr(found.decoder, found.attr, self.layers)
        for name, _ in list(found.decoder.named_parameters()):  # the embeddings did their work: free them
            if not name.startswith(f"{found.attr}."):
                set_module_tensor_to_device(found.decoder, name, "meta")

    def run(self, through: int, visit: Visit, desc: str, progress: bool, skip: Collection[int] = ()) -> None:
        """Layers ``0..through``, once; ``visit(i, layer)`` is entered around layer ``i``'s batches.
        Layers in ``skip`` are neither read nor run: the model with them removed, each kept
        layer still given the mask of its own type (sliding or full), as pruning keeps it."""
        ran = [i for i in range(through + 1) if i not in set(skip)]
        bar = tqdm(total=len(ran), unit="layer", desc=desc, disable=not progress)
        for i in ran:
            layer = self.layers[i]
            _load_into(self.model, self.checkpoint, self.by_layer[i], self.device)
            unloaded = [name for name, p in layer.named_parameters() if p.is_meta]
            if unloaded:
                raise ShortGPTError(f"layer {i} of {self.where} has no tensor for {unloaded[0]} in its checkpoint")
            with visit(i, layer) as on_batch:
                for b, (mask, hidden, per_layer) in enumerate(self.batches):
                    args, kwargs = per_layer[i]
                    x = hidden.to(self.device)
                    out = layer(x, *args, **kwargs)
                    y = out[0] if isinstance(out, tuple) else out
                    on_batch(b, x, y, mask)
                    self.batches[b] = (mask, y.to(self.parked), per_layer)
            layer.to_empty(device="meta")  # frees the layer; its parameters stay meta
            bar.update()
        bar.close()

    def logits(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """Each batch's logits, after a `run` through every layer: the model's own forward
        once more, with every decoder layer a stand-in that hands over the walked hidden
        state, so that the final norm, the head and any logit softcapping are the model's.
        Reads the tensors outside the layers (embeddings, final norm, head); ``batches``
        are the ones the walk was created with."""
        found = find_decoder_layers(self.model)
        _load_into(self.model, self.checkpoint, self.outside_layers, self.device)
        self.model.tie_weights()  # a tied head is the embedding just loaded
        current: dict[str, torch.Tensor] = {}
        n = len(self.layers)
        setattr(found.decoder, found.attr, nn.ModuleList(_Replay(current) if i == n - 1 else _Pass() for i in range(n)))
        try:
            for (ids, mask), (_, hidden, _) in zip(batches, self.batches, strict=True):
                current["hidden"] = hidden.to(self.device)
                yield self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
                ).logits
        finally:
            setattr(found.decoder, found.attr, self.layers)


class _Pass(nn.Module):
    """A decoder layer's stand-in that changes nothing."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Replay(nn.Module):
    """The last decoder layer's stand-in: returns the hidden state the layer walk computed."""

    def __init__(self, current: dict[str, torch.Tensor]):
        super().__init__()
        self.current = current

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.current["hidden"]


def _dense_source(name_or_path: str | Path, what: str) -> Source:
    source = resolve(name_or_path)
    if source.kind != "model" or source.pruned:
        raise ShortGPTError(f"{what} reads a dense model's checkpoint; {source.describe()} is not one")
    return source


def _windows(
    source: Source, calibration: CalibrationData, tokenizer: Any, seq_len: int, max_tokens: int | None
) -> tuple[TokenWindows, int]:
    if tokenizer is None and not is_tokenized(calibration):
        tokenizer = load_tokenizer(source)
    windows = prepare_calibration(calibration, tokenizer, seq_len, max_tokens)
    return windows, getattr(tokenizer, "pad_token_id", None) or 0


def _devices(
    device: str | torch.device | None, activations_device: str | torch.device | None
) -> tuple[torch.device, torch.device]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, torch.device(activations_device or device)


@torch.no_grad()
def score_layers_sequentially(
    name_or_path: str | Path,
    calibration: CalibrationData = None,
    metric: str = "bi",
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = 8192,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    activations_device: str | torch.device | None = None,
    progress: bool = True,
    _checkpoint: Checkpoint | None = None,
) -> LayerScores:
    """`score_layers` for a model that need not fit in memory: one decoder layer
    at a time, read from its safetensors shards, with the same scores.

    ``device``: where each layer runs (default: CUDA when available, else CPU).
    ``activations_device``: where the calibration hidden states wait between
    layers (default: ``device``; give ``"cpu"`` when tokens x hidden do not
    fit beside a layer on the GPU). Peak memory is about one layer plus the
    activations. Hidden-state metrics only (``bi``, ``angular``,
    ``relative_magnitude``), one layer per block."""
    if metric not in HIDDEN_STATE_METRICS:
        raise ShortGPTError(
            f"sequential scoring computes the hidden-state metrics ({', '.join(HIDDEN_STATE_METRICS)}); got {metric!r}"
        )
    source = _dense_source(name_or_path, "sequential scoring")
    device, parked = _devices(device, activations_device)
    checkpoint = _checkpoint or Checkpoint.open(source)
    windows, pad_id = _windows(source, calibration, tokenizer, seq_len, max_tokens)
    walk = _LayerWalk(source, checkpoint, windows.batches(batch_size, pad_id), dtype, device, parked)
    n = len(walk.layers)
    sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n)]

    @contextmanager
    def visit(i: int, layer: nn.Module) -> Iterator[OnBatch]:
        def add(b: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
            sums[i] += layer_term(metric, x, y, mask)

        yield add

    walk.run(n - 1, visit, f"scoring ({metric}) layer by layer", progress)
    scores = [float(s.item()) / windows.num_tokens for s in sums]
    if any(math.isnan(s) for s in scores):
        raise ShortGPTError("sequential scoring produced NaN scores: the activations overflowed in this dtype")
    return LayerScores(metric, scores, n, windows.num_tokens, windows.description, seq_len)


@contextmanager
def _looking_on(i: int, layer: nn.Module) -> Iterator[OnBatch]:
    """A visitor that only lets the walk go on."""
    yield lambda b, x, y, mask: None


@torch.no_grad()
def perplexity_sequentially(
    name_or_path: str | Path,
    texts: CalibrationData = None,
    *,
    skip: Sequence[int] = (),
    tokenizer: Any = None,
    seq_len: int = HEADLINE.seq_len,
    stride: int | None = HEADLINE.stride,
    max_tokens: int | None = HEADLINE.max_tokens,
    batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    activations_device: str | torch.device | None = None,
    progress: bool = True,
    _checkpoint: Checkpoint | None = None,
) -> float:
    """`perplexity` for a model that need not fit in memory, one decoder layer at a time,
    with the same windows and the same number; ``skip`` (layer indices) leaves layers
    out, which gives the perplexity of removing them without writing anything.

    Works on any native checkpoint, a pruned one included. The head runs at the
    end through the model's own forward (`_LayerWalk.logits`), so its final norm,
    tied or untied head and logit softcapping are the model's. Options as for
    `perplexity` and `score_layers_sequentially`."""
    source = resolve(name_or_path)
    if source.kind != "model":
        raise ShortGPTError(f"perplexity layer by layer reads a model's checkpoint; {source.describe()} is not one")
    return _perplexity(
        source,
        texts,
        skip=skip,
        tokenizer=tokenizer,
        seq_len=seq_len,
        stride=stride,
        max_tokens=max_tokens,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        activations_device=activations_device,
        progress=progress,
        checkpoint=_checkpoint,
    )


def _perplexity(
    source: Source,
    texts: CalibrationData,
    *,
    skip: Sequence[int] = (),
    tokenizer: Any = None,
    seq_len: int = HEADLINE.seq_len,
    stride: int | None = HEADLINE.stride,
    max_tokens: int | None = HEADLINE.max_tokens,
    batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    activations_device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> float:
    """`perplexity_sequentially` of a resolved source."""
    device, parked = _devices(device, activations_device)
    checkpoint = checkpoint or Checkpoint.open(source)
    if tokenizer is None and not is_tokenized(texts):
        tokenizer = load_tokenizer(source)
    batches = perplexity_batches(tokenizer, texts, seq_len, stride, max_tokens, batch_size)
    inputs = [(ids, mask) for ids, mask, _ in batches]
    walk = _LayerWalk(source, checkpoint, inputs, dtype, device, parked)
    n = len(walk.layers)
    if not set(skip) <= set(range(n)) or len(set(skip)) >= n:
        raise ShortGPTError(f"skip must name some but not all of the {n} layers of {walk.where}, got {list(skip)}")
    walk.run(n - 1, _looking_on, "perplexity layer by layer", progress, skip=skip)
    nll, count = 0.0, 0
    for logits, (_, _, labels) in zip(walk.logits(inputs), batches, strict=True):
        batch_nll, batch_count = negative_log_likelihood(logits, labels)
        nll, count = nll + batch_nll, count + batch_count
    return math.exp(nll / count)


def _with_maps(maps: Sequence[LinearMap], fold: Any, first_kept: int) -> Visit:
    """A visitor that applies linear repair maps to the walk as hooks: each map on the output
    of its kept layer's fold target, an embeddings map on the first kept layer's input. The
    folded weights compute the same, up to rounding (what verification compares against)."""

    def times(t: torch.Tensor, value: Any) -> Any:
        first = value[0] if isinstance(value, tuple) else value
        t = t.to(first.device, first.dtype)
        first = first * t if t.dim() == 1 else first @ t
        return (first, *value[1:]) if isinstance(value, tuple) else first

    @contextmanager
    def visit(i: int, layer: nn.Module) -> Iterator[OnBatch]:
        handles = []
        for m in maps:
            if m.map is None:
                continue
            if m.after is None and i == first_kept:
                handles.append(
                    layer.register_forward_pre_hook(lambda mod, args, t=m.map: (times(t, args[0]), *args[1:]))
                )
            elif m.after == i:
                target = layer.get_submodule(fold.output)
                handles.append(target.register_forward_hook(lambda mod, args, out, t=m.map: times(t, out)))
        try:
            yield lambda b, x, y, mask: None
        finally:
            for handle in handles:
                handle.remove()

    return visit


def _walked_logits(
    source: Source,
    ids: torch.Tensor,
    checkpoint: Checkpoint | None = None,
    skip: Collection[int] = (),
    maps: Sequence[LinearMap] = (),
) -> torch.Tensor:
    """The logits of ``ids`` (one batch, no padding), one layer at a time on the CPU: the
    checkpoint as it is, or with layers ``skip`` removed and ``maps`` applied."""
    batch = [(ids, torch.ones_like(ids))]
    walk = _LayerWalk(
        source, checkpoint or Checkpoint.open(source), batch, None, torch.device("cpu"), torch.device("cpu")
    )
    kept = [i for i in range(len(walk.layers)) if i not in set(skip)]
    visit = _with_maps(maps, fold_rule(walk.model), kept[0]) if maps else _looking_on
    walk.run(len(walk.layers) - 1, visit, "verifying layer by layer", False, skip=skip)
    return next(walk.logits(batch)).float()


@dataclass
class LinearRepair:
    """Linear repair maps fitted layer by layer (`fit_linear_sequentially`), for `materialize`
    to fold into the tensors they touch, or for a recipe to carry: ``entry`` is what the
    pruned model's ``config.shortgpt["recovery"]`` records, ``tensors`` the maps under the
    keys it names (``shortgpt_maps.safetensors``)."""

    removed_layers: list[int]
    maps: list[LinearMap]
    entry: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@torch.no_grad()
def fit_linear_sequentially(
    name_or_path: str | Path,
    removed_layers: Sequence[int],
    calibration: CalibrationData = None,
    *,
    ridge: float = 0.0,
    tokenizer: Any = None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    activations_device: str | torch.device | None = None,
    progress: bool = True,
    _checkpoint: Checkpoint | None = None,
) -> LinearRepair:
    """The linear repair of removing ``removed_layers`` from a dense model that need not fit
    in memory: the maps ``prune(..., recovery="linear")`` fits, from one walk over the
    layers up to the deepest gap, one layer in memory at a time.

    A gap needs activations at its two ends only: what the kept layer before it
    adds (``M``) and outputs (``Y``), and what its last layer outputs (``L``).
    ``M`` and ``Y`` wait (tokens x hidden each, on ``activations_device``) until
    the walk reaches the gap's end, where its normal equations are complete and
    solved. Gaps never overlap, so at most one gap's activations and one
    ``d x d`` system are held at a time. Options as for `score_layers_sequentially`
    and ``prune``'s linear recovery (``ridge``; ``max_tokens=None``: all of the
    calibration)."""
    source = _dense_source(name_or_path, "sequential linear repair")
    removed = sorted(set(removed_layers))
    skeleton = meta_skeleton(source)  # everything that can be refused is refused before a tensor is read
    RECOVERY_METHODS["linear"].check(skeleton, ridge=ridge)
    fold = fold_rule(skeleton)
    original = list(range(len(find_decoder_layers(skeleton).layers)))
    gaps = gaps_of(removed)
    skipped = unrepairable(skeleton, gaps, original)
    _prune_skeleton(skeleton, removed, None)
    device, parked = _devices(device, activations_device)
    checkpoint = _checkpoint or Checkpoint.open(source)
    windows, pad_id = _windows(source, calibration, tokenizer, seq_len, max_tokens)
    walk = _LayerWalk(source, checkpoint, windows.batches(batch_size, pad_id), dtype, device, parked)
    starting = {gap.before: gap for gap in gaps}
    ending = {gap.last: gap for gap in gaps}
    open_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per batch: M and Y rows at the open gap's start
    equations: dict[int, NormalEquations] = {}
    fitted = []

    def rows(t: Any, mask: torch.Tensor, what: str) -> torch.Tensor:
        return check_finite(token_rows(t, mask), f"{walk.where} ({what})")

    @contextmanager
    def visit(i: int, layer: nn.Module) -> Iterator[OnBatch]:
        update: dict[str, Any] = {}
        handle = None
        if i in starting:
            equations[i] = NormalEquations(fold.diagonal)
            handle = layer.get_submodule(fold.output).register_forward_hook(
                lambda module, args, output: update.update(m=output)
            )
        elif i == 0 and -1 in starting:  # the embeddings' output is layer 0's input: M = Y
            equations[-1] = NormalEquations(False)

        def on_batch(b: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
            if i == 0 and -1 in starting:
                embedded = rows(x, mask, "the embeddings").to(parked)
                open_rows[b] = (embedded, embedded)
            if i in starting:
                m = rows(update.pop("m"), mask, f"layer {i} {fold.output}")
                open_rows[b] = (m.to(parked), rows(y, mask, f"layer {i} output").to(parked))
            if i in ending:
                m, y_before = (t.to(device) for t in open_rows.pop(b))
                target = rows(y, mask, f"layer {i} output")
                equations[ending[i].before].add(m, target - y_before + m, target)

        try:
            yield on_batch
        finally:
            if handle is not None:
                handle.remove()
        if i in ending:
            gap = ending[i]
            fitted.append(fitted_map(gap, equations.pop(gap.before), original, ridge, gap in skipped))

    walk.run(removed[-1], visit, "linear repair layer by layer", progress)
    details, tensors = recovery_entry(fitted, 0, ridge, windows.num_tokens)
    return LinearRepair(removed, fitted, {"method": "linear", **details, "data": windows.description}, tensors)


_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _safetensors_header(layout: dict[str, torch.Tensor]) -> bytes:
    """The header of a safetensors file holding ``layout``'s tensors (meta tensors: shapes
    and dtypes only) in that order, so that the data can follow one tensor at a time.
    safetensors' own ``save_file`` needs every tensor of a shard in memory at once;
    the format (a little-endian u64 length, JSON padded to 8 bytes, then the raw
    bytes back to back) is what its reader, and transformers', read."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in layout.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _prune_skeleton(
    model: nn.Module, removed: Sequence[int], scores: LayerScores | None, recipe: Any = None, repair: Any = None
) -> None:
    """`prune` on the meta device: the same refusals, config fix and record as in memory
    (plus a recipe's own record, or a repair fitted layer by layer)."""
    from .pruning import prune

    prune(model, list(removed), scores=scores, verify=False)
    if recipe is not None:  # a recipe's own record (metric, scores, calibration) is what its checkpoint carries
        own = {k: v for k, v in recipe.to_dict().items() if v is not None}
        model.config.shortgpt = {**model.config.shortgpt, **own}
    if repair is not None:
        if sorted(repair.removed_layers) != sorted(removed):
            raise ShortGPTError(
                f"the linear repair was fitted for removing layers {repair.removed_layers}, not {sorted(removed)}"
            )
        record = model.config.shortgpt
        model.config.shortgpt = {**record, "recovery": [*(record.get("recovery") or []), repair.entry]}


def pruned_record(
    name_or_path: str | Path,
    removed_layers: Sequence[int],
    scores: LayerScores | None = None,
    repair: LinearRepair | None = None,
) -> ShortGPTConfig:
    """The `ShortGPTConfig` that removing ``removed_layers`` from a dense model records
    (for `save_recipe`, with ``maps=repair.tensors`` when repaired), worked out on the
    meta device: no tensor is read."""
    model = meta_skeleton(resolve(name_or_path))
    _prune_skeleton(model, removed_layers, scores, repair=repair)
    return ShortGPTConfig.from_model(model)


def _fold_repair(
    model: nn.Module, checkpoint: Checkpoint, maps: list[LinearMap], names: dict[str, str]
) -> dict[str, torch.Tensor]:
    """The tensors a linear repair changes, under their names in the pruned checkpoint
    (``names``: new name -> the base checkpoint's).

    For each kept layer that takes a map (or the input embeddings), the tensors
    its fold targets come from (found by running transformers' own
    ``revert_weight_conversion`` on the skeleton's meta parameters: one tensor
    per expert for a model stored that way) are read into the pruned skeleton,
    folded by the same `fold_maps` as in memory, and turned back into the
    checkpoint's layout the same way, as ``save_pretrained`` does. They are freed
    from the skeleton again; only the changed tensors wait to be written."""
    from transformers.core_model_loading import revert_weight_conversion

    kept = ShortGPTConfig.from_model(model).kept_layers
    current = {old: new for new, old in enumerate(kept)}
    fold = fold_rule(model)
    module_names = {id(module): name for name, module in model.named_modules()}
    hosts = dict.fromkeys(m.after for m in maps if m.map is not None and (m.after is None or m.after in current))
    changed: dict[str, torch.Tensor] = {}

    def stored(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = revert_weight_conversion(model, params)
        strange = [key for key in out if key not in names]
        if strange:
            raise ShortGPTError(
                f"the repaired tensor {strange[0]} has no counterpart among the checkpoint's tensors: "
                "this checkpoint stores its weights under other names; load the model in memory to repair it"
            )
        return out

    for after in hosts:
        targets = fold_targets(model, -1 if after is None else current[after], fold)
        params = {f"{module_names[id(module)]}.{name}": module._parameters[name] for module, name in targets}
        keys = list(stored(params))
        _load_into(model, checkpoint, [names[k] for k in keys], torch.device("cpu"), {names[k]: k for k in keys})
        fold_maps(model, [m for m in maps if m.after == after])
        folded = {name: module._parameters[attr].detach() for name, (module, attr) in zip(params, targets, strict=True)}
        changed |= {key: tensor.contiguous() for key, tensor in stored(folded).items()}
        for module, _ in targets:
            module.to_empty(device="meta")
    return changed


def materialize(
    name_or_path: str | Path,
    out_dir: str | Path,
    *,
    removed_layers: Sequence[int] | None = None,
    scores: LayerScores | None = None,
    repair: LinearRepair | None = None,
    eval_data: CalibrationData = None,
    eval_settings: PerplexitySettings = HEADLINE,
    verify: bool = False,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    _checkpoint: Checkpoint | None = None,
) -> Path:
    """Write the pruned native checkpoint of a recipe (or of a dense model and
    ``removed_layers``) straight from the base's safetensors shards, one tensor in
    memory at a time: what `save_pruned` would write for the same model, tensor for
    tensor, without ever building it. ``scores`` (from `score_layers_sequentially`)
    are recorded in ``config.shortgpt`` as `prune` records them; a ``repair`` (from
    `fit_linear_sequentially`), or the maps a recipe carries, is folded into the few
    tensors it touches. With a ``repair`` and ``eval_data``, the held-out perplexity of
    plain removal and of the repaired checkpoint (measured layer by layer, in its
    temporary folder before it is moved into place) go into the repair's record, as
    ``prune(..., recovery="linear")`` records them. With ``verify``, the written
    checkpoint's logits, computed layer by layer in its temporary folder, must equal
    the base's with the layers skipped (and any maps applied to the outputs they
    fold into) before the folder is moved into place; this reads the base and the
    result once more each. Atomic like every other write."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from .atomic import atomic_folder, check_destination
    from .modeling import read_recipe, recipe_base

    source = resolve(name_or_path)
    check_destination(out_dir, overwrite)
    record = None
    if source.kind == "recipe":
        if removed_layers is not None or repair is not None:
            raise ShortGPTError(f"{source.describe()} names its removed layers and repair itself; give neither")
        record = read_recipe(source)
        if record.mode != "remove":
            raise ShortGPTError(f"{source.describe()} skips layers in prefill only; there is nothing to materialize")
        base, removed = recipe_base(record), list(record.removed_layers)
        map_tensors = load_maps(source.file(MAPS_FILE), record, source.describe())
        maps = maps_from_record(record, map_tensors)
    elif source.kind == "model" and not source.pruned:
        if not removed_layers:
            raise ShortGPTError(f"{source.describe()} is dense: name the layers to remove (removed_layers / --layers)")
        base, removed = source, list(removed_layers)
        maps, map_tensors = (repair.maps, repair.tensors) if repair is not None else ([], {})
    else:
        raise ShortGPTError(f"materialize reads a recipe or a dense model; {source.describe()} is neither")
    checkpoint = _checkpoint or Checkpoint.open(base)
    model = meta_skeleton(base)
    _record_conversions(model, checkpoint)
    found = find_decoder_layers(model)
    prefix = f"{found.path}."
    by_layer = _layer_keys(checkpoint, prefix, len(found.layers), base.describe())
    kept = [i for i in range(len(found.layers)) if i not in set(removed)]
    _prune_skeleton(model, removed, scores, record, repair)
    # The kept tensors as the checkpoint stores them (save_pretrained writes that same form back),
    # the layer index in their names renumbered; removed layers' tensors are never opened.
    in_layers = {key for keys in by_layer for key in keys}
    names = {key: key for key in checkpoint.files if key not in in_layers}
    for new, old in enumerate(kept):
        names |= {f"{prefix}{new}.{key[len(f'{prefix}{old}.') :]}": key for key in by_layer[old]}
    tensors = checkpoint.meta_tensors(list(names.values()))
    try:  # before anything is written
        split = split_torch_state_dict_into_shards(
            {new: tensors[old] for new, old in names.items()}, max_shard_size=max_shard_size
        )
    except ValueError as e:
        raise ShortGPTError(f"max shard size {max_shard_size!r} is not a size like 5GB or 500MB ({e})") from None
    folded = _fold_repair(model, checkpoint, maps, names) if maps else {}
    if verify:
        ids = probe_ids(model)
        current = set(range(len(found.layers))) - set(removed)  # a map whose layer a later prune removed went too
        expected = _walked_logits(
            base, ids, checkpoint, removed, [m for m in maps if m.after is None or m.after in current]
        )
    measured = repair is not None and eval_data is not None
    if measured:
        settings = dict(seq_len=eval_settings.seq_len, stride=eval_settings.stride, max_tokens=eval_settings.max_tokens)
        ppl = dict(settings, tokenizer=load_tokenizer(base))
        before = _perplexity(base, eval_data, skip=removed, progress=progress, checkpoint=checkpoint, **ppl)
    with atomic_folder(out_dir, overwrite) as tmp:
        bar = tqdm(total=len(names), unit="tensor", desc="materializing", disable=not progress)
        for filename, keys in split.filename_to_tensors.items():
            layout = {key: folded.get(key, tensors[names[key]]) for key in keys}
            with open(tmp / filename, "wb") as f:
                f.write(_safetensors_header(layout))
                for key in keys:  # one tensor in memory at a time
                    if key in folded:
                        tensor = folded.pop(key)
                    else:
                        ((_, tensor),) = checkpoint.read([names[key]])
                    f.write(tensor.contiguous().view(torch.uint8).numpy())  # its buffer, not a copy
                    del tensor
                    bar.update()
        bar.close()
        if split.is_sharded:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": split.tensor_to_filename,
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_maps(map_tensors, ShortGPTConfig.from_model(model), tmp)  # as save_pruned keeps them, for a recipe
        try:
            load_tokenizer(source).save_pretrained(tmp)
        except ShortGPTError:
            pass  # a base saved without a tokenizer gives a checkpoint without one, as save_pruned does
        if verify and not logits_close(_walked_logits(resolve(tmp), ids), expected, parity_tolerance(model)):
            raise ShortGPTError(
                "verification failed: the materialized checkpoint's logits differ from the base's with those layers "
                "removed; nothing was written"
            )
        if measured:
            after = perplexity_sequentially(tmp, eval_data, progress=progress, **ppl)
            record = model.config.shortgpt
            entry = record["recovery"][-1] | dict(
                perplexity_before=round(before, 4),
                perplexity_after=round(after, 4),
                perplexity_settings=eval_settings.describe(),
            )
            model.config.shortgpt = record | {"recovery": [*record["recovery"][:-1], entry]}
            model.config.save_pretrained(tmp)
    return Path(out_dir).resolve()
