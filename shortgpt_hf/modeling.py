"""`PrunedForCausalLM`: one entry point for the three ways a pruned model is shared.

(a) a native pruned checkpoint (``config.json`` carries ``shortgpt``): loaded as is;
(b) a recipe (``shortgpt_config.json`` naming a base model and revision), like a
    PEFT adapter: the base is loaded with only the kept layers, and the
    linear repair maps in ``shortgpt_maps.safetensors``, if any, are folded back in;
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

from .builtin import BUILTINS, builtin_path
from .config import CONFIG_NAME, ShortGPTConfig, hub_file, base_name, hub_revision
from .errors import ShortGPTError
from .families import describe_config, family_of, native_class
from .layers import find_decoder_layers
from .loading import load_model
from .pruning import count_parameters
from .recovery.linear import MAPS_FILE, attach_maps, fold_maps, load_maps, map_keys, maps_from_record
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


def _resolve_base(record: ShortGPTConfig) -> tuple[str, str | None]:
    """Where to load the recipe's base from, and at which revision (warning if the pinned one is gone)."""
    name = record.base_model_name_or_path
    if not name:
        raise ShortGPTError("the recipe names no base model (base_model_name_or_path is empty)")
    if name in BUILTINS:
        return str(builtin_path(name)), None
    if Path(name).is_dir():
        return name, None
    if name.startswith((".", "/", "~")):
        raise ShortGPTError(f"base model not found: {name}")
    pinned = record.base_revision
    resolved = hub_revision(name, pinned)
    if resolved is None and pinned is not None:
        resolved = hub_revision(name)
    if resolved is None:
        raise ShortGPTError(f"base model {name!r} not found, locally or on the Hub (offline: is it in the huggingface_hub cache?)")
    if pinned is not None and resolved != pinned:
        warnings.warn(f"the recipe pins {name} at revision {pinned}, which is not available; loading revision {resolved} instead")
    return name, resolved


def _check_base(record: ShortGPTConfig, config: Any, where: str) -> None:
    text = config.get_text_config(decoder=True)
    if getattr(config, "shortgpt", None) is not None:
        raise ShortGPTError(f"base {where} is itself a pruned model; a recipe applies to an unpruned base")
    if record.model_type is not None and text.model_type != record.model_type:
        raise ShortGPTError(f"the recipe is for a {record.model_type} model but base {where} is {text.model_type}")
    if text.num_hidden_layers != record.original_num_hidden_layers:
        raise ShortGPTError(
            f"the recipe expects {record.original_num_hidden_layers} layers but base {where} has {text.num_hidden_layers}"
        )


def _load_from_base(source: str, record: ShortGPTConfig, revision: str | None, maps: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> nn.Module:
    """Build the model a record describes from its unpruned base: only the kept
    layers for ``mode="remove"`` (with any linear repair ``maps`` folded back
    into them), every layer plus prefill skipping otherwise."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except OSError as e:
        raise ShortGPTError(f"cannot read the base model's config at {source!r}: {str(e).splitlines()[0]}") from None
    _check_base(record, config, repr(record.base_model_name_or_path))
    native = native_class(config)
    if record.mode == "remove":
        check_config(config, record.removed_layers, native.__name__)
    if record.original_num_parameters is None:
        with torch.device("meta"):  # the base's size, for the record and the card, without allocating it
            record.original_num_parameters = count_parameters(native(config))
    if record.mode == "prefill_skip":
        model = native.from_pretrained(source, config=config, revision=revision, **kwargs)
        return _apply_prefill_skip(model, record)
    partial = family_of(config.get_text_config(decoder=True)).partial_load
    loader = _without_layers(native, record.removed_layers) if partial else native
    with explained(describe_config(config, native.__name__), "loading the recipe's base"):
        model = loader.from_pretrained(source, config=config, revision=revision, **kwargs)
    with explained(model, "removing the recipe's layers after loading"):
        remove_layers(model, record.removed_layers)
    model.__class__ = native
    model.config.shortgpt = record.to_dict()
    if maps:
        with explained(model, "folding the recipe's linear repair maps"):
            fold_maps(model, maps_from_record(record, maps))
        attach_maps(model, maps)
    return model


def _apply_prefill_skip(model: nn.Module, record: ShortGPTConfig) -> nn.Module:
    from .prefill_skip import enable_prefill_skip

    model.config.shortgpt = record.to_dict()  # enable_prefill_skip keeps its provenance (base, scores)
    return enable_prefill_skip(model, record.removed_layers, boundary=record.prefill_boundary is not False)


def _maps_file(name: str, revision: str | None) -> Path | None:
    """Where a recipe or checkpoint keeps its linear repair maps: its folder, or its Hub repo."""
    if Path(name).is_dir():
        return Path(name) / MAPS_FILE
    return hub_file(name, MAPS_FILE, revision)


class PrunedForCausalLM:
    """Loads pruned models; like ``AutoModelForCausalLM``, it returns an instance
    of the native transformers class (e.g. ``LlamaForCausalLM``), with
    ``config.shortgpt`` set and, when dispatched, a correct ``hf_device_map``."""

    def __init__(self) -> None:
        raise OSError("PrunedForCausalLM is a loader: use PrunedForCausalLM.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> nn.Module:
        """See `_load`; the returned model's ``push_to_hub`` uploads our model card too."""
        from .push import attach_push_to_hub

        return attach_push_to_hub(cls._load(pretrained_model_name_or_path, **kwargs))

    @classmethod
    def _load(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        removed_layers: Sequence[int] | None = None,
        mode: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        """Load (a) a native pruned checkpoint, (b) a recipe, or (c) a base with
        ``removed_layers`` (original indices). ``mode="prefill_skip"`` skips those
        layers during prefill only instead of removing them (the default is the
        recipe's own mode). ``revision`` is that of the checkpoint or recipe; a
        recipe pins its base's revision itself. Other kwargs (``dtype``,
        ``device_map``, ``max_memory``, ``offload_folder``,
        ``attn_implementation``...) go to ``from_pretrained``."""
        name = str(pretrained_model_name_or_path)
        if removed_layers is not None:
            return cls._from_base(name, removed_layers, mode or "remove", revision, **kwargs)
        record = cls._recipe(name, revision)
        if record is not None:
            if mode is not None:
                record = ShortGPTConfig.from_dict({**record.to_dict(), "mode": mode})
            maps = load_maps(_maps_file(name, revision), record, repr(name)) if record.mode == "remove" else None
            source, base_revision = _resolve_base(record)
            return _load_from_base(source, record, base_revision, maps, **kwargs)
        model, _ = load_model(name, tokenizer=False, revision=revision, **kwargs)
        record = ShortGPTConfig.from_model(model)
        if record is None:
            raise ShortGPTError(f"{name!r} is neither a pruned checkpoint nor a recipe; to prune on load pass removed_layers=[...]")
        if mode is not None and mode != record.mode:
            raise ShortGPTError(f"{name!r} is a full checkpoint saved in {record.mode!r} mode; it cannot be loaded in {mode!r} mode")
        maps_file = _maps_file(name, revision) if map_keys(record) else None
        if maps_file is not None and maps_file.is_file():  # already folded in; kept so that a recipe can be written from this model
            attach_maps(model, load_maps(maps_file, record, repr(name)))
        return _apply_prefill_skip(model, record) if record.mode == "prefill_skip" else model

    @staticmethod
    def _recipe(name: str, revision: str | None) -> ShortGPTConfig | None:
        """The recipe at ``name``, or None when ``name`` is a full checkpoint."""
        path = Path(name)
        if path.is_dir():
            return ShortGPTConfig.from_pretrained(path) if (path / CONFIG_NAME).is_file() and not (path / "config.json").is_file() else None
        if name in BUILTINS or hub_file(name, "config.json", revision) is not None:
            return None
        if hub_file(name, CONFIG_NAME, revision) is not None:
            return ShortGPTConfig.from_pretrained(name, revision=revision)
        return None

    @staticmethod
    def _from_base(name: str, removed_layers: Sequence[int], mode: str, revision: str | None, **kwargs: Any) -> nn.Module:
        from transformers import AutoConfig

        from .loading import resolve_model

        source = resolve_model(name)
        try:
            config = AutoConfig.from_pretrained(source, revision=revision)
        except OSError as e:
            raise ShortGPTError(f"cannot load {name!r}: {str(e).splitlines()[0]}") from None
        text = config.get_text_config(decoder=True)
        record = ShortGPTConfig(
            removed_layers=list(removed_layers),
            original_num_hidden_layers=text.num_hidden_layers,
            model_type=text.model_type,
            base_model_name_or_path=base_name(name),
            base_revision=revision or hub_revision(name),
            mode=mode,
        )
        return _load_from_base(source, record, revision or record.base_revision, **kwargs)


def load_any(name: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for anything a user may want to evaluate: a dense
    model, a pruned checkpoint (with its mode applied), a recipe, or a PEFT
    adapter folder (loaded with ``AutoPeftModelForCausalLM`` onto the pruned
    checkpoint it names as its base)."""
    from transformers import AutoTokenizer

    if (Path(name) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        with explained(f"the adapter at {name}", "loading it onto its base"):
            model = AutoPeftModelForCausalLM.from_pretrained(name, **kwargs)
        base = model.peft_config[model.active_adapter].base_model_name_or_path
        try:
            return model, AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):  # an adapter saved without its tokenizer: its base's is the same
            return model, AutoTokenizer.from_pretrained(base)
    record = PrunedForCausalLM._recipe(name, kwargs.get("revision"))
    if record is None:
        model, tok = load_model(name, **kwargs)
        saved = ShortGPTConfig.from_model(model)
        return (_apply_prefill_skip(model, saved) if saved is not None and saved.mode == "prefill_skip" else model), tok
    model = PrunedForCausalLM.from_pretrained(name, **kwargs)
    try:
        return model, AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):  # a recipe saved without its tokenizer: the base's is the same
        return model, AutoTokenizer.from_pretrained(_resolve_base(record)[0])
