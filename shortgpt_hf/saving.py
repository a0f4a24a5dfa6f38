"""Writing pruned checkpoints without ever leaving a half-written or clobbered folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ShortGPTError
from .layers import probe_ids
from .pruning import logits_close, parity_tolerance, uncached_logits


def check_destination(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty destination unless ``overwrite`` (checked before any work is done)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ShortGPTError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ShortGPTError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    return out


def save_pruned(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Save a native checkpoint atomically: write to a temporary sibling folder,
    optionally reload it with plain ``AutoModelForCausalLM`` and compare logits,
    then rename into place. On any failure nothing is left at ``out_dir``."""
    from transformers import AutoModelForCausalLM

    out = check_destination(out_dir, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if verify:
            ids = probe_ids(model)
            expected = uncached_logits(model, ids)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype)
            if not logits_close(uncached_logits(reloaded, ids), expected, parity_tolerance(model)):
                raise ShortGPTError("verification failed: the saved checkpoint reloads with different logits")
            del reloaded
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total



