"""Turning a request ("these layers", "8 layers", "25%") into a list of layer indices.

Kept apart from the surgery so the CLI can refuse an impossible request (zero
layers, all layers) before it spends minutes scoring, and so every caller
counts "25% of N layers" the same way.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import ShortGPTError

if TYPE_CHECKING:
    from .scoring import LayerScores


def removal_count(num_layers: int, n_layers: int | None = None, ratio: float | None = None) -> int:
    """How many layers ``n_layers`` or ``ratio`` removes, refusing none or all (cheap: check before scoring)."""
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ShortGPTError(f"ratio must be between 0 and 1, got {ratio}")
        n_layers = round(ratio * num_layers)
        if n_layers == 0:
            raise ShortGPTError(f"ratio {ratio} removes zero of {num_layers} layers")
    if not 0 < n_layers < num_layers:
        raise ShortGPTError(f"n_layers must remove between 1 and {num_layers - 1} of {num_layers} layers, got {n_layers}")
    return n_layers


def _index(value: object) -> int:
    """A layer index: an int (or numpy / 0-d torch integer), never a float or a bool silently truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ShortGPTError(f"layer indices must be integers, got {value!r}") from None


def select_layers(
    num_layers: int,
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
    ratio: float | None = None,
    scores: "LayerScores | None" = None,
) -> list[int]:
    """Turn one of the three ways of asking into a sorted list of CURRENT layer indices."""
    given = [k for k, v in (("layers", layers), ("n_layers", n_layers), ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise ShortGPTError(f"give exactly one of layers, n_layers or ratio (got {', '.join(given) or 'none'})")
    if layers is not None:
        chosen = [_index(i) for i in layers]
        if len(set(chosen)) != len(chosen):
            raise ShortGPTError(f"duplicate layer indices in {chosen}")
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise ShortGPTError(f"layer indices {bad} are out of range 0..{num_layers - 1}")
    else:
        count = removal_count(num_layers, n_layers, ratio)
        if scores is None:
            raise ShortGPTError("n_layers and ratio need scores (from score_layers) to choose layers")
        if scores.num_layers != num_layers:
            raise ShortGPTError(
                f"scores cover {scores.num_layers} layers but the model has {num_layers}; re-score the model"
            )
        chosen = scores.lowest(count)
    if not chosen:
        raise ShortGPTError("no layers to remove")
    if len(chosen) >= num_layers:
        raise ShortGPTError(f"cannot remove all {num_layers} layers")
    return sorted(chosen)
