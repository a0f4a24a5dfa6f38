"""The layer walk: a model's decoder layers run one at a time over recorded inputs.

The model's own forward first runs every window with each decoder layer
replaced by a stand-in that records what the model hands it (the hidden
state, the attention mask for that layer's type, the rotary embeddings);
then each layer is read, run on what it was handed, and freed, its outputs
becoming the next layer's inputs. `LayerByLayerDriver` feeds the walk to the
`drivers` protocol, so every metric (`score_layers_sequentially`) and every
training-free repair (`fit_linear_sequentially`) runs the same code as in
memory; `perplexity_sequentially` ends the walk with the model's own head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationData, TokenWindows, is_tokenized, prepare_calibration
from ..drivers import Driver, LayerObserver
from ..errors import InvalidRequest, SourceUnavailable
from ..evaluation import HEADLINE, negative_log_likelihood, perplexity_batches
from ..layers import find_decoder_layers
from ..reading import load_tokenizer
from ..recovery.linear import LinearMap, LinearRepair, fold_rule
from ..registry import RECOVERY_METHODS
from ..scoring import LayerScores, check_metric, score_with
from ..sources import Source, resolve
from ..surgery import check_supported
from .checkpoint import Checkpoint, layer_keys, load_tensors, meta_skeleton


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
    they are freed again. `run` then walks the layers: each one's outputs become
    the next one's inputs, and a visitor sees every (input, output) pair. A walk
    can run again from the recorded inputs (a greedy metric makes one pass per
    layer it chooses). `logits` finishes with the model's own head.
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
        self.walked: list[torch.Tensor] = []  # each batch's hidden state after the last `run`
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
        """Layers ``0..through``, from the recorded inputs; ``visit(i, layer)`` is entered around
        layer ``i``'s batches. Layers in ``skip`` are neither read nor run: the model with them
        removed, each kept layer still given the mask of its own type (sliding or full), as
        pruning keeps it."""
        ran = [i for i in range(through + 1) if i not in set(skip)]
        hidden = [h for _, h, _ in self.batches]
        bar = tqdm(total=len(ran), unit="layer", desc=desc, disable=not progress)
        for i in ran:
            layer = self.layers[i]
            load_tensors(self.model, self.checkpoint, self.by_layer[i], self.device)
            unloaded = [name for name, p in layer.named_parameters() if p.is_meta]
            if unloaded:
                raise SourceUnavailable(f"layer {i} of {self.where} has no tensor for {unloaded[0]} in its checkpoint")
            with visit(i, layer) as on_batch:
                for b, (mask, _, per_layer) in enumerate(self.batches):
                    args, kwargs = per_layer[i]
                    x = hidden[b].to(self.device)
                    out = layer(x, *args, **kwargs)
                    y = out[0] if isinstance(out, tuple) else out
                    on_batch(b, x, y, mask)
                    hidden[b] = y.to(self.parked)
            layer.to_empty(device="meta")  # frees the layer; its parameters stay meta
            bar.update()
        bar.close()
        self.walked = hidden

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
            for (ids, mask), hidden in zip(batches, self.walked, strict=True):
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


class LayerByLayerDriver(Driver):
    """The `drivers` protocol fed by the layer walk: a dense checkpoint's layers read from its
    shards and run one at a time over all the calibration batches, for models larger than
    memory. The walk's inputs are recorded once, on the first pass; every pass after that
    (a greedy metric makes one per layer it chooses) starts again from them."""

    how = "layer by layer"

    def __init__(
        self,
        source: Source,
        prepare: Callable[[], tuple[TokenWindows, int]],
        *,
        batch_size: int = 8,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        activations_device: str | torch.device | None = None,
        checkpoint: Checkpoint | None = None,
    ):
        super().__init__(meta_skeleton(source), prepare)
        self.source, self.batch_size, self.dtype = source, batch_size, dtype
        self.run_on, self.parked = _devices(device, activations_device)
        self._checkpoint = checkpoint
        self._walk: _LayerWalk | None = None

    @property
    def device(self) -> torch.device:
        return self.run_on

    @torch.no_grad()
    def run(self, observer: LayerObserver, desc: str, progress: bool = True) -> None:
        if self._walk is None:
            checkpoint = self._checkpoint or Checkpoint.open(self.source)
            batches = self.windows.batches(self.batch_size, self.pad_id)
            self._walk = _LayerWalk(self.source, checkpoint, batches, self.dtype, self.run_on, self.parked)

        @contextmanager
        def visit(i: int, layer: nn.Module) -> Iterator[OnBatch]:
            tapped: dict[str, Any] = {}
            handle = None
            if i in observer.taps:
                handle = layer.get_submodule(observer.taps[i]).register_forward_hook(
                    lambda module, args, output: tapped.update(out=output)
                )
            try:
                yield lambda b, x, y, mask: observer.observe(i, b, x, y, mask, tapped.pop("out", None))
            finally:
                if handle is not None:
                    handle.remove()
            observer.finish(i)

        self._walk.run(observer.through, visit, desc, progress)


def dense_driver(
    name_or_path: str | Path,
    calibration: CalibrationData,
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    activations_device: str | torch.device | None = None,
    checkpoint: Checkpoint | None = None,
    what: str = "the layer walk",
) -> LayerByLayerDriver:
    """A `LayerByLayerDriver` over a dense checkpoint and ``calibration``, tokenized (with the
    checkpoint's own tokenizer when none is given) only when a pass first needs it."""
    source = _dense_source(name_or_path, what)

    def prepare() -> tuple[TokenWindows, int]:
        tok = load_tokenizer(source) if tokenizer is None and not is_tokenized(calibration) else tokenizer
        return prepare_calibration(calibration, tok, seq_len, max_tokens), getattr(tok, "pad_token_id", None) or 0

    return LayerByLayerDriver(
        source,
        prepare,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        activations_device=activations_device,
        checkpoint=checkpoint,
    )


def _dense_source(name_or_path: str | Path, what: str) -> Source:
    source = resolve(name_or_path)
    if source.kind != "model" or source.pruned:
        raise InvalidRequest(f"{what} reads a dense model's checkpoint; {source.describe()} is not one")
    return source


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
    block_size: int = 1,
    seed: int = 0,
    max_layers: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    activations_device: str | torch.device | None = None,
    progress: bool = True,
    _checkpoint: Checkpoint | None = None,
) -> LayerScores:
    """`score_layers` for a model that need not fit in memory: one decoder layer
    at a time, read from its safetensors shards, with the same scores for every
    metric (the same `score_with` runs on both).

    ``device``: where each layer runs (default: CUDA when available, else CPU).
    ``activations_device``: where the calibration hidden states wait between
    layers (default: ``device``; give ``"cpu"`` when tokens x hidden do not
    fit beside a layer on the GPU). Peak memory is about one layer plus the
    activations (times ``block_size`` for blocks)."""
    check_metric(metric, block_size)
    driver = dense_driver(
        name_or_path,
        calibration,
        tokenizer=tokenizer,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        activations_device=activations_device,
        checkpoint=_checkpoint,
        what="sequential scoring",
    )
    return score_with(
        driver, metric, block_size=block_size, seed=seed, max_layers=max_layers, seq_len=seq_len, progress=progress
    )


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
        raise InvalidRequest(f"perplexity layer by layer reads a model's checkpoint; {source.describe()} is not one")
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


@torch.no_grad()
def fit_linear_sequentially(
    name_or_path: str | Path,
    removed_layers: Sequence[int],
    calibration: CalibrationData = None,
    *,
    method: str = "linear",
    tokenizer: Any = None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    activations_device: str | torch.device | None = None,
    progress: bool = True,
    _checkpoint: Checkpoint | None = None,
    **options: Any,
) -> LinearRepair:
    """The training-free repair ``method`` of removing ``removed_layers`` from a dense model
    that need not fit in memory: the maps ``prune(..., recovery=method)`` fits, from one walk
    over the layers up to the deepest gap, one layer in memory at a time.

    A gap needs activations at its two ends only: what the kept layer before it
    adds (``M``) and outputs (``Y``), and what its last layer outputs (``L``).
    ``M`` and ``Y`` wait (tokens x hidden each, on ``activations_device``) until
    the walk reaches the gap's end. Options as for `score_layers_sequentially`
    and the method's own ``options`` (``ridge``, ``shrinkage`` for ``linear``; ``max_tokens=None``: all of
    the calibration)."""
    driver = dense_driver(
        name_or_path,
        calibration,
        tokenizer=tokenizer,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        activations_device=activations_device,
        checkpoint=_checkpoint,
        what=f"sequential {method} repair",
    )
    return fit_removal(driver, method, removed_layers, options, progress)


def fit_removal(
    driver: Driver, method: str, removed_layers: Sequence[int], options: dict[str, Any], progress: bool = True
) -> LinearRepair:
    """Fit the training-free recovery ``method`` for removing ``removed_layers`` from a dense checkpoint
    walked layer by layer; everything that can be refused is refused before a tensor is read."""
    chosen = RECOVERY_METHODS.get_or_refuse(method)
    if not chosen.needs_removed_layers:
        raise InvalidRequest(
            f"recovery method {method!r} trains the pruned model, which layer by layer never holds in memory: "
            "prune first, then run it on the pruned checkpoint"
        )
    removed = sorted(set(removed_layers))
    chosen.check(driver.model, **options)
    check_supported(driver.model, removed)
    return chosen.fit(driver, removed, progress=progress, **options)


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
        raise InvalidRequest(f"skip must name some but not all of the {n} layers of {walk.where}, got {list(skip)}")
    kept = [i for i in range(n) if i not in set(skip)]
    visit = _with_maps(maps, fold_rule(walk.model), kept[0]) if maps else _looking_on
    walk.run(n - 1, visit, "layer by layer to the logits", progress, skip=skip)
    return walk.logits(batches)


class WalkedReference:
    """A dense model larger than memory as the reference of ``evaluate(..., reference=...)``: its
    logits for the evaluation batches come from one layer walk over its checkpoint, one layer in
    memory at a time, and are handed over one batch at a time, as the model in memory computes its own."""

    def __init__(
        self,
        name_or_path: str | Path | Source,
        *,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        activations_device: str | torch.device | None = None,
        progress: bool = True,
        **hub_kwargs: Any,
    ):
        """``revision`` and ``hub_kwargs`` (``token``, ``cache_dir``...) read a Hub id as
        ``from_pretrained`` would; a `Source` already resolved is read as it was resolved."""
        resolved = isinstance(name_or_path, Source)
        self.source = name_or_path if resolved else resolve(name_or_path, revision, **hub_kwargs)
        if self.source.kind != "model":
            raise InvalidRequest(f"a walked reference reads a model's checkpoint; {self.source.describe()} is not one")
        self.options = dict(dtype=dtype, device=device, activations_device=activations_device, progress=progress)

    def logits(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
        return walked_logits(self.source, batches, **self.options)
