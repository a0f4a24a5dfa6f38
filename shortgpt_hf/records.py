"""JSON for the result records users keep, compare and share: layer scores,
evaluation reports and ablations are dataclasses written the same way."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class JsonRecord:
    """Mixin for dataclasses: ``to_dict`` (nested dataclasses included) and ``to_json``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self, path: str | Path | None = None) -> str:
        """The record as indented JSON; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            from .atomic import write_file

            write_file(path, text)
        return text


@dataclass
class EvalResult:
    """One measured number. ``higher_is_better`` lets comparisons and plots read
    perplexity and accuracy alike; ``chance`` is the random-guess level."""

    task: str
    dataset: str
    metric: str
    value: float
    higher_is_better: bool
    num_samples: int | None = None
    chance: float | None = None
    settings: str | None = None  # how it was measured, when that changes the number (perplexity windows)
