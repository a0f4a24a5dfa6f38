"""Held-out perplexity, the quality measure every pruning claim here is asserted on."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationData, prepare_calibration
from .layers import input_device


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: CalibrationData = None,
    *,
    seq_len: int = 256,
    max_tokens: int | None = 8192,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Token-level perplexity over non-overlapping ``seq_len`` windows of ``texts``
    (any calibration form; default: the packaged held-out plays, never used for calibration)."""
    from .texts import heldout_texts

    windows = prepare_calibration(heldout_texts() if texts is None else texts, tokenizer, seq_len, max_tokens)
    device = input_device(model)
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    for ids, mask in tqdm(list(windows.batches(batch_size, 0)), desc="perplexity", disable=not progress):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float().cpu()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return math.exp(nll / count)
