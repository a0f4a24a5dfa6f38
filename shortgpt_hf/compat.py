"""Quieting what the libraries we build on print that a user could not act on."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Wrapping a model with PEFT (to train it or to load an adapter) without the
    FutureWarning that peft 0.21 triggers by asking transformers 5 for a renamed
    property: it is nothing a user could act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
