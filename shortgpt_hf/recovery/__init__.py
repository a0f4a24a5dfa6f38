"""Recovery after pruning: one interface (`RecoveryMethod`), one module per method, a registry.

``recover(model, name, data, ...)`` runs any registered method and records it
in ``config.shortgpt["recovery"]``; `heal` is the LoRA method's own entry
point. A new method is one new module here: a `RecoveryMethod` subclass with
``@register``, imported below.
"""

from .base import RECOVERY_METHODS, RecoveryMethod, recover, register
from .lora import LoraRecovery, adjacent_layers, heal, pruned_reference, save_healed

__all__ = [
    "RECOVERY_METHODS",
    "LoraRecovery",
    "RecoveryMethod",
    "adjacent_layers",
    "heal",
    "pruned_reference",
    "recover",
    "register",
    "save_healed",
]
