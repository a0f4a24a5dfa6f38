"""Recovery after pruning: one interface (`RecoveryMethod`), one module per method, a registry.

``recover(model, name, data, ...)`` runs any registered method on a pruned
model and records it in ``config.shortgpt["recovery"]``;
``prune(model, ..., recovery=name)`` runs it as part of the removal (the only
way for a method that learns from the removed layers, like ``linear``).
`heal` is the LoRA method's own entry point. The methods that train (``lora``,
``partial``) share one loop and its options (`TrainingOptions`); those that fold
maps fitted on the removed layers (``linear``, ``cosine``) share `FoldedRepair`.

A new method is one new module in this package: a `RecoveryMethod` subclass
decorated with ``@register``. Every module here is imported below, so the
registry, `recover`, `prune` and the CLI's ``--recovery`` choices pick it up
with no other change.
"""

import importlib
import pkgutil

from ..registry import RECOVERY_METHODS
from .base import RecoveryMethod, recover, register
from .cosine import CosineRecovery
from .linear import FoldedRepair, LinearRecovery, LinearRepair, linear_maps
from .lora import LoraRecovery, adjacent_layers, heal, pruned_reference, save_healed
from .partial import PartialTuning
from .training import TrainingOptions, TrainingRecovery

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "RECOVERY_METHODS",
    "CosineRecovery",
    "FoldedRepair",
    "LinearRecovery",
    "LinearRepair",
    "LoraRecovery",
    "PartialTuning",
    "RecoveryMethod",
    "TrainingOptions",
    "TrainingRecovery",
    "adjacent_layers",
    "heal",
    "linear_maps",
    "pruned_reference",
    "recover",
    "register",
    "save_healed",
]
