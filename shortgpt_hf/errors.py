"""The one exception type that means "the user asked for something impossible"."""


class ShortGPTError(ValueError):
    """A user mistake or an unsupported model, explained in one line.

    The CLI prints these as ``error: <message>`` and exits non-zero without a
    traceback; anything else that escapes is a bug in shortgpt_hf and keeps its
    traceback.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
