"""shortgpt_hf: remove redundant decoder layers from Hugging Face causal LMs (ShortGPT)."""

import importlib.metadata

from . import auto  # noqa: F401  (registers recipes with transformers' Auto classes)
from .ablation import Ablation, ablate
from .builtin import BUILTINS, DEFAULT_MODEL, builtin_path, load_builtin
from .card import model_card
from .config import ShortGPTConfig
from .errors import ShortGPTError
from .evaluation import EvalReport, EvalResult, PerplexitySettings, evaluate, perplexity
from .layers import find_decoder_layers
from .loading import load_model
from .modeling import PrunedForCausalLM
from .multiple_choice import multiple_choice
from .prefill_skip import disable_prefill_skip, enable_prefill_skip
from .pruning import prune
from .recovery import RECOVERY_METHODS, RecoveryMethod, heal, recover, save_healed
from .surgery import remove_layers
from .verification import verify_pruned

__version__ = importlib.metadata.version("shortgpt_hf")  # the one version is pyproject.toml's
from .push import push_to_hub
from .saving import save_pruned, save_recipe
from .scoring import METRICS, LayerScores, score_layers
from .streaming import (
    LinearRepair,
    fit_linear_sequentially,
    materialize,
    perplexity_sequentially,
    score_layers_sequentially,
)

__all__ = [
    "Ablation",
    "BUILTINS",
    "DEFAULT_MODEL",
    "EvalReport",
    "EvalResult",
    "METRICS",
    "LayerScores",
    "LinearRepair",
    "PrunedForCausalLM",
    "RECOVERY_METHODS",
    "RecoveryMethod",
    "ShortGPTConfig",
    "ShortGPTError",
    "ablate",
    "builtin_path",
    "disable_prefill_skip",
    "enable_prefill_skip",
    "evaluate",
    "fit_linear_sequentially",
    "find_decoder_layers",
    "heal",
    "load_builtin",
    "load_model",
    "materialize",
    "model_card",
    "multiple_choice",
    "perplexity",
    "perplexity_sequentially",
    "PerplexitySettings",
    "prune",
    "push_to_hub",
    "recover",
    "remove_layers",
    "save_healed",
    "save_pruned",
    "save_recipe",
    "score_layers",
    "score_layers_sequentially",
    "verify_pruned",
]
