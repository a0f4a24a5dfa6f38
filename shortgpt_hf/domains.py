"""A held-out evaluation suite across genres, read from what every Python install has.

A repair fitted on one genre learns that genre: measured only there, it looks
like recovery when it is adaptation. The suite measures a pruned model on
several genres, none of them text the packaged calibration reads:

- ``drama``: the packaged held-out plays (the calibration reads four others);
- ``technical``: Python's documentation topics (``pydoc_data.topics``);
- ``code``: a fixed set of the standard library's own ``.py`` sources;
- ``legal``: the licence text CPython installs beside its standard library.

Nothing is shipped for them: the last three are read at run time from the
running interpreter, so their licences are those of Python itself (the PSF
licence). A domain's ``calibrated`` flag says whether the packaged calibration
reads its genre; the others are *unseen*, and their mean is the suite's
unseen score.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceUnavailable
from .texts import heldout_texts

CODE_MODULES = ("argparse.py", "textwrap.py", "difflib.py", "shlex.py")
# Other standard-library modules, for calibrating on code without reading the suite's code.
CALIBRATION_CODE_MODULES = (
    "json/decoder.py",
    "json/encoder.py",
    "csv.py",
    "calendar.py",
    "configparser.py",
    "pprint.py",
)


@dataclass(frozen=True)
class Domain:
    name: str
    genre: str
    source: str  # where the text comes from, for reports and cards
    read: Callable[[], list[str]]
    calibrated: bool  # whether the packaged calibration reads this genre


def _stdlib_file(name: str) -> str:
    path = Path(sysconfig.get_path("stdlib")) / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise SourceUnavailable(f"this Python has no readable {path} for the evaluation suite ({e.strerror})") from None


def _documentation() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


DOMAINS = (
    Domain("drama", "narrative and drama", "Shakespeare: Othello, Twelfth Night (packaged)", heldout_texts, True),
    Domain("technical", "technical prose", "Python's documentation topics (pydoc_data)", _documentation, False),
    Domain(
        "code",
        "source code",
        f"Python's standard library: {', '.join(CODE_MODULES)}",
        lambda: [_stdlib_file(m) for m in CODE_MODULES],
        False,
    ),
    Domain("legal", "legal and formal text", "Python's LICENSE.txt", lambda: [_stdlib_file("LICENSE.txt")], False),
)


def code_calibration_texts() -> list[str]:
    """Source code to calibrate on: standard-library modules the suite's ``code`` domain does not read."""
    return [_stdlib_file(m) for m in CALIBRATION_CODE_MODULES]
