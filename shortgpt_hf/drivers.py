"""What a metric or a training-free fit sees of a model's decoder layers, and the two ways of running them.

A metric (Block Influence, the angular distance...) or a fit (a linear repair's
normal equations) needs, per calibration batch and per decoder layer, the
layer's input, its output, the mask of real tokens and, for a fit, the output
of one submodule (the MLP whose weights take a map). That is the protocol,
`LayerObserver`, and it is written once. Two drivers feed it:

- `InMemoryDriver`: the whole model in memory (or dispatched with accelerate),
  read with forward hooks while the model runs each batch;
- ``streaming.walk.LayerByLayerDriver``: a model larger than memory, its layers
  read from the safetensors shards and run one at a time over every batch.

The first visits the layers batch by batch, the second batch after batch for
one layer at a time, so an observer keeps whatever it carries from one layer to
a later one per batch. Per layer, batches always arrive in the same order, so
sums come out identical on both drivers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import TokenWindows
from .layers import eval_mode, find_decoder_layers, input_device


class LayerObserver(ABC):
    """Reads one pass of calibration batches through a model's decoder layers.

    ``through`` is the deepest layer it needs: a driver stops after it. ``taps``
    names, per layer, a submodule whose output it needs as well (e.g. ``"mlp"``).
    """

    through: int
    taps: dict[int, str] = {}

    @abstractmethod
    def observe(
        self, layer: int, batch: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, tap: Any | None
    ) -> None:
        """Layer ``layer``'s input ``x`` and output ``y`` for batch ``batch`` (``[batch, seq, hidden]``),
        ``mask`` the real tokens (one bool per row of ``x`` flattened, on ``x``'s device), and the
        output of ``taps[layer]`` when it names one."""

    def finish(self, layer: int) -> None:  # noqa: B027  (optional: most observers have nothing to finish)
        """Layer ``layer`` has seen every batch: what waited for it can be completed and freed. Layer
        by layer this comes as soon as the walk leaves the layer; in memory, after the pass."""


class Driver(ABC):
    """Runs calibration windows through a model's decoder layers for `LayerObserver`s.

    ``model`` answers questions about the architecture (its family, its config,
    whether its embeddings are tied): the model itself in memory, a skeleton on
    the meta device layer by layer. ``windows`` (and the ``pad_id`` that goes with them) are prepared on first use, so a
    metric that reads no text (the order baselines) tokenizes nothing.
    """

    how: str  # "in memory" or "layer by layer", for messages
    parked: torch.device | None = (
        None  # where an observer keeps rows that wait for a later layer (None: where they are)
    )

    def __init__(self, model: nn.Module, prepare: Callable[[], tuple[TokenWindows, int]]):
        self.model = model
        self._prepare, self._prepared = prepare, None
        self.num_layers = len(find_decoder_layers(model).layers)

    @property
    def windows(self) -> TokenWindows:
        """The calibration windows, tokenized on first use."""
        if self._prepared is None:
            self._prepared = self._prepare()
        return self._prepared[0]

    @property
    def pad_id(self) -> int:
        """The token that pads the last batch (masked out everywhere)."""
        self.windows  # noqa: B018  (prepares them)
        return self._prepared[1]

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where running sums are best kept (the device layers run on)."""

    @abstractmethod
    def run(self, observer: LayerObserver, desc: str, progress: bool = True) -> None:
        """One pass of every calibration batch through layers ``0..observer.through``."""


class _Done(Exception):
    """Raised by a hook once a pass has everything it needs from a batch."""


class InMemoryDriver(Driver):
    """The model in memory: each batch runs through the model's own forward, and hooks
    hand every layer's input and output to the observer. Works on models dispatched
    with an accelerate ``device_map``: each layer's tensors stay on its own device."""

    how = "in memory"

    def __init__(self, model: nn.Module, prepare: Callable[[], tuple[TokenWindows, int]], batch_size: int = 8):
        super().__init__(model, prepare)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    @torch.no_grad()
    def run(self, observer: LayerObserver, desc: str, progress: bool = True) -> None:
        layers = find_decoder_layers(self.model).layers
        state: dict[str, Any] = {}
        masks: dict[torch.device, torch.Tensor] = {}
        handles = []

        def mask_on(device: torch.device) -> torch.Tensor:
            if device not in masks:
                masks[device] = state["mask"].to(device)
            return masks[device]

        def before(i: int):
            def hook(module, args, kwargs):
                state[i] = args[0] if args else kwargs["hidden_states"]

            return hook

        def after(i: int):
            def hook(module, args, kwargs, output):
                y = output[0] if isinstance(output, tuple) else output
                # The pre-hook runs before accelerate moves a layer's inputs to its device: move x there too.
                x = state.pop(i).to(y.device)
                observer.observe(i, state["batch"], x, y, mask_on(y.device), state.pop(("tap", i), None))
                if i == observer.through:
                    raise _Done

            return hook

        def tapped(i: int):
            def hook(module, args, output):
                state["tap", i] = output

            return hook

        for i in range(observer.through + 1):
            handles.append(layers[i].register_forward_pre_hook(before(i), with_kwargs=True))
            handles.append(layers[i].register_forward_hook(after(i), with_kwargs=True))
            if i in observer.taps:
                handles.append(layers[i].get_submodule(observer.taps[i]).register_forward_hook(tapped(i)))
        device = self.device
        windows = self.windows
        with eval_mode(self.model):
            try:
                bar = tqdm(total=windows.num_tokens, unit="tok", desc=desc, disable=not progress)
                for b, (ids, mask) in enumerate(windows.batches(self.batch_size, self.pad_id)):
                    state.clear()
                    masks.clear()
                    state["batch"], state["mask"] = b, mask.reshape(-1).bool()
                    try:
                        self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                    except _Done:
                        pass
                    bar.update(int(mask.sum()))
                bar.close()
            finally:
                for h in handles:
                    h.remove()
        for i in range(observer.through + 1):
            observer.finish(i)
