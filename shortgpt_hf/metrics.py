"""Layer importance metrics: one class each, registered by name, computed through `drivers`.

A low score means "this layer barely changes the residual stream, remove it
first". Every metric reads layers only through the `LayerObserver` protocol,
so the same code scores a model in memory and one walked layer by layer from
its shards, with the same numbers.

Hidden-state metrics compare each layer's raw input and raw output (never the
final-normed hidden state that the paper's reference code compares the last
layer with), row by row in fp32, padding masked out, one running sum per
layer kept. Order metrics are the paper's baselines and need no text.

A new metric is a `Metric` subclass decorated with `register_metric`; the CLI,
`score_layers`, the layer walk, the ablation and the README's list pick it up.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .drivers import Driver, LayerObserver
from .registry import METRICS


@dataclass
class Scored:
    """What a metric computed: one score per layer (or per block), and for a greedy
    metric the layers in the order it chose them."""

    scores: list[float]
    order: list[int] | None = None


class Metric(ABC):
    """A way of ranking layers. ``reads_text``: it needs calibration windows;
    ``seeded``: its ranking depends on the ``seed``; ``blocks``: it can rank blocks
    of consecutive layers; ``greedy``: it chooses a whole removal step by step
    (``max_layers`` steps) instead of scoring each layer alone."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reads_text: ClassVar[bool] = True
    seeded: ClassVar[bool] = False
    blocks: ClassVar[bool] = False
    greedy: ClassVar[bool] = False

    @abstractmethod
    def score(self, driver: Driver, *, block_size: int, seed: int, max_layers: int, progress: bool) -> Scored:
        """Rank the driver's model's current layers."""


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: make a metric available everywhere under ``cls.name`` (a taken name is refused)."""
    METRICS.add(cls.name, cls())
    return cls


class HiddenStateMetric(Metric):
    """A per-token term between a layer's (or block's) input and output, averaged over real tokens."""

    @abstractmethod
    def term(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One value per row of ``x`` and ``y`` (``[tokens, hidden]``, float32)."""

    def score(self, driver: Driver, *, block_size: int, seed: int, max_layers: int, progress: bool) -> Scored:
        sums = _TermSums(self, driver.num_layers, block_size, driver.parked)
        driver.run(sums, f"scoring ({self.name}, {driver.how})", progress)
        return Scored([float(s.item()) / driver.windows.num_tokens for s in sums.sums])

    def masked_sum(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The term summed over real tokens, in float64."""
        # Compute on every row and zero the padding afterwards: cheaper than copying out
        # the real rows, and torch.where keeps a NaN in a pad row out of the sum.
        x = x.reshape(-1, x.shape[-1]).float()
        y = y.reshape(-1, y.shape[-1]).float()
        return torch.where(mask, self.term(x, y), 0).sum(dtype=torch.float64)


class _TermSums(LayerObserver):
    """Running sums of a hidden-state metric per block of ``block_size`` layers (per layer when 1)."""

    def __init__(self, metric: HiddenStateMetric, num_layers: int, block_size: int, parked: torch.device | None):
        self.metric, self.block_size, self.parked = metric, block_size, parked
        self.through = num_layers - 1
        self.num_blocks = num_layers - block_size + 1
        self.sums: list[Any] = [None] * self.num_blocks
        self.open: dict[tuple[int, int], torch.Tensor] = {}  # (batch, block start) -> the block's input

    def observe(self, layer: int, batch: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, tap: Any) -> None:
        if self.block_size > 1 and layer < self.num_blocks:  # a block's input waits for its last layer
            self.open[batch, layer] = x if self.parked is None else x.to(self.parked)
        start = layer - self.block_size + 1
        if start < 0:
            return
        first = self.open.pop((batch, start)).to(y.device) if self.block_size > 1 else x
        total = self.metric.masked_sum(first, y, mask.to(y.device))
        self.sums[start] = total if self.sums[start] is None else self.sums[start] + total


@register_metric
class BlockInfluence(HiddenStateMetric):
    name = "bi"
    summary = "Block Influence, 1 - cos(input, output): the paper's metric"

    def term(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(x, y, dim=-1)


@register_metric
class AngularDistance(HiddenStateMetric):
    name = "angular"
    summary = "arccos(cos(input, output)) / pi; with block_size n, of n consecutive layers (Gromov et al.)"
    blocks = True

    def term(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.arccos(F.cosine_similarity(x, y, dim=-1).clamp(-1, 1)) / math.pi


@register_metric
class RelativeMagnitude(HiddenStateMetric):
    name = "relative_magnitude"
    summary = "||f(x)|| / ||x + f(x)||, the size of a layer's update relative to its output"

    def term(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y - x).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)


class OrderMetric(Metric):
    """A baseline that ranks layers by position or at random; it reads no text."""

    reads_text = False

    @abstractmethod
    def order_scores(self, num_layers: int, seed: int) -> list[float]: ...

    def score(self, driver: Driver, *, block_size: int, seed: int, max_layers: int, progress: bool) -> Scored:
        return Scored(self.order_scores(driver.num_layers, seed))


@register_metric
class Sequential(OrderMetric):
    name = "sequential"
    summary = "remove from the first layer onwards (baseline)"

    def order_scores(self, num_layers: int, seed: int) -> list[float]:
        return [float(i) for i in range(num_layers)]


@register_metric
class Reverse(OrderMetric):
    name = "reverse"
    summary = "remove from the last layer backwards (baseline)"

    def order_scores(self, num_layers: int, seed: int) -> list[float]:
        return [float(num_layers - 1 - i) for i in range(num_layers)]


@register_metric
class Random(OrderMetric):
    name = "random"
    summary = "a random order, seeded (baseline)"
    seeded = True

    def order_scores(self, num_layers: int, seed: int) -> list[float]:
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(num_layers, generator=gen, dtype=torch.float64).tolist()
