"""Recipes through transformers' own entry points.

Registering `RecipeConfig` with ``AutoConfig`` and `PrunedForCausalLM` with the
Auto model classes is all it takes for ``AutoModelForCausalLM.from_pretrained``,
``pipeline("text-generation", model=...)`` and peft's ``AutoPeftModelForCausalLM``
(an adapter whose base is a recipe) to load a recipe folder or Hub repo, with
``device_map``, ``dtype`` and the rest passed through. It happens on ``import
shortgpt_hf``; a full pruned checkpoint needs none of it, it is a plain
transformers checkpoint.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from .config import RecipeConfig
from .modeling import PrunedForCausalLM

AutoConfig.register(RecipeConfig.model_type, RecipeConfig, exist_ok=True)
for _auto in (AutoModelForCausalLM, AutoModelForImageTextToText):  # PrunedForCausalLM returns the family's own class
    _auto.register(RecipeConfig, PrunedForCausalLM, exist_ok=True)
