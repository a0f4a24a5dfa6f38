"""Turning a request ("these layers", "8 layers", "25%") into a list of layer indices.

Kept apart from the surgery so the CLI can refuse an impossible request (zero
layers, all layers) before it spends minutes scoring, and so every caller
counts "25% of N layers" the same way.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from decimal import ROUND_FLOOR, Decimal
from typing import Protocol

from .errors import InvalidRequest


class Ranking(Protocol):
    """What choosing by score needs of `LayerScores`: how many layers it ranks, and its lowest n."""

    num_layers: int

    def lowest(self, n: int) -> list[int]: ...


def removal_count(num_layers: int, n_layers: int | None = None, ratio: float | None = None) -> int:
    """How many layers ``n_layers`` or ``ratio`` removes, refusing none or all (cheap: check before scoring).

    A ratio removes ``ratio * num_layers`` layers rounded to the nearest whole
    layer, halves up: 25% of 18 layers is 5 and 25% of 30 is 8. Python's
    ``round`` would round halves to even (4 of 18 but 8 of 30), and float
    arithmetic would put 0.35 * 30 just below 10.5; the ratio is read as the
    decimal the user wrote instead."""
    if ratio is not None:
        if not 0 < ratio < 1:
            raise InvalidRequest(f"ratio must be between 0 and 1, got {ratio}")
        n_layers = int((Decimal(repr(float(ratio))) * num_layers + Decimal("0.5")).to_integral_value(ROUND_FLOOR))
        if n_layers == 0:
            raise InvalidRequest(f"ratio {ratio} removes zero of {num_layers} layers")
    if not 0 < n_layers < num_layers:
        raise InvalidRequest(
            f"the number of layers to remove must be between 1 and {num_layers - 1} (of {num_layers}), got {n_layers}"
        )
    return n_layers


def _index(value: object) -> int:
    """A layer index: an int (or numpy / 0-d torch integer), never a float or a bool silently truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise InvalidRequest(f"layer indices must be integers, got {value!r}") from None


def select_layers(
    num_layers: int,
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
    ratio: float | None = None,
    scores: Ranking | None = None,
) -> list[int]:
    """Turn one of the three ways of asking into a sorted list of CURRENT layer indices."""
    given = [k for k, v in (("layers", layers), ("n_layers", n_layers), ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise InvalidRequest(f"give exactly one of layers, n_layers or ratio (got {', '.join(given) or 'none'})")
    if layers is not None:
        chosen = check_layers(num_layers, layers)
    else:
        count = removal_count(num_layers, n_layers, ratio)
        if scores is None:
            raise InvalidRequest("n_layers and ratio need scores (from score_layers) to choose layers")
        if scores.num_layers != num_layers:
            raise InvalidRequest(
                f"scores cover {scores.num_layers} layers but the model has {num_layers}; re-score the model"
            )
        chosen = scores.lowest(count)
    return sorted(chosen)


def check_layers(num_layers: int, layers: Sequence[int]) -> list[int]:
    """Explicit layer indices, refused when they are not integers, repeat, fall
    outside the model, or name none or all of its layers (cheap: check before loading)."""
    chosen = [_index(i) for i in layers]
    if len(set(chosen)) != len(chosen):
        raise InvalidRequest(f"duplicate layer indices in {chosen}")
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise InvalidRequest(f"layer indices {bad} are out of range 0..{num_layers - 1}")
    if not chosen:
        raise InvalidRequest("no layers to remove")
    if len(chosen) >= num_layers:
        raise InvalidRequest(f"cannot remove all {num_layers} layers")
    return chosen
