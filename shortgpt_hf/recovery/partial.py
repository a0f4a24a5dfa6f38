"""Partial-layer tuning: train the last few kept layers whole, everything before them frozen.

Lu et al. ("Reassessing Layer Pruning in LLMs", 2024) found that after layer
pruning, fine-tuning only the last layers (and the output head) recovers more
than LoRA on every layer at a similar cost: the layers after the last gap are
the ones that must learn to read the changed hidden states. The result is a
plain model, not an adapter: its weights are saved like any pruned
checkpoint's (``save_pruned``) and load with no PEFT.

Training is the loop every training recovery shares (`training.train`): on
CPU, a GPU or several processes, distilled from the dense base by default.
The output head is trained only when asked (``head=True``), and refused when
it is tied to the input embeddings (training it would change them too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..calibration import TokenWindows
from ..errors import InvalidRequest
from ..families import describe, is_vision_language
from ..layers import find_decoder_layers
from .base import register
from .training import TrainingRecovery, train


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


@register
class PartialTuning(TrainingRecovery):
    """The last ``layers`` kept decoder layers (and the final norm; the head with ``head=True``) trained whole."""

    name = "partial"
    summary = "the last few kept layers (and the final norm) fine-tuned whole, the rest frozen; a native model"
    default_lr = 5e-5

    def check(
        self,
        model: nn.Module,
        *,
        layers: int = 2,
        head: bool = False,
        **training: Any,
    ) -> None:
        if is_vision_language(model.config):
            raise InvalidRequest(f"partial tuning supports text-only causal LMs; {describe(model)} is vision-language")
        n = len(find_decoder_layers(model).layers)
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
            raise InvalidRequest(f"layers (the last kept layers to train) must be between 1 and {n}, got {layers!r}")
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
            raise InvalidRequest(
                "partial tuning updates the weights themselves, and most small updates round away in 16-bit "
                "weights: load the model in float32 (LoRA trains float32 adapters on a 16-bit model)"
            )
        if head and _tied(model):
            raise InvalidRequest(
                "this model's output head is tied to its input embeddings: training it would change them too "
                "(use head=False)"
            )
        self.training(model, training, load=False)

    def apply(
        self,
        model: nn.Module,
        windows: TokenWindows,
        tokenizer: Any,
        *,
        layers: int = 2,
        head: bool = False,
        **training: Any,
    ) -> tuple[nn.Module, dict[str, Any]]:
        options = self.training(model, training, load=True)
        found = find_decoder_layers(model)
        n = len(found.layers)
        if layers > n:  # checked against the dense model before removal; the pruned one may have fewer
            raise InvalidRequest(
                f"layers (the last kept layers to train) must be at most {n} after removal, got {layers}"
            )
        trained = [*found.layers[-layers:], _final_norm(model)] + ([model.get_output_embeddings()] if head else [])
        for module in trained:  # new tensors, not the old ones updated in place: a failed run can be undone
            for owner in module.modules():
                for name, p in list(owner._parameters.items()):
                    if p is not None:
                        owner._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        before = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for module in trained:
            for p in module.parameters():
                p.requires_grad_(True)
        torch.manual_seed(options.seed)
        try:
            model, run = train(model, windows, tokenizer, options)
        finally:
            for p, flag in before.items():
                p.requires_grad_(flag)
        return model, {"layers": list(range(n - layers, n)), "head": head, **run}


def _final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the head (``model.norm`` in most families)."""
    base = getattr(model, model.base_model_prefix, model)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        norm = getattr(base, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise InvalidRequest(f"partial tuning found no final norm in {describe(model)}")
