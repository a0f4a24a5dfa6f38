"""The one interface every recovery method implements, and what they share.

Recovery wins back some of what removing layers cost, after the removal. The
methods differ (train LoRA adapters, fold a fitted map into existing
weights...), but everything around them is the same and lives here, once:
refusing a model that was not pruned, turning calibration data into windows,
measuring held-out perplexity before and after, and appending an entry to
``config.shortgpt["recovery"]``, which the model card shows and a saved
checkpoint keeps. Methods compose in order: each entry records one step.

A method is one module: a `RecoveryMethod` subclass decorated with
`register`; `recover(model, "<name>", ...)` runs it on a pruned model, and
``prune(model, ..., recovery="<name>")`` runs it as part of pruning, which is
how a method that learns from the removed layers gets to see them.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..calibration import CalibrationData, TokenWindows, is_tokenized, prepare_calibration
from ..config import ShortGPTConfig
from ..drivers import Driver, InMemoryDriver
from ..errors import InvalidRequest
from ..evaluation import HEADLINE, PerplexitySettings, perplexity
from ..reading import tokenizer_for
from ..registry import RECOVERY_METHODS


class RecoveryMethod(ABC):
    """One way of recovering a pruned model. Subclasses set ``name`` and ``summary`` and
    implement `apply` (and `check`, to refuse early).

    A training-free method learns from the layers being removed
    (``needs_removed_layers``) and also implements `fit`, through a `Driver`:
    `prune` calls it while those layers still exist in memory, and the layer walk
    calls it on a model that never is, with the same numbers. What it returns
    goes to `apply` as ``fitted`` (in memory) or to ``streaming.materialize``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_removed_layers: ClassVar[bool] = False

    def option_names(self) -> set[str] | None:
        """The options this method takes: the keyword parameters of `apply`, but for ``fitted``,
        which the pipeline passes; None (any) when `apply` takes ``**options`` and the method
        says no more. A method that checks its ``**options`` itself overrides this."""
        parameters = inspect.signature(self.apply).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        after_data = [p for p in parameters if p.kind in named][3:]  # after the model, windows and tokenizer
        return {p.name for p in after_data} - {"fitted"}

    def refuse_unknown(self, options: dict[str, Any]) -> None:
        """A misspelt option fails in one line when a request or a step is built, not after minutes of work."""
        names = self.option_names()
        unknown = sorted(set(options) - names) if names is not None else []
        if unknown:
            raise InvalidRequest(f"recovery method {self.name!r}: got an unexpected keyword argument {unknown[0]!r}")

    def check(self, model: nn.Module, **options: Any) -> None:
        """Refuse bad options or an unsupported model before any data is prepared (cheap).

        Optional: the default accepts everything; a subclass overrides it to refuse early.
        """
        return None

    def fit(self, driver: Driver, removing: list[int], **options: Any) -> Any:
        """Measure, through ``driver`` on the model before ``removing`` (current indices) are removed,
        what `apply` needs."""
        raise NotImplementedError(f"recovery method {self.name!r} does not fit on removed layers")

    @abstractmethod
    def apply(
        self, model: nn.Module, windows: TokenWindows, tokenizer: Any, **options: Any
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Recover ``model`` from calibration ``windows``; return the recovered model and what to record."""


def register(cls: type[RecoveryMethod]) -> type[RecoveryMethod]:
    """Class decorator: make a method available to `recover`, `prune`, the ablation and the CLI
    under ``cls.name`` (a name already taken is refused)."""
    RECOVERY_METHODS.add(cls.name, cls())
    return cls


def keyword_options(function: Any) -> set[str]:
    """The keyword-only parameters of ``function``: the options a method names in its signature
    (`FoldedRepair` in ``fit``'s, `TrainingRecovery` in ``apply``'s beside the shared ones)."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def takes_option(method: str, option: str) -> bool:
    """Whether registered method ``method`` accepts ``option`` (``progress``, say), so a caller
    can pass a common option only to the methods that have it."""
    names = RECOVERY_METHODS.get_or_refuse(method).option_names()
    return names is None or option in names


def recovered_base(model: nn.Module) -> nn.Module:
    """The transformers model inside a recovered one (a PEFT model wraps it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class RecoveryStep:
    """A recovery step checked and ready to run: its method, options and calibration windows.

    `plan` builds it before anything expensive happens, so a misspelt option or
    an unsupported model fails in one line before any scoring, fitting or
    evaluation; `run` applies it and records it.
    """

    method: RecoveryMethod
    windows: TokenWindows
    tokenizer: Any
    options: dict[str, Any]
    seq_len: int
    eval_data: CalibrationData
    eval_tokens: int | None

    def fit(self, model: nn.Module, removing: list[int]) -> Any:
        """What `run` needs from layers about to be removed (None for methods that need none)."""
        if not self.method.needs_removed_layers:
            return None
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        driver = InMemoryDriver(model, lambda: (self.windows, pad_id), self.options.get("batch_size", 8))
        return self.method.fit(driver, removing, **self.options)


def plan(
    model: nn.Module,
    method: str,
    data: CalibrationData = None,
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    max_tokens: int | None = None,
    eval_data: CalibrationData = None,
    eval_tokens: int | None = HEADLINE.max_tokens,
    **options: Any,
) -> RecoveryStep:
    """Check ``method`` and its ``options`` against ``model`` and prepare the calibration windows
    (all of ``data``, or its first ``max_tokens`` tokens)."""
    chosen = RECOVERY_METHODS.get_or_refuse(method)
    chosen.refuse_unknown(options)
    chosen.check(model, **options)
    if tokenizer is None and not (is_tokenized(data) and (eval_data is None or is_tokenized(eval_data))):
        tokenizer = tokenizer_for(model)
    windows = prepare_calibration(data, tokenizer, seq_len, max_tokens)
    return RecoveryStep(chosen, windows, tokenizer, options, seq_len, eval_data, eval_tokens)


def run(model: nn.Module, step: RecoveryStep, fitted: Any = None) -> nn.Module:
    """Apply a planned step to a pruned model, measure it if asked, and append it to ``config.shortgpt["recovery"]``."""
    settings = PerplexitySettings(step.seq_len, None, step.eval_tokens)
    ppl = dict(seq_len=settings.seq_len, max_tokens=settings.max_tokens, progress=step.options.get("progress", True))
    before = perplexity(model, step.tokenizer, step.eval_data, **ppl) if step.eval_data is not None else None
    extra = {"fitted": fitted} if step.method.needs_removed_layers else {}
    recovered, details = step.method.apply(model, step.windows, step.tokenizer, **extra, **step.options)
    entry = {"method": step.method.name, **details, "data": step.windows.description}
    if before is not None:
        after = perplexity(recovered, step.tokenizer, step.eval_data, **ppl)
        entry.update(
            perplexity_before=round(before, 4),
            perplexity_after=round(after, 4),
            perplexity_settings=settings.describe(),
        )
    base = recovered_base(recovered)
    record = {**base.config.shortgpt, "fidelity": None}  # measured before this step, if at all: stale now
    base.config.shortgpt = {**record, "recovery": [*(record.get("recovery") or []), entry]}
    return recovered


def recover(
    model: nn.Module,
    method: str,
    data: CalibrationData = None,
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    max_tokens: int | None = None,
    eval_data: CalibrationData = None,
    eval_tokens: int | None = HEADLINE.max_tokens,
    **options: Any,
) -> nn.Module:
    """Run recovery ``method`` on a pruned model and record it in ``config.shortgpt["recovery"]``.

    ``data`` is the calibration or training text (default: the packaged
    calibration mixture), cut into ``seq_len``-token windows, at most
    ``max_tokens`` of them in all; with ``eval_data``, held-out perplexity before and
    after is measured and recorded. ``options`` go to the method. A method
    that learns from the removed layers themselves (``linear``) cannot run on
    a model that no longer has them: ask `prune` for it (``recovery=``).
    """
    record = ShortGPTConfig.from_model(recovered_base(model))
    if record is None or record.mode != "remove":
        raise InvalidRequest("recovery needs a model with layers removed (prune it first)")
    if method in RECOVERY_METHODS and RECOVERY_METHODS[method].needs_removed_layers:
        raise InvalidRequest(
            f"recovery method {method!r} is fitted on the layers being removed, which this model no longer has: "
            f"prune with prune(model, ..., recovery={method!r}) (CLI: shortgpt prune --recovery {method})"
        )
    step = plan(
        model,
        method,
        data,
        tokenizer=tokenizer,
        seq_len=seq_len,
        max_tokens=max_tokens,
        eval_data=eval_data,
        eval_tokens=eval_tokens,
        **options,
    )
    return run(model, step)
