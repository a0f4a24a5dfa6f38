"""Loading whatever a user calls "a model": a built-in name, a dense model, a full
pruned checkpoint, a recipe or a PEFT adapter, from a folder or the Hub
(`sources.resolve` decides which)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import ShortGPTConfig
from .errors import ShortGPTError, first_line
from .families import auto_class
from .pruning import tag_pruned
from .sources import HUB_KWARGS, Source, resolve

# from_pretrained arguments that also decide which config is read.
_CONFIG_KWARGS = (*HUB_KWARGS, "revision", "subfolder")


def mark_loaded(model: nn.Module, source: Source) -> nn.Module:
    """Make ``model.name_or_path`` the portable name of where it came from, as
    transformers does for its own loads (PEFT copies it into an adapter as the
    base to reload), and give a pruned model our Hub tags."""
    model.name_or_path = model.config.name_or_path = source.portable
    tag_pruned(model)
    return model


def load_native(source: Source, **from_pretrained_kwargs: Any) -> nn.Module:
    """A ``config.json`` model (dense or a full pruned checkpoint) through the Auto class
    its config maps to (``AutoModelForCausalLM``, or ``AutoModelForImageTextToText``
    for a vision-language model; ``AutoModelForCausalLM`` when you pass
    ``trust_remote_code=True``, as its custom classes are in no mapping); loading
    failures become one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = source.hub_kwargs() | from_pretrained_kwargs
    hub = {k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS}
    try:
        auto = (
            AutoModelForCausalLM
            if kwargs.get("trust_remote_code")
            else auto_class(AutoConfig.from_pretrained(source.location, **hub))
        )
        model = auto.from_pretrained(source.location, **kwargs)
    except OSError as e:
        raise ShortGPTError(f"cannot load {source.name!r}: {first_line(e)}") from None
    except ValueError as e:  # e.g. a config with no causal-LM class (BERT, T5 encoders)
        raise ShortGPTError(f"{source.name!r} is not a supported causal LM: {first_line(e)}") from None
    return mark_loaded(model, source)


def text_config_of(source: Source) -> Any:
    """The text-decoder config of a model source, read without loading weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **source.hub_kwargs()).get_text_config(decoder=True)
    except OSError as e:
        raise ShortGPTError(f"cannot load {source.name!r}: {first_line(e)}") from None


def num_layers_of(source: Source) -> int | None:
    """How many decoder layers a model or a recipe has now, from its configs alone,
    so that an impossible removal is refused before any weights are read; None
    where that takes more than a config (a recipe in prefill-skip mode, an adapter)."""
    if source.kind == "recipe":
        from .modeling import read_recipe

        record = read_recipe(source)
        return record.num_hidden_layers if record.mode == "remove" else None
    return text_config_of(source).num_hidden_layers if source.kind == "model" else None


def base_of(source: Source) -> Source | None:
    """The model a recipe rebuilds from, or an adapter is trained on; None for a model."""
    if source.kind == "recipe":
        from .modeling import read_recipe, recipe_base

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
    raise ShortGPTError(
        f"no tokenizer found for {source.name!r}"
        + ("" if source.kind == "model" else " nor its base")
        + ": save the tokenizer beside the model, or give one (tokenizer=...)"
    )


def load_model(
    name_or_path: str, tokenizer: bool = True, *, adapters: bool = False, **from_pretrained_kwargs: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a built-in name, a dense model, a full pruned
    checkpoint (with a prefill-skip mode applied), a recipe (rebuilt by
    `PrunedForCausalLM`), or, with ``adapters``, a PEFT adapter (loaded with
    ``AutoPeftModelForCausalLM`` onto the base it names); from a folder or the Hub.
    ``from_pretrained_kwargs`` (``dtype``, ``device_map``, ``revision``...) go to
    ``from_pretrained``; ``revision`` is that of ``name_or_path`` itself."""
    hub = {k: v for k, v in from_pretrained_kwargs.items() if k in HUB_KWARGS}
    source = resolve(name_or_path, from_pretrained_kwargs.pop("revision", None), **hub)
    if source.kind == "adapter":
        if not adapters:
            raise ShortGPTError(
                f"{source.describe()} is a PEFT adapter, not a model: give the pruned model it was trained on, "
                "or merge it first (shortgpt heal --merge / save_healed(..., merge=True))"
            )
        model = _load_adapter(source, **from_pretrained_kwargs)
    elif source.kind == "recipe":
        from .modeling import load_pruned

        model = load_pruned(source, **from_pretrained_kwargs)
    else:
        model = load_native(source, **from_pretrained_kwargs)
        record = ShortGPTConfig.from_model(model)
        if record is not None and record.mode == "prefill_skip":
            from .modeling import apply_prefill_skip

            model = apply_prefill_skip(model, record)
    return model, (load_tokenizer(source) if tokenizer else None)


def adapter_base(source: Source) -> Source:
    """The model a PEFT adapter names as its base."""
    import json

    from .sources import ADAPTER_CONFIG

    base_name = json.loads(source.read_text(ADAPTER_CONFIG)).get("base_model_name_or_path")
    if not base_name:
        raise ShortGPTError(f"{source.describe()} names no base model (base_model_name_or_path is empty)")
    return resolve(base_name)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Wrapping a model with PEFT (to train it or to load an adapter) without the
    FutureWarning that peft 0.21 triggers by asking transformers 5 for a renamed
    property: it is nothing a user could act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_adapter(source: Source, **from_pretrained_kwargs: Any) -> nn.Module:
    from peft import AutoPeftModelForCausalLM

    from .verification import explained

    adapter_base(source)  # a missing base is one line here, not a traceback from inside peft
    with explained(source.describe(), "loading it onto its base"), quiet_peft():
        return AutoPeftModelForCausalLM.from_pretrained(
            source.location, **(source.hub_kwargs() | from_pretrained_kwargs)
        )


def tokenizer_for(model: Any) -> Any:
    """The tokenizer saved with ``model`` (where it was loaded from), for calls that got none."""
    try:
        source = resolve(model.name_or_path)
    except ShortGPTError as e:
        raise ShortGPTError(
            f"no tokenizer given and none found at {model.name_or_path!r}: give one (tokenizer=...)"
        ) from e
    return load_tokenizer(source)
