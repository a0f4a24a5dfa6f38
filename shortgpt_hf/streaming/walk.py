"""The layer walk: a model's decoder layers run one at a time over recorded inputs.

The model's own forward first runs every window with each decoder layer
replaced by a stand-in that records what the model hands it (the hidden
state, the attention mask for that layer's type, the rotary embeddings);
then each layer is read, run on what it was handed, and freed, its outputs
becoming the next layer's inputs. Three uses share it: `score_layers_sequentially`
(the same per-token terms as `score_layers`), `fit_linear_sequentially` (the
same normal equations as ``prune(..., recovery="linear")``) and
`perplexity_sequentially` (which ends with the model's own head).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationData, TokenWindows, is_tokenized, prepare_calibration
from ..errors import ShortGPTError
from ..evaluation import HEADLINE, negative_log_likelihood, perplexity_batches
from ..layers import find_decoder_layers
from ..loading import load_tokenizer
from ..recovery import RECOVERY_METHODS
from ..recovery.linear import (
    LinearMap,
    NormalEquations,
    check_finite,
    fitted_map,
    fold_rule,
    gaps_of,
    recovery_entry,
    token_rows,
    unrepairable,
)
from ..scoring import HIDDEN_STATE_METRICS, LayerScores, layer_term
from ..sources import Source, resolve
from .checkpoint import Checkpoint, layer_keys, load_tensors, meta_skeleton, prune_skeleton


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
    """A model's decoder layers run one at a time over a list of batches, each read
    from the checkpoint just before and freed just after.

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
        self.by_layer = layer_keys(checkpoint, layer_prefix, n, self.where)
        self.outside_layers = [k for k in checkpoint.files if not k.startswith(layer_prefix)]
        outside = [k for k in checkpoint.files if k.startswith(decoder_prefix) and not k.startswith(layer_prefix)]
        load_tensors(self.model, checkpoint, outside, device)
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
            load_tensors(self.model, self.checkpoint, self.by_layer[i], self.device)
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
        load_tensors(self.model, self.checkpoint, self.outside_layers, self.device)
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
    if tokenizer is None and not is_tokenized(texts):
        tokenizer = load_tokenizer(source)
    batches = perplexity_batches(tokenizer, texts, seq_len, stride, max_tokens, batch_size)
    walked = walked_logits(
        source,
        [(ids, mask) for ids, mask, _ in batches],
        checkpoint=_checkpoint,
        skip=skip,
        dtype=dtype,
        device=device,
        activations_device=activations_device,
        progress=progress,
    )
    return perplexity_of(walked, batches)


def perplexity_of(logits: Iterable[torch.Tensor], batches: Sequence[tuple[torch.Tensor, ...]]) -> float:
    """The perplexity of `perplexity_batches`' ``(ids, mask, labels)`` batches, from their logits in order."""
    nll, count = 0.0, 0
    for batch_logits, (_, _, labels) in zip(logits, batches, strict=True):
        batch_nll, batch_count = negative_log_likelihood(batch_logits, labels)
        nll, count = nll + batch_nll, count + batch_count
    return math.exp(nll / count)


@dataclass
class LinearRepair:
    """Linear repair maps fitted layer by layer (`fit_linear_sequentially`), for `materialize`
    to fold into the tensors they touch, or for a recipe to carry: ``entry`` is what the
    pruned model's ``config.shortgpt["recovery"]`` records, ``tensors`` the maps under the
    keys it names (``shortgpt/linear_maps.safetensors``)."""

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
    prune_skeleton(skeleton, removed, None)
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


def walked_logits(
    source: Source,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    checkpoint: Checkpoint | None = None,
    skip: Collection[int] = (),
    maps: Sequence[LinearMap] = (),
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    activations_device: str | torch.device | None = None,
    progress: bool = True,
) -> Iterator[torch.Tensor]:
    """The logits of each ``(input_ids, attention_mask)`` batch, from one walk over the layers:
    the checkpoint as it is, or with layers ``skip`` removed and ``maps`` applied as hooks
    (which compute what the folded weights compute, up to rounding)."""
    device, parked = _devices(device, activations_device)
    walk = _LayerWalk(source, checkpoint or Checkpoint.open(source), batches, dtype, device, parked)
    n = len(walk.layers)
    if not set(skip) <= set(range(n)) or len(set(skip)) >= n:
        raise ShortGPTError(f"skip must name some but not all of the {n} layers of {walk.where}, got {list(skip)}")
    kept = [i for i in range(n) if i not in set(skip)]
    visit = _with_maps(maps, fold_rule(walk.model), kept[0]) if maps else _looking_on
    walk.run(n - 1, visit, "layer by layer to the logits", progress, skip=skip)
    return walk.logits(batches)
