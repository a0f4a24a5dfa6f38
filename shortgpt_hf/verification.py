"""Proving that a pruned model is right, rather than trusting that it is.

Four checks, each cheap (a fixed probe batch, or a model built on the meta device):

- **identity reference**: the pruned model's uncached logits must equal the
  unpruned model's with the removed layers made identity (`layers_as_identity`).
  This is the definition of a correct removal.
- **cache parity**: decoding token by token with the KV cache must give the
  uncached logits. A stale ``layer_idx`` or a stale per-layer config entry
  breaks this while an uncached forward still looks fine.
- **structure**: a model built from the rewritten config has exactly the
  pruned model's tensors. Families that decide a layer's kind at
  construction (dense or MoE, attention or Mamba) would otherwise run fine in
  memory and reload differently.
- **reload**: a saved folder, reloaded by the Auto class its config maps to
  (never a class of ours), must give the same logits.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import ShortGPTError, UnsupportedModel, VerificationFailed, fault, first_line
from .families import auto_class, describe, family_of
from .layers import input_device, probe_ids, text_config


def parity_tolerance(model: nn.Module) -> float:
    return 1e-4 if model.dtype == torch.float32 else 3e-2


def logits_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.float().cpu(), b.float().cpu()
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * max(1.0, a.abs().max().item()))


@torch.no_grad()
def uncached_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(input_device(model)), use_cache=False).logits.float().cpu()


@contextlib.contextmanager
def explained(subject: nn.Module | str, what: str) -> Iterator[None]:
    """Turn an unexpected exception inside into one `ShortGPTError` line naming the family and ``what`` failed.

    Our own errors pass through unchanged; anything else (an ``AttributeError``
    deep in a family's forward, say) is a model we do not handle, and the user
    needs to know which one and at which step, not a 40-line traceback.
    """
    try:
        yield
    except ShortGPTError:
        raise
    except Exception as e:
        if fault(e) is not None:  # a full disk or a lost connection is not the family's fault: the caller words it
            raise
        name = subject if isinstance(subject, str) else describe(subject)
        raise UnsupportedModel(f"{name}: {what} failed ({type(e).__name__}: {first_line(e)})") from e


def verify_structure(model: nn.Module) -> None:
    """A model built (on the meta device) from ``model``'s config must have the same tensor names and shapes."""
    with explained(model, "building the pruned architecture from its config"), torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        differ = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        raise VerificationFailed(
            f"verification failed: the pruned {describe(model)}'s config describes different layers than it has "
            f"({len(differ)} tensors differ, e.g. {differ[0]}); a reload would change the model"
        )


@torch.no_grad()
def verify_pruned(model: nn.Module, reference: torch.Tensor | None = None) -> None:
    """Check a pruned model's structure (`verify_structure`) and KV-cache bookkeeping: cached
    decoding must equal an uncached forward.

    With ``reference`` (logits of the unpruned model with the removed layers as
    identity, on `probe_ids`), also check that removal changed nothing else.
    Raises `ShortGPTError` on a mismatch or on a crash.
    """
    verify_structure(model)
    ids = probe_ids(model)
    tol = parity_tolerance(model)
    with explained(model, "the uncached forward after pruning"):
        full = uncached_logits(model, ids)
    if reference is not None and not logits_close(full, reference, tol):
        raise VerificationFailed(
            f"verification failed: the pruned {describe(model)} does not match the original with those layers skipped"
        )
    split = ids.shape[1] // 2
    device = input_device(model)
    with explained(model, "verification: cached decoding after pruning"):
        out = model(input_ids=ids[:, :split].to(device), use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(split, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t : t + 1].to(device), cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
    cached = torch.stack([s.float().cpu() for s in steps], dim=1)
    decode_tol = max(tol, family_of(text_config(model)).decode_tolerance or 0.0)
    if not logits_close(cached, full[:, split - 1 : -1], decode_tol):
        raise VerificationFailed(
            f"verification failed: cached decoding differs from an uncached forward after pruning {describe(model)}; "
            "this model family needs support in shortgpt_hf"
        )


def verify_reload(model: nn.Module, folder: str | Path) -> None:
    """The saved ``folder`` must reload, through the Auto class its config maps to, with ``model``'s logits."""
    ids = probe_ids(model)
    with explained(model, "the forward before saving"):
        expected = uncached_logits(model, ids)
    with explained(model, f"reloading the saved checkpoint with {auto_class(model.config).__name__}"):
        reloaded = auto_class(model.config).from_pretrained(folder, dtype=model.dtype)
        actual = uncached_logits(reloaded, ids)
    if not logits_close(actual, expected, parity_tolerance(model)):
        raise VerificationFailed(
            f"verification failed: the saved {describe(model)} checkpoint reloads with different logits"
        )
