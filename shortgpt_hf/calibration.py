"""Turning whatever the user calls "calibration data" into token windows.

Every accepted form ends as a list of 1-D token tensors of at most ``seq_len``
tokens, cut per document so that no window spans two texts, and a one-line
description that is stored with the scores (and later on the model card).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from .errors import InvalidRequest, SourceUnavailable, fault
from .texts import CALIBRATION_SOURCES

CalibrationData = Union[None, str, os.PathLike, Sequence[str], torch.Tensor, Sequence[torch.Tensor], dict, Any]


@dataclass
class TokenWindows:
    windows: list[torch.Tensor]
    description: str
    seq_len: int

    @property
    def num_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def batches(self, batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Right-padded ``(input_ids, attention_mask)`` batches; padding is masked out downstream."""
        for start in range(0, len(self.windows), batch_size):
            yield self.pad(self.windows[start : start + batch_size], pad_id)

    @staticmethod
    def pad(chunk: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One right-padded ``(input_ids, attention_mask)`` batch (a DataLoader's ``collate_fn``)."""
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, window in enumerate(chunk):
            ids[row, : len(window)] = window
            mask[row, : len(window)] = 1
        return ids, mask


def _texts_and_description(
    calibration: CalibrationData, text_column: str
) -> tuple[list[str] | None, list[torch.Tensor] | None, str]:
    if isinstance(calibration, (str, os.PathLike)) and Path(calibration).is_dir():
        files = sorted(Path(calibration).rglob("*.txt"))
        if not files:
            raise SourceUnavailable(f"calibration folder {calibration} holds no .txt file")
        return [read_text_file(f) for f in files], None, f"folder:{Path(calibration).name}"
    if isinstance(calibration, (str, os.PathLike)):
        return [read_text_file(calibration)], None, f"file:{Path(calibration).name}"
    if isinstance(calibration, torch.Tensor):
        rows = calibration if calibration.dim() == 2 else calibration.unsqueeze(0)
        return None, [r for r in rows], f"tokens:{tuple(rows.shape)}"
    if isinstance(calibration, dict) and "input_ids" in calibration:
        ids = torch.as_tensor(calibration["input_ids"])
        ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
        mask = calibration.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        return None, [row[m.bool()] for row, m in zip(ids, mask, strict=True)], f"tokens:{tuple(ids.shape)}"
    column_names = getattr(calibration, "column_names", None)
    if column_names is not None:  # a datasets.Dataset, without importing datasets
        if text_column not in column_names:
            raise InvalidRequest(f"dataset has no {text_column!r} column (columns: {', '.join(column_names)})")
        info = getattr(calibration, "info", None)
        name = getattr(info, "dataset_name", None) or "dataset"
        return list(calibration[text_column]), None, f"{name}:{text_column}[{len(calibration)}]"
    if isinstance(calibration, Sequence) and all(isinstance(t, torch.Tensor) for t in calibration):
        return None, [t.reshape(-1) for t in calibration], f"tokens:{len(calibration)} sequences"
    if isinstance(calibration, Sequence) and all(isinstance(t, str) for t in calibration):
        return list(calibration), None, f"texts:{len(calibration)}"
    raise InvalidRequest(
        f"unsupported calibration type {type(calibration).__name__}: give a text file path, a list of "
        "strings, a datasets.Dataset, or token tensors"
    )


def read_text_file(path: str | os.PathLike) -> str:
    """A calibration or training text file, refused in one line (naming it) when it
    is missing, not UTF-8 (a binary file would be read as replacement characters)
    or holds no text. Cheap enough to call before a model is loaded."""
    path = Path(path)
    if not path.is_file():
        raise SourceUnavailable(f"calibration file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"{path} is not UTF-8 text (byte {e.start} cannot be decoded): give a plain text file"
        ) from None
    except OSError as e:
        raise SourceUnavailable(f"cannot read {path}: {fault(e)}") from None
    if not text.strip():
        raise InvalidRequest(f"{path} is empty: give a file with text in it")
    return text


def is_tokenized(calibration: CalibrationData) -> bool:
    """Token tensors need no tokenizer; every other form does."""
    if isinstance(calibration, torch.Tensor) or (isinstance(calibration, dict) and not is_mixture(calibration)):
        return True
    return (
        isinstance(calibration, Sequence)
        and bool(calibration)
        and all(isinstance(t, torch.Tensor) for t in calibration)
    )


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id if this tokenizer normally starts sequences with it (Gemma needs it, SmolLM2 doesn't use it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def token_streams(
    calibration: CalibrationData, tokenizer: Any, text_column: str = "text"
) -> tuple[list[torch.Tensor], str, int | None]:
    """One 1-D token tensor per document (no special tokens), its description,
    and the BOS id to start each window with (None when the tokenizer uses none)."""
    texts, token_rows, description = _texts_and_description(calibration, text_column)
    if texts is None:
        return [row.to(torch.long) for row in token_rows if len(row)], description, None
    if tokenizer is None:
        raise InvalidRequest("text calibration needs a tokenizer")
    streams = [
        torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)
        for text in texts
        if text.strip()
    ]
    return streams, description, _bos_id(tokenizer)


def is_mixture(calibration: CalibrationData) -> bool:
    """A weighted mixture of sources: ``{"news.txt": 1, "code/": 2}`` (files or folders of ``.txt``), or
    in Python a list of ``(data, weight)`` pairs, each data any other calibration form (a Dataset, texts...)."""
    if isinstance(calibration, dict):
        return "input_ids" not in calibration
    return (
        isinstance(calibration, list)
        and bool(calibration)
        and all(isinstance(pair, tuple) and len(pair) == 2 and _is_number(pair[1]) for pair in calibration)
    )


def _is_number(weight: Any) -> bool:
    return isinstance(weight, (int, float)) and not isinstance(weight, bool)


def mixture_pairs(mixture: Any) -> list[tuple[Any, float]]:
    """The mixture's ``(source, weight)`` pairs, checked: positive weights, no mixture inside a mixture."""
    pairs = list(mixture.items()) if isinstance(mixture, dict) else list(mixture)
    if not pairs:
        raise InvalidRequest("a calibration mixture needs at least one source")
    for source, weight in pairs:
        if is_mixture(source):
            raise InvalidRequest("a calibration mixture's sources are files, folders or data, not mixtures")
        if not _is_number(weight) or not weight > 0:
            raise InvalidRequest(
                f"the weight of calibration source {_named(source)} must be a positive number, got {weight!r}"
            )
    return [(source, float(weight)) for source, weight in pairs]


def _named(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def mixture_weights(mixture: dict[Any, Any]) -> dict[str, float]:
    """A mixture of files and folders (what a ShortGPTConfig records) as ``{path: weight}``, checked."""
    pairs = mixture_pairs(mixture)
    bad = [_named(source) for source, _ in pairs if not isinstance(source, (str, os.PathLike))]
    if bad:
        raise InvalidRequest(f"a calibration mixture's sources here are files or folders, got {', '.join(bad)}")
    return {str(source): weight for source, weight in pairs}


def check_mixture(mixture: dict[Any, Any]) -> dict[str, float]:
    """The mixture's weights, checked, with every source read once to refuse an unreadable one before loading."""
    weights = mixture_weights(mixture)
    for source in weights:
        check_sources(source)
    return weights


def check_sources(calibration: str | os.PathLike | dict[Any, Any]) -> None:
    """Refuse, before anything is loaded, calibration files or folders that cannot be read, and bad weights."""
    if is_mixture(calibration):
        check_mixture(calibration)
    elif Path(calibration).is_dir():
        if not any(Path(calibration).rglob("*.txt")):
            raise SourceUnavailable(f"calibration folder {calibration} holds no .txt file")
    else:
        read_text_file(calibration)


def _mixture_windows(
    mixture: Any, tokenizer: Any, seq_len: int, max_tokens: int | None, text_column: str
) -> tuple[list[torch.Tensor], str]:
    pairs = mixture_pairs(mixture)  # each source is read once, below, and refused there if it cannot be
    parts = [(prepare_calibration(source, tokenizer, seq_len, None, text_column), w) for source, w in pairs]
    return _shared_out([(part.description, part, weight) for part, weight in parts], max_tokens)


def _default_windows(tokenizer: Any, seq_len: int, max_tokens: int | None) -> tuple[list[torch.Tensor], str]:
    parts = [(name, prepare_calibration(read(), tokenizer, seq_len), 1.0) for name, read in CALIBRATION_SOURCES.items()]
    return _shared_out(parts, max_tokens)


def _shared_out(parts: list[tuple[str, TokenWindows, float]], max_tokens: int | None) -> tuple[list[torch.Tensor], str]:
    """Each ``(name, windows, weight)`` source's windows, cut so that the sources' shares of the tokens
    follow their weights: of ``max_tokens`` when given, else of the most tokens every source can
    supply in proportion."""
    total = sum(weight for _, _, weight in parts)
    if max_tokens is None:
        max_tokens = int(min(part.num_tokens * total / weight for _, part, weight in parts))
    exact = [max_tokens * weight / total for _, _, weight in parts]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(parts)), key=lambda i: shares[i] - exact[i])  # largest remainder first
    for i in by_remainder[: max_tokens - sum(shares)]:  # the shares add up to max_tokens exactly
        shares[i] += 1
    windows: list[torch.Tensor] = []
    for (_, part, _), share in zip(parts, shares, strict=True):
        windows += _first_tokens(part.windows, share)
    return windows, "mix:" + "+".join(f"{name}*{weight:g}" for name, _, weight in parts)


def _first_tokens(windows: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    kept, total = [], 0
    for window in windows:
        if total >= max_tokens:
            break
        kept.append(window[: max_tokens - total])
        total += len(kept[-1])
    return kept


def prepare_calibration(
    calibration: CalibrationData,
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None = None,
    text_column: str = "text",
) -> TokenWindows:
    """Tokenize and cut calibration data into windows of at most ``seq_len`` tokens.

    A mixture (``{source: weight}``, sources being text files or folders of
    ``.txt`` files) gives each source its weight's share of ``max_tokens``;
    ``None`` is the packaged mixture (`texts.CALIBRATION_SOURCES`), in equal shares. A Dataset,
    alone or in a mixture, is read from its ``text_column``."""
    if calibration is None or is_mixture(calibration):
        if calibration is None:
            windows, description = _default_windows(tokenizer, seq_len, max_tokens)
        else:
            windows, description = _mixture_windows(calibration, tokenizer, seq_len, max_tokens, text_column)
        return _checked(TokenWindows([w for w in windows if len(w) > 0], description, seq_len), seq_len)
    if seq_len < 2:
        raise InvalidRequest(f"the window length (seq_len / --seq-len) must be at least 2 tokens, got {seq_len}")
    streams, description, bos = token_streams(calibration, tokenizer, text_column)
    step = seq_len - (bos is not None)
    windows: list[torch.Tensor] = []
    for ids in streams:
        for start in range(0, len(ids), step):
            piece = ids[start : start + step]
            windows.append(piece if bos is None else torch.cat([torch.tensor([bos]), piece]))
    if max_tokens is not None:
        windows = _first_tokens(windows, max_tokens)
    return _checked(TokenWindows([w for w in windows if len(w) > 0], description, seq_len), seq_len)


def _checked(result: TokenWindows, seq_len: int) -> TokenWindows:
    if result.num_tokens == 0:
        raise InvalidRequest("calibration is empty")
    if result.num_tokens < seq_len:
        raise InvalidRequest(
            f"calibration has {result.num_tokens} tokens, fewer than one window of {seq_len} "
            "(the window length, seq_len / --seq-len)"
        )
    return result
