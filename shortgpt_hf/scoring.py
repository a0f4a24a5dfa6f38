"""Per-layer importance scores (`LayerScores`), computed by any registered metric on either driver.

`score_layers` scores a model in memory; ``streaming.score_layers_sequentially``
one that need not fit, layer by layer from its shards. Both end in `score_with`,
so every metric (see `metrics`) gives the same scores, and picks the same
layers, whichever way the model is run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .calibration import CalibrationData, TokenWindows, is_tokenized, prepare_calibration
from .drivers import Driver, InMemoryDriver
from .errors import InvalidRequest, ShortGPTError
from .metrics import Metric
from .reading import tokenizer_for
from .records import JsonRecord
from .registry import METRICS


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
                raise InvalidRequest(
                    f"these {self.metric} scores chose only {len(self.order)} layers; "
                    f"re-score asking for {n} or more (max_layers / --lowest)"
                )
            return sorted(self.order[:n])
        if self.block_size > 1:
            if n != self.block_size:
                raise InvalidRequest(
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


def check_metric(name: str, block_size: int = 1) -> Metric:
    """The registered metric ``name``, refused in one line when it is unknown or cannot rank blocks."""
    metric = METRICS.get_or_refuse(name)
    if block_size != 1 and not metric.blocks:
        blocky = [m for m, entry in METRICS.items() if entry.blocks]
        raise InvalidRequest(f"block_size > 1 is defined for the {', '.join(blocky)} metric only (Gromov et al.)")
    return metric


def score_with(
    driver: Driver,
    metric: str = "bi",
    *,
    block_size: int = 1,
    seed: int = 0,
    max_layers: int | None = None,
    seq_len: int | None = None,
    progress: bool = True,
) -> LayerScores:
    """Score the driver's model with ``metric``: the one path both drivers share.

    A greedy metric (``linear_residual``) chooses ``max_layers`` layers (default:
    half of them), one calibration pass per layer chosen."""
    chosen = check_metric(metric, block_size)
    n = driver.num_layers
    if not 1 <= block_size < n:
        raise InvalidRequest(f"block_size must be between 1 and {n - 1}, got {block_size}")
    steps = n // 2 if max_layers is None else max_layers
    if chosen.greedy and not 1 <= steps < n:
        raise InvalidRequest(f"max_layers must be between 1 and {n - 1}, got {steps}")
    result = chosen.score(driver, block_size=block_size, seed=seed, max_layers=steps, progress=progress)
    if any(math.isnan(s) for s in result.scores):
        raise ShortGPTError(f"{metric} scores are NaN: the activations overflowed in this dtype (try float32)")
    if not chosen.reads_text:
        calibration = f"none (seed {seed})" if chosen.seeded else None
        return LayerScores(metric, result.scores, n, calibration=calibration)
    windows = driver.windows
    return LayerScores(
        metric, result.scores, n, windows.num_tokens, windows.description, seq_len, block_size, result.order
    )


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
    """Score every current decoder layer of a model in memory; low = least influential.

    ``calibration`` may be None (the packaged calibration text), a text file path,
    a list of strings, a ``datasets.Dataset`` (``text_column``), or token tensors.
    It is cut into windows of ``seq_len`` tokens and truncated to ``max_tokens``.
    Works on models dispatched with an accelerate ``device_map``: each layer's
    sum stays on that layer's device. ``metric`` is any registered metric
    (`METRICS`); ``max_layers`` is how far a greedy one goes.
    """
    check_metric(metric, block_size)
    driver = in_memory_driver(model, calibration, tokenizer, seq_len, max_tokens, batch_size, text_column)
    return score_with(
        driver, metric, block_size=block_size, seed=seed, max_layers=max_layers, seq_len=seq_len, progress=progress
    )


def in_memory_driver(
    model: nn.Module,
    calibration: CalibrationData,
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None,
    batch_size: int = 8,
    text_column: str = "text",
) -> InMemoryDriver:
    """An `InMemoryDriver` over ``calibration``, tokenized (with the model's own tokenizer when none is
    given) only when a pass first needs it."""

    def prepare() -> tuple[TokenWindows, int]:
        tok = tokenizer_for(model) if tokenizer is None and not is_tokenized(calibration) else tokenizer
        windows = prepare_calibration(calibration, tok, seq_len, max_tokens, text_column)
        return windows, getattr(tok, "pad_token_id", None) or 0

    return InMemoryDriver(model, prepare, batch_size)
