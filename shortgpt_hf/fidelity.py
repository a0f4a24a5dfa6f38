"""Fidelity to the dense model: how far a pruned model's next-token distributions drift from its base's.

Perplexity on one genre cannot tell recovery from adaptation: a repair fitted
on Shakespeare can score better than dense on Shakespeare while it drifts
everywhere else. The quantization community measures fidelity instead
(llama.cpp's ``perplexity --kl-divergence``): per scored token, the KL
divergence KL(dense ‖ pruned) of the two next-token distributions, in nats,
and whether both put the same token first. A model that matches its base has
KL 0 and top-1 agreement 1, whatever the text.

`FidelityTotals` is streamed: it takes one batch of both models' logits at a
time and keeps only one float per scored token (for the 99th percentile) and
a few sums, so the two models' logits over the whole text are never held.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


class ReferenceLogits(Protocol):
    """A reference that is not a model in memory: it gives the logits of each ``(input_ids,
    attention_mask)`` batch in turn (``streaming.WalkedReference`` walks a checkpoint larger than
    memory layer by layer)."""

    def logits(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]: ...


@dataclass
class Fidelity:
    """One text's figures: KL(dense ‖ pruned) per token (mean and 99th percentile, nats), how often
    the two models' most likely next tokens agree, and both perplexities with their ratio."""

    kl_mean: float
    kl_p99: float
    top1_agreement: float
    perplexity: float
    reference_perplexity: float
    tokens: int

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity


@dataclass
class FidelityTotals:
    """Running totals over batches of ``(logits, reference_logits, labels)``; labels are -100 where a
    position is not scored, as `evaluation.perplexity_batches` makes them."""

    kl: list[torch.Tensor] = field(default_factory=list)
    agree: int = 0
    nll: float = 0.0
    reference_nll: float = 0.0

    def add(self, logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch. Rows are taken one at a time, so at most one window of each model's
        log-probabilities is held beside the logits the caller already has."""
        for row in range(labels.shape[0]):
            targets = labels[row, 1:].to(logits.device)
            scored = targets != -100
            if not scored.any():
                continue
            log_p = F.log_softmax(logits[row, :-1][scored].float(), dim=-1)
            log_q = F.log_softmax(reference_logits[row, :-1][scored].to(logits.device).float(), dim=-1)
            kl = (log_q.exp() * (log_q - log_p)).sum(-1).clamp_min(0)  # KL(reference ‖ model), >= 0 up to rounding
            self.kl.append(kl.double().cpu())
            self.agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            picked = targets[scored]
            self.nll -= float(log_p.gather(-1, picked[:, None]).double().sum())
            self.reference_nll -= float(log_q.gather(-1, picked[:, None]).double().sum())

    def result(self) -> Fidelity:
        kl = torch.cat(self.kl)
        n = len(kl)
        return Fidelity(
            kl_mean=float(kl.mean()),
            kl_p99=float(torch.quantile(kl, 0.99)),
            top1_agreement=self.agree / n,
            perplexity=math.exp(self.nll / n),
            reference_perplexity=math.exp(self.reference_nll / n),
            tokens=n,
        )
