"""Text the package calibrates and evaluates on, shipped with it or read from the running Python.

A repair fitted on one genre learns that genre, and on a genre it never saw it
can do worse than plain removal. So the default calibration is a mixture of
three genres in equal shares, and the evaluation suite (`domains`) reads
other texts of those genres plus two genres the calibration never sees:

- ``shakespeare``: four plays (packaged; two other plays are held out);
- ``wikipedia``: eleven English Wikipedia articles (packaged; five others are held out);
- ``python-stdlib``: six standard-library modules, read from this Python
  (the suite's code domain reads four others).

Licences and provenance are in ``data/NOTICE.md``. No text here is ever both
calibration and evaluation text.
"""

from __future__ import annotations

import gzip
import json
import sysconfig
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

from .errors import SourceUnavailable

CALIBRATION_PLAYS = ("hamlet", "macbeth", "julius_caesar", "tempest")
HELDOUT_PLAYS = ("othello", "twelfth_night")
CALIBRATION_CODE_MODULES = (
    "json/decoder.py",
    "json/encoder.py",
    "csv.py",
    "calendar.py",
    "configparser.py",
    "pprint.py",
)
HELDOUT_CODE_MODULES = ("argparse.py", "textwrap.py", "difflib.py", "shlex.py")


def _packaged(name: str) -> bytes:
    return gzip.decompress(files("shortgpt_hf").joinpath("data", name).read_bytes())


def packaged_text(play: str) -> str:
    """One packaged play as a string."""
    return _packaged(f"{play}.txt.gz").decode("utf-8")


def encyclopedia_articles(split: str) -> list[dict]:
    """The packaged Wikipedia articles of one split (``"calibration"`` or ``"heldout"``), each
    ``{"title", "oldid", "text"}``: the revision id is what attributes the text to its authors."""
    lines = _packaged(f"encyclopedia_{split}.jsonl.gz").decode("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def stdlib_file(name: str) -> str:
    """A file of the running Python's standard library, refused in one line if this install lacks it."""
    path = Path(sysconfig.get_path("stdlib")) / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise SourceUnavailable(f"this Python has no readable {path} ({e.strerror})") from None


CALIBRATION_SOURCES: dict[str, Callable[[], list[str]]] = {
    "shakespeare": lambda: [packaged_text(p) for p in CALIBRATION_PLAYS],
    "wikipedia": lambda: [a["text"] for a in encyclopedia_articles("calibration")],
    "python-stdlib": lambda: [stdlib_file(m) for m in CALIBRATION_CODE_MODULES],
}
"""The default calibration's sources, in equal shares of its tokens."""

DEFAULT_CALIBRATION_DESCRIPTION = "mix:" + "+".join(f"{name}*1" for name in CALIBRATION_SOURCES)


def calibration_texts() -> list[str]:
    """Every document of the default calibration mixture, source by source."""
    return [text for read in CALIBRATION_SOURCES.values() for text in read()]


def heldout_texts() -> list[str]:
    """Plays never used for calibration, for perplexity after pruning."""
    return [packaged_text(p) for p in HELDOUT_PLAYS]
