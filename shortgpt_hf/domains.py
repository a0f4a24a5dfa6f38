"""A held-out evaluation suite across five genres, none of its text ever calibrated on.

A repair fitted on one genre learns that genre: measured only there, it looks
like recovery when it is adaptation. The suite measures a pruned model on:

- ``drama``: the packaged held-out plays (the calibration reads four others);
- ``encyclopedia``: five packaged Wikipedia articles (the calibration reads eleven others);
- ``code``: four standard-library modules (the calibration reads six others);
- ``technical``: Python's documentation topics (``pydoc_data.topics``);
- ``legal``: the licence text CPython installs beside its standard library.

A domain's ``calibrated`` flag says whether the default calibration reads its
genre; ``technical`` and ``legal`` are *unseen*, and their mean is the suite's
unseen score. The last three are read at run time from the running
interpreter, so their licences are Python's own (the PSF licence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .texts import HELDOUT_CODE_MODULES, encyclopedia_articles, heldout_texts, stdlib_file


@dataclass(frozen=True)
class Domain:
    name: str
    genre: str
    source: str  # where the text comes from, for reports and cards
    read: Callable[[], list[str]]
    calibrated: bool  # whether the packaged calibration reads this genre


def _documentation() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


DOMAINS = (
    Domain("drama", "narrative and drama", "Shakespeare: Othello, Twelfth Night (packaged)", heldout_texts, True),
    Domain(
        "encyclopedia",
        "encyclopedic prose",
        "Wikipedia: five articles (packaged)",
        lambda: [a["text"] for a in encyclopedia_articles("heldout")],
        True,
    ),
    Domain(
        "code",
        "source code",
        f"Python's standard library: {', '.join(HELDOUT_CODE_MODULES)}",
        lambda: [stdlib_file(m) for m in HELDOUT_CODE_MODULES],
        True,
    ),
    Domain("technical", "technical prose", "Python's documentation topics (pydoc_data)", _documentation, False),
    Domain("legal", "legal and formal text", "Python's LICENSE.txt", lambda: [stdlib_file("LICENSE.txt")], False),
)
