"""Per-layer importance scores: Block Influence and the paper's baselines.

A low score means "this layer barely changes the residual stream, remove it
first". Hidden-state metrics are measured with hooks on the decoder layers:
each layer's raw input and raw output (never the final-normed hidden state the
reference code compares the last layer with), row-wise cosine in fp32,
padding masked out, and only one running sum per layer kept, so memory does
not grow with the number of layers or tokens and no logits are computed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationData, TokenWindows, is_tokenized, prepare_calibration
from .errors import ShortGPTError
from .layers import eval_mode, find_decoder_layers, input_device
from .loading import tokenizer_for
from .records import JsonRecord

HIDDEN_STATE_METRICS = ("bi", "angular", "relative_magnitude")
ORDER_METRICS = ("sequential", "reverse", "random")
REPAIR_METRICS = ("linear_residual",)  # a greedy choice of a whole removal, made for linear repair
METRICS = HIDDEN_STATE_METRICS + ORDER_METRICS + REPAIR_METRICS


@dataclass
class LayerScores(JsonRecord):
    """Scores for the model's CURRENT layers (or, with ``block_size`` n > 1, for each
    block of n consecutive layers, indexed by its first layer).

    A greedy metric (``linear_residual``) also keeps ``order``, the layers in
    the order it chose them: the best removal of n layers is its first n,
    which the scores alone (each layer's cost when it was chosen) cannot say.
    """

    metric: str
    scores: list[float]
    num_layers: int
    num_tokens: int = 0
    calibration: str | None = None
    seq_len: int | None = None
    block_size: int = 1
    order: list[int] | None = None

    def lowest(self, n: int) -> list[int]:
        """The ``n`` layers to remove first: lowest scores, ties broken by index (or a greedy metric's first ``n``)."""
        if self.order is not None:
            if n > len(self.order):
                raise ShortGPTError(
                    f"these {self.metric} scores chose only {len(self.order)} layers; "
                    f"re-score asking for {n} or more (max_layers / --lowest)"
                )
            return sorted(self.order[:n])
        if self.block_size > 1:
            if n != self.block_size:
                raise ShortGPTError(
                    f"these {self.metric} scores rank blocks of {self.block_size} layers; "
                    f"remove exactly {self.block_size}"
                )
            start = min(range(len(self.scores)), key=lambda i: (self.scores[i], i))
            return list(range(start, start + n))
        return sorted(sorted(range(len(self.scores)), key=lambda i: (self.scores[i], i))[:n])

    def calibration_summary(self) -> dict[str, Any]:
        return {"description": self.calibration, "num_tokens": self.num_tokens, "seq_len": self.seq_len}

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> LayerScores:
        path = Path(text_or_path)
        text = path.read_text() if path.suffix == ".json" and path.is_file() else str(text_or_path)
        return cls(**json.loads(text))

    def plot(self, path: str | Path, highlight: int = 0, title: str | None = None) -> Path:
        """A bar chart of the scores, the ``highlight`` lowest in a second colour."""
        xlabel = "layer" if self.block_size == 1 else f"first layer of {self.block_size}-layer block"
        title = title or f"{self.metric} per layer ({self.num_tokens} tokens)" + (
            f", red: lowest {highlight}" if highlight else ""
        )
        chosen = set(self.lowest(highlight)) if highlight else set()
        return bar_chart(dict(enumerate(self.scores)), chosen, path, xlabel=xlabel, ylabel=self.metric, title=title)


def bar_chart(
    values: dict[int, float], highlighted: set[int], path: str | Path, *, xlabel: str, ylabel: str, title: str
) -> Path:
    """Per-layer bars, ``highlighted`` layers in red (the score chart of the CLI and the model card).

    Drawn on a bare matplotlib ``Figure``, never through pyplot, so a notebook's
    backend and open figures are left alone; missing parent folders are made, and
    the file is written atomically."""
    from matplotlib.figure import Figure

    from .atomic import save_figure

    fig = Figure(figsize=(max(6, 0.28 * (max(values) + 1)), 3.2))
    ax = fig.subplots()
    ax.bar(list(values), list(values.values()), color=["tab:red" if i in highlighted else "tab:blue" for i in values])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _order_scores(metric: str, num_layers: int, seed: int) -> list[float]:
    if metric == "sequential":  # remove from the first layer onwards
        return [float(i) for i in range(num_layers)]
    if metric == "reverse":  # remove from the last layer backwards
        return [float(num_layers - 1 - i) for i in range(num_layers)]
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_layers, generator=gen, dtype=torch.float64).tolist()


def layer_term(metric: str, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sum over real tokens (``mask``) of one hidden-state metric between a
    layer's input ``x`` and output ``y``, in float64: what every scorer adds up."""
    # Compute on every row and zero the padding afterwards: cheaper than copying out
    # the real rows, and torch.where keeps a NaN in a pad row out of the sum.
    x = x.reshape(-1, x.shape[-1]).float()
    y = y.reshape(-1, y.shape[-1]).float()
    if metric == "relative_magnitude":  # ||f(x)|| / ||x + f(x)||, f(x) = y - x
        term = (y - x).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)
    else:
        cos = F.cosine_similarity(x, y, dim=-1)
        term = 1 - cos if metric == "bi" else torch.arccos(cos.clamp(-1, 1)) / math.pi
    return torch.where(mask, term, 0).sum(dtype=torch.float64)


class _Accumulator:
    """Hooks that add one metric term per (masked) token to a per-block running sum."""

    def __init__(self, metric: str, layers: nn.ModuleList, block_size: int):
        self.metric = metric
        self.block_size = block_size
        self.num_blocks = len(layers) - block_size + 1
        self.sums: list[torch.Tensor | None] = [None] * self.num_blocks
        self.inputs: dict[int, torch.Tensor] = {}
        self.masks: dict[torch.device, torch.Tensor] = {}  # this batch's token mask, per layer device
        self.handles = []
        for i, layer in enumerate(layers):
            if i < self.num_blocks:
                self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            if i >= block_size - 1:
                self.handles.append(layer.register_forward_hook(self._post(i - block_size + 1), with_kwargs=True))

    def _pre(self, start: int):
        def hook(module, args, kwargs):
            self.inputs[start] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _post(self, start: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            self._add(start, self.inputs.pop(start), out)

        return hook

    def set_mask(self, mask: torch.Tensor) -> None:
        self.masks = {mask.device: mask.reshape(-1).bool()}

    def _add(self, start: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if y.device not in self.masks:
            self.masks[y.device] = next(iter(self.masks.values())).to(y.device)
        total = layer_term(self.metric, x, y, self.masks[y.device])
        self.sums[start] = total if self.sums[start] is None else self.sums[start] + total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def score_layers(
    model: nn.Module,
    calibration: CalibrationData = None,
    metric: str = "bi",
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = 8192,
    block_size: int = 1,
    text_column: str = "text",
    seed: int = 0,
    max_layers: int | None = None,
    progress: bool = True,
) -> LayerScores:
    """Score every current decoder layer; low = least influential.

    ``calibration`` may be None (packaged Shakespeare), a text file path, a list
    of strings, a ``datasets.Dataset`` (``text_column``), or token tensors. It
    is cut into windows of ``seq_len`` tokens and truncated to ``max_tokens``.
    Works on models dispatched with an accelerate ``device_map``: each layer's
    sum stays on that layer's device.

    ``linear_residual`` chooses for linear repair (`prune(..., recovery="linear")`):
    greedily, the layer whose removal leaves the least error after each gap's
    best least-squares map, one calibration pass per layer chosen, up to
    ``max_layers`` (default: half the layers).
    """
    if metric not in METRICS:
        raise ShortGPTError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    layers = find_decoder_layers(model).layers
    num_layers = len(layers)
    if block_size != 1 and metric != "angular":
        raise ShortGPTError("block_size > 1 is defined for the angular metric only (Gromov et al.)")
    if not 1 <= block_size < num_layers:
        raise ShortGPTError(f"block_size must be between 1 and {num_layers - 1}, got {block_size}")
    if metric in ORDER_METRICS:
        return LayerScores(
            metric,
            _order_scores(metric, num_layers, seed),
            num_layers,
            calibration=f"none (seed {seed})" if metric == "random" else None,
        )

    if tokenizer is None and not is_tokenized(calibration):
        tokenizer = tokenizer_for(model)
    windows: TokenWindows = prepare_calibration(calibration, tokenizer, seq_len, max_tokens, text_column)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    if metric in REPAIR_METRICS:
        from .recovery.linear import repair_aware_order

        steps = num_layers // 2 if max_layers is None else max_layers
        if not 1 <= steps < num_layers:
            raise ShortGPTError(f"max_layers must be between 1 and {num_layers - 1}, got {steps}")
        order, added = repair_aware_order(model, windows, pad_id, steps, batch_size=batch_size, progress=progress)
        return LayerScores(metric, added, num_layers, windows.num_tokens, windows.description, seq_len, order=order)
    device = input_device(model)
    acc = _Accumulator(metric, layers, block_size)
    with eval_mode(model):
        try:
            bar = tqdm(total=windows.num_tokens, unit="tok", desc=f"scoring ({metric})", disable=not progress)
            for ids, mask in windows.batches(batch_size, pad_id):
                acc.set_mask(mask)
                model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                bar.update(int(mask.sum()))
            bar.close()
        finally:
            acc.remove()
    scores = [float(s.item()) / windows.num_tokens for s in acc.sums]
    return LayerScores(metric, scores, num_layers, windows.num_tokens, windows.description, seq_len, block_size)
