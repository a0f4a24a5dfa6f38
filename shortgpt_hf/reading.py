"""What a model source holds, read without loading any weights: its text config,
a recipe's record and base, an adapter's base, and the tokenizer.

Everything that decides or checks before the expensive work starts (how many
layers a removal leaves, whether a recipe's base is there, which tokenizer
cuts the calibration text) reads through here, so it costs a config file, not
a checkpoint.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from .config import ShortGPTConfig
from .errors import InvalidRequest, ShortGPTError, SourceUnavailable, first_line
from .sources import ADAPTER_CONFIG, CONFIG_NAME, Source, resolve


def text_config_of(source: Source) -> Any:
    """The text-decoder config of a model source, read without loading weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **source.hub_kwargs()).get_text_config(decoder=True)
    except OSError as e:
        raise SourceUnavailable(f"cannot load {source.name!r}: {first_line(e)}") from None


def num_layers_of(source: Source) -> int | None:
    """How many decoder layers a model or a recipe has now, from its configs alone,
    so that an impossible removal is refused before any weights are read; None
    where that takes more than a config (a recipe in prefill-skip mode, an adapter)."""
    if source.kind == "recipe":
        record = read_recipe(source)
        return record.num_hidden_layers if record.mode == "remove" else None
    return text_config_of(source).num_hidden_layers if source.kind == "model" else None


def base_of(source: Source) -> Source | None:
    """The model a recipe rebuilds from, or an adapter is trained on; None for a model."""
    if source.kind == "recipe":
        return recipe_base(read_recipe(source))
    return adapter_base(source) if source.kind == "adapter" else None


def load_tokenizer(source: Source) -> Any:
    """The tokenizer of ``source`` or, for a recipe or an adapter saved without one, of its base."""
    from transformers import AutoTokenizer

    candidate: Source | None = source
    while candidate is not None:
        try:
            return AutoTokenizer.from_pretrained(candidate.location, **candidate.hub_kwargs())
        except (OSError, ValueError, TypeError):
            candidate = base_of(candidate)
    raise SourceUnavailable(
        f"no tokenizer found for {source.name!r}"
        + ("" if source.kind == "model" else " nor its base")
        + ": save the tokenizer beside the model, or give one (tokenizer=...)"
    )


def read_recipe(source: Source) -> ShortGPTConfig:
    """The record a recipe folder or repo holds (the source is already resolved: no second lookup)."""
    record = ShortGPTConfig.from_json_string(source.read_text(CONFIG_NAME))
    if record.is_request:
        raise InvalidRequest(
            f"{source.describe()} holds a request, not a pruned model's record: carry it out with "
            "PrunedForCausalLM.from_pretrained(BASE, shortgpt_config=ShortGPTConfig.from_pretrained(...))"
        )
    return record


def recipe_base(record: ShortGPTConfig, **hub_kwargs: Any) -> Source:
    """The recipe's base, at its pinned revision (or, with a warning, the current one when the pinned one is gone)."""
    name = record.base_model_name_or_path
    if not name:
        raise SourceUnavailable("the recipe names no base model (base_model_name_or_path is empty)")
    pinned = record.base_revision
    try:
        try:
            base = resolve(name, pinned, **hub_kwargs)
        except ShortGPTError:
            if pinned is None:
                raise
            base = resolve(name, **hub_kwargs)
            warnings.warn(
                f"the recipe pins {name} at revision {pinned}, which is not available; "
                f"loading revision {base.revision} instead",
                stacklevel=2,
            )
    except ShortGPTError as e:
        raise SourceUnavailable(f"the recipe's base model is unavailable: {e}") from None
    if base.kind != "model":
        raise InvalidRequest(f"the recipe's base is {base.describe()}; a recipe applies to a dense model")
    return base


def adapter_base(source: Source) -> Source:
    """The model a PEFT adapter names as its base."""
    base_name = json.loads(source.read_text(ADAPTER_CONFIG)).get("base_model_name_or_path")
    if not base_name:
        raise SourceUnavailable(f"{source.describe()} names no base model (base_model_name_or_path is empty)")
    return resolve(base_name)


def tokenizer_for(model: Any) -> Any:
    """The tokenizer saved with ``model`` (where it was loaded from), for calls that got none."""
    try:
        source = resolve(model.name_or_path)
    except ShortGPTError as e:
        raise SourceUnavailable(
            f"no tokenizer given and none found at {model.name_or_path!r}: give one (tokenizer=...)"
        ) from e
    return load_tokenizer(source)
