"""Loading whatever a user calls "a model": a built-in name, a dense model, a full
pruned checkpoint, a recipe or a PEFT adapter, from a folder or the Hub
(`sources.resolve` decides which)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import ShortGPTConfig
from .errors import ShortGPTError
from .families import auto_class
from .pruning import tag_pruned
from .sources import HUB_KWARGS, Source, resolve

# from_pretrained arguments that also decide which config is read.
_CONFIG_KWARGS = (*HUB_KWARGS, "revision", "subfolder")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    for a vision-language model); loading failures become one-line errors."""
    from transformers import AutoConfig

    kwargs = source.hub_kwargs() | from_pretrained_kwargs
    hub = {k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS}
    try:
        model = auto_class(AutoConfig.from_pretrained(source.location, **hub)).from_pretrained(source.location, **kwargs)
    except OSError as e:
        raise ShortGPTError(f"cannot load {source.name!r}: {_first_line(e)}") from None
    except ValueError as e:  # e.g. a config with no causal-LM class (BERT, T5 encoders)
        raise ShortGPTError(f"{source.name!r} is not a supported causal LM: {_first_line(e)}") from None
    return mark_loaded(model, source)


def load_tokenizer(*sources: Source) -> Any:
    """The tokenizer of the first of ``sources`` that has one (a recipe or an adapter
    saved without its tokenizer uses its base's)."""
    from transformers import AutoTokenizer

    for source in sources:
        try:
            return AutoTokenizer.from_pretrained(source.location, **source.hub_kwargs())
        except (OSError, ValueError, TypeError):
            continue
    raise ShortGPTError(f"no tokenizer found for {sources[0].name!r} (nor its base): pass tokenizer=")


def load_model(name_or_path: str, tokenizer: bool = True, *, adapters: bool = False, **from_pretrained_kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a built-in name, a dense model, a full pruned
    checkpoint (with a prefill-skip mode applied), a recipe (rebuilt by
    `PrunedForCausalLM`), or, with ``adapters``, a PEFT adapter (loaded with
    ``AutoPeftModelForCausalLM`` onto the base it names); from a folder or the Hub.
    ``from_pretrained_kwargs`` (``dtype``, ``device_map``, ``revision``...) go to
    ``from_pretrained``."""
    hub = {k: v for k, v in from_pretrained_kwargs.items() if k in HUB_KWARGS}
    source = resolve(name_or_path, from_pretrained_kwargs.get("revision"), **hub)
    tokenizer_sources = [source]
    if source.kind == "adapter":
        if not adapters:
            raise ShortGPTError(
                f"{source.describe()} is a PEFT adapter, not a model: give the pruned model it was trained on, "
                "or merge it first (shortgpt heal --merge / save_healed(..., merge=True))"
            )
        model, base = _load_adapter(source, **from_pretrained_kwargs)
        tokenizer_sources.append(base)
    elif source.kind == "recipe":
        from .modeling import load_pruned, recipe_base

        model = load_pruned(source, **{k: v for k, v in from_pretrained_kwargs.items() if k != "revision"})
        tokenizer_sources.append(recipe_base(ShortGPTConfig.from_model(model)))
    else:
        model = load_native(source, **from_pretrained_kwargs)
        record = ShortGPTConfig.from_model(model)
        if record is not None and record.mode == "prefill_skip":
            from .modeling import apply_prefill_skip

            model = apply_prefill_skip(model, record)
    return model, (load_tokenizer(*tokenizer_sources) if tokenizer else None)


def _load_adapter(source: Source, **from_pretrained_kwargs: Any) -> tuple[nn.Module, Source]:
    import json

    from peft import AutoPeftModelForCausalLM

    from .sources import ADAPTER_CONFIG
    from .verification import explained

    base_name = json.loads(source.file(ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ShortGPTError(f"{source.describe()} names no base model (base_model_name_or_path is empty)")
    base = resolve(base_name)
    with explained(source.describe(), "loading it onto its base"):
        model = AutoPeftModelForCausalLM.from_pretrained(source.location, **source.hub_kwargs(), **from_pretrained_kwargs)
    return model, base


def tokenizer_for(model: Any) -> Any:
    """The tokenizer saved with ``model`` (where it was loaded from), for calls that got none."""
    try:
        source = resolve(model.name_or_path)
    except ShortGPTError as e:
        raise ShortGPTError(f"no tokenizer given and none found at {model.name_or_path!r}: pass tokenizer=") from e
    sources = [source]
    if source.kind == "recipe":
        from .modeling import read_recipe, recipe_base

        sources.append(recipe_base(read_recipe(source)))
    return load_tokenizer(*sources)
