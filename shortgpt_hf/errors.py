"""The exceptions that mean "this cannot be done, and here is why in one line",
and the one place that turns faults of the world outside (a full disk, a
folder we may not write, a Hub that does not answer) into one line as well.

`ShortGPTError` is the base class: the CLI prints any of them as one line.
A caller that must react differently catches a subclass: a request that makes
no sense (`InvalidRequest`), a model we cannot prune (`UnsupportedModel`), a
result that failed its own check (`VerificationFailed`), or a model, file or
Hub that is not there (`SourceUnavailable`)."""

from __future__ import annotations

import re


class ShortGPTError(ValueError):
    """A user mistake, an unsupported model or an environment fault, explained in one line.

    The CLI prints these as ``shortgpt: error: <message>`` and exits with status 2
    without a traceback; anything else that escapes is a bug in shortgpt_hf and
    keeps its traceback.
    """


class InvalidRequest(ShortGPTError):
    """The request itself is wrong, whatever the model: a ratio outside (0, 1), an
    unknown metric, a layer index out of range, options that exclude each other."""


class UnsupportedModel(ShortGPTError):
    """The request is fine but this model's family, configuration or placement cannot take it."""


class VerificationFailed(ShortGPTError):
    """A pruned or repaired model failed a check against its definition; it was not kept."""


class SourceUnavailable(ShortGPTError):
    """A model, recipe, adapter, tokenizer or file is not where it was looked for (disk or Hub)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def fault(e: BaseException) -> str | None:
    """What went wrong outside the program, in words, or None when ``e`` is not such a fault.

    Covers what a user can meet without a bug on our side: operating-system
    errors (permission denied, no space left, a missing file), safetensors'
    I/O errors (it reports a full disk as ``SafetensorError``, not ``OSError``),
    and network failures of huggingface_hub's HTTP client."""
    from safetensors import SafetensorError

    if isinstance(e, OSError) and type(e).__module__.startswith("huggingface_hub"):
        return first_line(e)  # OfflineModeIsEnabled and friends: their message is the explanation
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{(e.strerror or first_line(e)).rstrip('.').lower()}{where}"
    if isinstance(e, SafetensorError):
        io = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", first_line(e))
        return io.group(1).lower() if io else None
    try:
        import httpx
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        return None
    if isinstance(e, httpx.TransportError):
        return f"network error ({type(e).__name__}: {first_line(e)})"
    return None
