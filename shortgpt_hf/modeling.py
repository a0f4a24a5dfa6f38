"""`PrunedForCausalLM`: one entry point for the three ways a pruned model is shared.

(a) a native pruned checkpoint (``config.json`` carries ``shortgpt``): loaded as is;
(b) a recipe (``shortgpt_config.json`` naming a base model and revision), like a
    PEFT adapter: the base is loaded with only the kept layers, and the
    linear repair maps in ``shortgpt/linear_maps.safetensors``, if any, are folded back in;
(c) a base model plus ``removed_layers=[...]``.

Loading only the kept layers: a throwaway subclass of the native
class swaps each removed layer for a parameter-less stand-in at the end of
``__init__`` (``post_init``), so transformers never reads, allocates or places
those weights, including under ``device_map="auto"``. After loading, the list is
compacted with the same `remove_layers` that in-memory pruning uses, and the
object becomes an instance of the native class again.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CONFIG_NAME, RecipeConfig, ShortGPTConfig
from .errors import ShortGPTError, first_line
from .families import describe_config, family_of, native_class
from .layers import find_decoder_layers
from .loading import load_native, mark_loaded, text_config_of
from .pruning import count_parameters
from .recovery.linear import attach_maps, fold_maps, load_maps, map_keys, maps_from_record
from .sources import HUB_KWARGS, Source, resolve
from .surgery import check_config, remove_layers
from .verification import explained


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


def read_recipe(source: Source) -> ShortGPTConfig:
    """The record a recipe folder or repo holds (the source is already resolved: no second lookup)."""
    return ShortGPTConfig.from_json_string(source.read_text(CONFIG_NAME))


def recipe_base(record: ShortGPTConfig, **hub_kwargs: Any) -> Source:
    """The recipe's base, at its pinned revision (or, with a warning, the current one when the pinned one is gone)."""
    name = record.base_model_name_or_path
    if not name:
        raise ShortGPTError("the recipe names no base model (base_model_name_or_path is empty)")
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
        raise ShortGPTError(f"the recipe's base model is unavailable: {e}") from None
    if base.kind != "model":
        raise ShortGPTError(f"the recipe's base is {base.describe()}; a recipe applies to a dense model")
    return base


def _check_base(record: ShortGPTConfig, config: Any, where: str) -> None:
    text = config.get_text_config(decoder=True)
    if getattr(config, "shortgpt", None) is not None:
        raise ShortGPTError(f"base {where} is itself a pruned model; a recipe applies to an unpruned base")
    if record.model_type is not None and text.model_type != record.model_type:
        raise ShortGPTError(f"the recipe is for a {record.model_type} model but base {where} is {text.model_type}")
    if text.num_hidden_layers != record.original_num_hidden_layers:
        raise ShortGPTError(
            f"the recipe expects {record.original_num_hidden_layers} layers "
            f"but base {where} has {text.num_hidden_layers}"
        )


def _load_from_base(
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
        raise ShortGPTError(f"cannot read the base model's config at {base.name!r}: {first_line(e)}") from None
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
    from .prefill_skip import enable_prefill_skip

    model.config.shortgpt = record.to_dict()  # enable_prefill_skip keeps its provenance (base, scores)
    return enable_prefill_skip(model, record.removed_layers, boundary=record.prefill_boundary is not False)


# What AutoModelForCausalLM.from_pretrained adds for the class it dispatches to; the base's own load needs none of it.
_AUTO_KWARGS = ("_from_auto", "adapter_kwargs", "trust_remote_code", "code_revision")


def load_pruned(
    source: Source, *, removed_layers: Sequence[int] | None = None, mode: str | None = None, **kwargs: Any
) -> nn.Module:
    """The model `PrunedForCausalLM.from_pretrained` documents, from a resolved source."""
    if removed_layers is not None:
        if source.kind != "model" or source.pruned:
            raise ShortGPTError(f"removed_layers=[...] prunes a dense base on load; {source.describe()} is not one")
        text = text_config_of(source)
        record = ShortGPTConfig(
            removed_layers=list(removed_layers),
            original_num_hidden_layers=text.num_hidden_layers,
            model_type=text.model_type,
            base_model_name_or_path=source.portable,
            base_revision=source.revision,
            mode=mode or "remove",
        )
        return mark_loaded(_load_from_base(source, record, **kwargs), source)
    if source.kind == "adapter":
        raise ShortGPTError(
            f"{source.describe()} is a PEFT adapter: load it with peft's AutoPeftModelForCausalLM.from_pretrained"
        )
    if source.kind == "recipe":
        record = read_recipe(source)
        if mode is not None:
            record = ShortGPTConfig.from_dict({**record.to_dict(), "mode": mode})
        maps = load_maps(source, record) if record.mode == "remove" else None
        hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        model = _load_from_base(recipe_base(record, **hub), record, maps, **kwargs)
        return mark_loaded(model, source)
    model = load_native(source, **kwargs)
    record = ShortGPTConfig.from_model(model)
    if record is None:
        raise ShortGPTError(
            f"{source.describe()} has no layers removed: prune it first (shortgpt prune), "
            "or name the layers to remove on load (removed_layers=[...])"
        )
    if mode is not None and mode != record.mode:
        raise ShortGPTError(
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


class PrunedForCausalLM:
    """Loads pruned models; like ``AutoModelForCausalLM``, it returns an instance
    of the native transformers class (e.g. ``LlamaForCausalLM``), with
    ``config.shortgpt`` set and, when dispatched, a correct ``hf_device_map``.

    After ``import shortgpt_hf``, ``AutoModelForCausalLM.from_pretrained`` and
    ``pipeline`` load recipes through this class too (see `shortgpt_hf.auto`).
    """

    def __init__(self) -> None:
        raise OSError("PrunedForCausalLM is a loader: use PrunedForCausalLM.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        removed_layers: Sequence[int] | None = None,
        mode: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        """Load (a) a native pruned checkpoint, (b) a recipe, or (c) a base with
        ``removed_layers`` (original indices), from a folder or a Hub id.
        ``mode="prefill_skip"`` skips those layers during prefill only instead
        of removing them (the default is the recipe's own mode). ``revision`` is
        that of the checkpoint or recipe; a recipe pins its base's revision
        itself. Other kwargs (``dtype``, ``device_map``, ``max_memory``,
        ``offload_folder``, ``attn_implementation``, ``token``...) go to
        ``from_pretrained``."""
        if model_args:
            raise ShortGPTError("PrunedForCausalLM.from_pretrained takes no positional arguments besides the model")
        adapter = (kwargs.get("adapter_kwargs") or {}).get(
            "_adapter_model_path"
        )  # AutoModelForCausalLM on an adapter folder
        adapter_kwargs = {k: v for k, v in (kwargs.get("adapter_kwargs") or {}).items() if k != "_adapter_model_path"}
        for key in _AUTO_KWARGS:
            kwargs.pop(key, None)
        if isinstance(kwargs.get("config"), RecipeConfig):  # what AutoModelForCausalLM read from the recipe's marker
            kwargs = kwargs.pop("config").absorbed_kwargs() | kwargs
        if kwargs.pop("subfolder", None):
            raise ShortGPTError("subfolder= is not supported for pruned models: give the folder itself")
        hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        source = resolve(pretrained_model_name_or_path, revision, **hub)
        model = load_pruned(source, removed_layers=removed_layers, mode=mode, **kwargs)
        if adapter is not None:  # transformers' PEFT integration: the adapter goes on the model it names as base
            model.load_adapter(adapter, adapter_kwargs=adapter_kwargs)
        return model
