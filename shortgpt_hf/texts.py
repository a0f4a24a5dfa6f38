"""Public-domain text shipped inside the package (see ``data/NOTICE.md``).

Calibration and held-out texts are different plays, so a perplexity measured
on the held-out set is never measured on the text that chose the layers.
"""

from __future__ import annotations

import gzip
from importlib.resources import files

CALIBRATION_PLAYS = ("hamlet", "macbeth", "julius_caesar", "tempest")
HELDOUT_PLAYS = ("othello", "twelfth_night")


def packaged_text(play: str) -> str:
    """One packaged play as a string."""
    data = files("shortgpt_hf").joinpath("data", f"{play}.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def calibration_texts() -> list[str]:
    """The default calibration corpus: four Shakespeare plays (~130k words)."""
    return [packaged_text(p) for p in CALIBRATION_PLAYS]


def heldout_texts() -> list[str]:
    """Plays never used for calibration, for perplexity after pruning."""
    return [packaged_text(p) for p in HELDOUT_PLAYS]


DEFAULT_CALIBRATION_DESCRIPTION = "shakespeare:" + "+".join(CALIBRATION_PLAYS)
