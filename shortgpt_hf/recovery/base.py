"""The one interface every recovery method implements, and what they share.

Recovery wins back some of what removing layers cost, after the removal. The
methods differ (train LoRA adapters, fold a fitted map into existing
weights...), but everything around them is the same and lives here, once:
refusing a model that was not pruned, turning calibration data into windows,
measuring held-out perplexity before and after, and appending an entry to
``config.shortgpt["recovery"]``, which the model card shows and a saved
checkpoint keeps. Methods compose in order: each entry records one step.

A method is one module: a `RecoveryMethod` subclass decorated with
`register`, and `recover(model, "<name>", ...)` runs it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn

from ..calibration import CalibrationData, TokenWindows, is_tokenized, prepare_calibration
from ..config import ShortGPTConfig
from ..errors import ShortGPTError
from ..loading import tokenizer_for


class RecoveryMethod(ABC):
    """One way of recovering a pruned model. Subclasses set ``name`` and implement `check` and `apply`."""

    name: ClassVar[str]

    def check(self, model: nn.Module, **options: Any) -> None:
        """Refuse bad options or an unsupported model before any data is prepared (cheap)."""

    @abstractmethod
    def apply(self, model: nn.Module, windows: TokenWindows, tokenizer: Any, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
        """Recover ``model`` from calibration ``windows``; return the recovered model and what to record."""


RECOVERY_METHODS: dict[str, RecoveryMethod] = {}


def register(cls: type[RecoveryMethod]) -> type[RecoveryMethod]:
    """Class decorator: make a method available to `recover` (and the CLI) under ``cls.name``."""
    RECOVERY_METHODS[cls.name] = cls()
    return cls


def recovered_base(model: nn.Module) -> nn.Module:
    """The transformers model inside a recovered one (a PEFT model wraps it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def recover(
    model: nn.Module,
    method: str,
    data: CalibrationData = None,
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    eval_data: CalibrationData = None,
    eval_tokens: int = 4096,
    **options: Any,
) -> nn.Module:
    """Run recovery ``method`` on a pruned model and record it in ``config.shortgpt["recovery"]``.

    ``data`` is the calibration or training text (default: the packaged
    calibration plays); with ``eval_data``, held-out perplexity before and
    after is measured and recorded. ``options`` go to the method.
    """
    from ..evaluation import perplexity

    if method not in RECOVERY_METHODS:
        raise ShortGPTError(f"unknown recovery method {method!r}; choose from {', '.join(RECOVERY_METHODS)}")
    record = ShortGPTConfig.from_model(model)
    if record is None or record.mode != "remove":
        raise ShortGPTError("recovery needs a model with layers removed (prune it first)")
    chosen = RECOVERY_METHODS[method]
    try:  # a misspelt option fails here, in one line, not after minutes of evaluation
        inspect.signature(chosen.apply).bind(model, None, None, **options)
    except TypeError as e:
        raise ShortGPTError(f"recovery method {method!r}: {e}") from None
    chosen.check(model, **options)
    if tokenizer is None and not (is_tokenized(data) and (eval_data is None or is_tokenized(eval_data))):
        tokenizer = tokenizer_for(model)
    windows = prepare_calibration(data, tokenizer, seq_len)
    ppl = dict(seq_len=seq_len, max_tokens=eval_tokens)
    before = perplexity(model, tokenizer, eval_data, **ppl) if eval_data is not None else None
    recovered, details = chosen.apply(model, windows, tokenizer, **options)
    entry = {"method": method, **details, "data": windows.description}
    if before is not None:
        entry.update(perplexity_before=round(before, 4), perplexity_after=round(perplexity(recovered, tokenizer, eval_data, **ppl), 4))
    base = recovered_base(recovered)
    base.config.shortgpt = {**base.config.shortgpt, "recovery": [*(base.config.shortgpt.get("recovery") or []), entry]}
    return recovered
