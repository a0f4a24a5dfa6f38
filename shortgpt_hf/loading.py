"""Loading whatever a user calls "a model": a built-in name, a dense model, a full
pruned checkpoint, a recipe, a base plus the layers to remove, or a PEFT adapter,
from a folder or the Hub (`sources.resolve` decides which).

A pruned model built from its base (a recipe, or ``removed_layers=[...]``) reads
only the kept layers: a throwaway subclass of the native class swaps each
removed layer for a parameter-less stand-in at the end of ``__init__``
(``post_init``), so transformers never reads, allocates or places those
weights, including under ``device_map="auto"``. After loading, the list is
compacted with the same `remove_layers` that in-memory pruning uses, any
training-free repair is folded back in, and the object becomes an instance of
the native class again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .builtin import BUILTINS, DEFAULT_MODEL
from .compat import quiet_peft
from .config import ShortGPTConfig, tag_pruned
from .errors import InvalidRequest, SourceUnavailable, UnsupportedModel, first_line
from .families import auto_class, describe_config, family_of, native_class
from .layers import count_parameters, find_decoder_layers
from .prefill_skip import enable_prefill_skip
from .reading import adapter_base, load_tokenizer, read_recipe, recipe_base, text_config_of
from .recovery.linear import attach_maps, fold_maps, load_maps, map_keys, maps_from_record
from .sources import HUB_KWARGS, Source, resolve
from .surgery import check_config, remove_layers
from .verification import explained

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
        raise SourceUnavailable(f"cannot load {source.name!r}: {first_line(e)}") from None
    except ValueError as e:  # e.g. a config with no causal-LM class (BERT, T5 encoders)
        raise UnsupportedModel(f"{source.name!r} is not a supported causal LM: {first_line(e)}") from None
    return mark_loaded(model, source)


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
            raise InvalidRequest(
                f"{source.describe()} is a PEFT adapter, not a model: give the pruned model it was trained on, "
                "or merge it first (shortgpt heal --merge / save_healed(..., merge=True))"
            )
        model = _load_adapter(source, **from_pretrained_kwargs)
    elif source.kind == "recipe":
        model = load_pruned(source, **from_pretrained_kwargs)
    else:
        model = load_native(source, **from_pretrained_kwargs)
        record = ShortGPTConfig.from_model(model)
        if record is not None and record.mode == "prefill_skip":
            model = apply_prefill_skip(model, record)
    return model, (load_tokenizer(source) if tokenizer else None)


def _load_adapter(source: Source, **from_pretrained_kwargs: Any) -> nn.Module:
    from peft import AutoPeftModelForCausalLM

    adapter_base(source)  # a missing base is one line here, not a traceback from inside peft
    with explained(source.describe(), "loading it onto its base"), quiet_peft():
        return AutoPeftModelForCausalLM.from_pretrained(
            source.location, **(source.hub_kwargs() | from_pretrained_kwargs)
        )


def load_builtin(name: str = DEFAULT_MODEL, **from_pretrained_kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a built-in real model; kwargs go to ``from_pretrained``
    (``dtype``, ``device_map``...)."""
    if name not in BUILTINS:
        raise InvalidRequest(f"unknown built-in model {name!r}; choose from {', '.join(BUILTINS)}")
    return load_model(name, **from_pretrained_kwargs)


class RemovedLayer(nn.Module):
    """Holds a removed layer's slot during loading; it has no weights to read."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a removed layer was called: the model was not compacted after loading")


def _without_layers(native: type, removed: Sequence[int]) -> type:
    removed = list(removed)

    class Partial(native):
        def post_init(self) -> None:
            found = find_decoder_layers(self)
            for i in removed:
                found.layers[i] = RemovedLayer()
            super().post_init()
            # The checkpoint still has the removed layers' tensors: skipping them is the point, not news.
            skipped = rf"{re.escape(found.path)}\.({'|'.join(map(str, removed))})\."
            self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | {skipped}

    # Same name and module as the native class: transformers looks up checkpoint key conversions
    # (e.g. LLaVA's legacy key layout) by class name, and skips them for classes outside transformers.
    Partial.__name__ = Partial.__qualname__ = native.__name__
    Partial.__module__ = native.__module__
    return Partial


def _check_base(record: ShortGPTConfig, config: Any, where: str) -> None:
    text = config.get_text_config(decoder=True)
    if getattr(config, "shortgpt", None) is not None:
        raise InvalidRequest(f"base {where} is itself a pruned model; a recipe applies to an unpruned base")
    if record.model_type is not None and text.model_type != record.model_type:
        raise InvalidRequest(f"the recipe is for a {record.model_type} model but base {where} is {text.model_type}")
    if text.num_hidden_layers != record.original_num_hidden_layers:
        raise InvalidRequest(
            f"the recipe expects {record.original_num_hidden_layers} layers "
            f"but base {where} has {text.num_hidden_layers}"
        )


def load_from_base(
    base: Source, record: ShortGPTConfig, maps: dict[str, torch.Tensor] | None = None, **kwargs: Any
) -> nn.Module:
    """Build the model a record describes from its unpruned base: only the kept
    layers for ``mode="remove"`` (with any linear repair ``maps`` folded back
    into them), every layer plus prefill skipping otherwise."""
    from transformers import AutoConfig

    kwargs = base.hub_kwargs() | kwargs
    hub = {k: v for k, v in kwargs.items() if k in (*HUB_KWARGS, "revision")}
    # As AutoModelForCausalLM does: config overrides (output_attentions=..., attn_implementation=...)
    # go into the config, the rest to from_pretrained; dtype and quantization_config go to both.
    model_kwargs = {k: v for k, v in kwargs.items() if k not in hub}
    both = {k: model_kwargs.pop(k) for k in ("dtype", "torch_dtype", "quantization_config") if k in model_kwargs}
    try:
        config, model_kwargs = AutoConfig.from_pretrained(
            base.location, return_unused_kwargs=True, **hub, **model_kwargs
        )
    except OSError as e:
        raise SourceUnavailable(f"cannot read the base model's config at {base.name!r}: {first_line(e)}") from None
    kwargs = hub | model_kwargs | both
    _check_base(record, config, repr(record.base_model_name_or_path))
    native = native_class(config)
    if record.mode == "remove":
        check_config(config, record.removed_layers, native.__name__)
    if record.original_num_parameters is None:
        with torch.device("meta"):  # the base's size, for the record and the card, without allocating it
            record.original_num_parameters = count_parameters(native(config))
    if record.mode == "prefill_skip":
        model = native.from_pretrained(base.location, config=config, **kwargs)
        return apply_prefill_skip(model, record)
    partial = family_of(config.get_text_config(decoder=True)).partial_load
    loader = _without_layers(native, record.removed_layers) if partial else native
    with explained(describe_config(config, native.__name__), "loading the recipe's base"):
        model = loader.from_pretrained(base.location, config=config, **kwargs)
    with explained(model, "removing the recipe's layers after loading"):
        remove_layers(model, record.removed_layers)
    model.__class__ = native
    model.config.shortgpt = record.to_dict()
    if maps:
        with explained(model, "folding the recipe's linear repair maps"):
            fold_maps(model, maps_from_record(record, maps))
        attach_maps(model, maps)
    return model


def apply_prefill_skip(model: nn.Module, record: ShortGPTConfig) -> nn.Module:
    """Put a prefill-skip record's layer skipping in place on a loaded model."""
    model.config.shortgpt = record.to_dict()  # enable_prefill_skip keeps its provenance (base, scores)
    return enable_prefill_skip(model, record.removed_layers, boundary=record.prefill_boundary is not False)


def load_pruned(
    source: Source, *, removed_layers: Sequence[int] | None = None, mode: str | None = None, **kwargs: Any
) -> nn.Module:
    """The model `PrunedForCausalLM.from_pretrained` documents, from a resolved source."""
    if removed_layers is not None:
        if source.kind != "model" or source.pruned:
            raise InvalidRequest(f"removed_layers=[...] prunes a dense base on load; {source.describe()} is not one")
        text = text_config_of(source)
        record = ShortGPTConfig(
            removed_layers=list(removed_layers),
            original_num_hidden_layers=text.num_hidden_layers,
            model_type=text.model_type,
            base_model_name_or_path=source.portable,
            base_revision=source.revision,
            mode=mode or "remove",
        )
        return mark_loaded(load_from_base(source, record, **kwargs), source)
    if source.kind == "adapter":
        raise InvalidRequest(
            f"{source.describe()} is a PEFT adapter: load it with peft's AutoPeftModelForCausalLM.from_pretrained"
        )
    if source.kind == "recipe":
        record = read_recipe(source)
        if mode is not None:
            record = ShortGPTConfig.from_dict({**record.to_dict(), "mode": mode})
        maps = load_maps(source, record) if record.mode == "remove" else None
        hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        model = load_from_base(recipe_base(record, **hub), record, maps, **kwargs)
        return mark_loaded(model, source)
    model = load_native(source, **kwargs)
    record = ShortGPTConfig.from_model(model)
    if record is None:
        raise InvalidRequest(
            f"{source.describe()} has no layers removed: prune it first (shortgpt prune), "
            "or name the layers to remove on load (removed_layers=[...])"
        )
    if mode is not None and mode != record.mode:
        raise InvalidRequest(
            f"{source.describe()} was saved in {record.mode!r} mode; it cannot be loaded in {mode!r} mode"
        )
    if map_keys(record):  # already folded in; kept so that a recipe can be written from this model
        attach_maps(model, load_maps(source, record))
    return apply_prefill_skip(model, record) if record.mode == "prefill_skip" else model


def skeleton(source: Source) -> nn.Module:
    """The pruned model a checkpoint or recipe holds, built on the meta device from
    its configs alone: the architecture, the record and the parameter count, with
    no tensor read. Enough for a model card or a recipe (linear repair maps, a few
    KB, are read from their file), and what push uses for a folder whose files are
    uploaded as they are."""
    from transformers import AutoConfig

    if source.kind == "recipe":
        record = read_recipe(source)
        base = recipe_base(record)
        config = AutoConfig.from_pretrained(base.location, **base.hub_kwargs())
        _check_base(record, config, repr(record.base_model_name_or_path))
    else:
        config = AutoConfig.from_pretrained(source.location, **source.hub_kwargs())
        record = ShortGPTConfig.from_dict(config.shortgpt) if getattr(config, "shortgpt", None) else None
    with torch.device("meta"):
        model = native_class(config)(config)
    if source.kind == "recipe":
        if record.mode == "remove":
            with explained(model, "removing the recipe's layers on the meta device"):
                remove_layers(model, record.removed_layers)
        model.config.shortgpt = record.to_dict()
    if record is not None and map_keys(record):
        attach_maps(model, load_maps(source, record))
    return mark_loaded(model, source)
