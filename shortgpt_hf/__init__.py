"""shortgpt_hf: remove redundant decoder layers from Hugging Face causal LMs (ShortGPT).

The front door, as PEFT's is ``LoraConfig`` plus ``get_peft_model`` /
``PeftModel.from_pretrained``: a `ShortGPTConfig` request, carried out by
`prune` on a model in memory or by ``PrunedForCausalLM.from_pretrained(...,
shortgpt_config=...)`` while a model loads (layer by layer when it does not
fit). Metrics (`METRICS`) and recovery methods (`RECOVERY_METHODS`) are
registries: a new one is one registered class.
"""

import importlib.metadata

from . import auto  # noqa: F401  (registers recipes with transformers' Auto classes)
from .ablation import Ablation, ablate
from .builtin import BUILTINS, DEFAULT_MODEL, builtin_path
from .card import model_card
from .config import ShortGPTConfig
from .errors import InvalidRequest, ShortGPTError, SourceUnavailable, UnsupportedModel, VerificationFailed
from .evaluation import EvalReport, EvalResult, PerplexitySettings, evaluate, perplexity
from .layers import find_decoder_layers
from .loading import load_builtin, load_model
from .metrics import Metric, register_metric
from .modeling import PrunedForCausalLM
from .multiple_choice import multiple_choice
from .pipeline import PruneResult, prune_pretrained, prune_to_folder
from .prefill_skip import disable_prefill_skip, enable_prefill_skip
from .pruning import prune
from .push import push_to_hub
from .recovery import RECOVERY_METHODS, RecoveryMethod, heal, recover, register, save_healed
from .registry import METRICS
from .saving import save_pruned, save_recipe
from .scoring import LayerScores, score_layers
from .streaming import (
    LinearRepair,
    fit_linear_sequentially,
    materialize,
    perplexity_sequentially,
    score_layers_sequentially,
)
from .surgery import remove_layers
from .verification import verify_pruned

__version__ = importlib.metadata.version("shortgpt_hf")  # the one version is pyproject.toml's

__all__ = [
    "Ablation",
    "BUILTINS",
    "DEFAULT_MODEL",
    "EvalReport",
    "EvalResult",
    "InvalidRequest",
    "LayerScores",
    "LinearRepair",
    "METRICS",
    "Metric",
    "PerplexitySettings",
    "PruneResult",
    "PrunedForCausalLM",
    "RECOVERY_METHODS",
    "RecoveryMethod",
    "ShortGPTConfig",
    "ShortGPTError",
    "SourceUnavailable",
    "UnsupportedModel",
    "VerificationFailed",
    "ablate",
    "builtin_path",
    "disable_prefill_skip",
    "enable_prefill_skip",
    "evaluate",
    "find_decoder_layers",
    "fit_linear_sequentially",
    "heal",
    "load_builtin",
    "load_model",
    "materialize",
    "model_card",
    "multiple_choice",
    "perplexity",
    "perplexity_sequentially",
    "prune",
    "prune_pretrained",
    "prune_to_folder",
    "push_to_hub",
    "recover",
    "register",
    "register_metric",
    "remove_layers",
    "save_healed",
    "save_pruned",
    "save_recipe",
    "score_layers",
    "score_layers_sequentially",
    "verify_pruned",
]
