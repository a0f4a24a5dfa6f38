"""`PrunedForCausalLM`: the front door for pruned models, as ``PeftModel`` is PEFT's.

``from_pretrained`` takes what a pruned model is shared as (a native pruned
checkpoint, a recipe, a dense base plus ``removed_layers=[...]``) and also a
request, ``shortgpt_config=ShortGPTConfig(ratio=0.25, ...)``, which scores,
prunes and repairs a dense model while loading it (`pipeline`). Whatever the
way in, the result is an instance of the native transformers class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .calibration import CalibrationData
from .config import RecipeConfig, ShortGPTConfig
from .errors import InvalidRequest
from .loading import load_pruned
from .pipeline import prune_pretrained
from .recovery.linear import map_keys
from .sources import HUB_KWARGS, resolve

# What AutoModelForCausalLM.from_pretrained adds for the class it dispatches to; the base's own load needs none of it.
_AUTO_KWARGS = ("_from_auto", "adapter_kwargs", "trust_remote_code", "code_revision")


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
        shortgpt_config: ShortGPTConfig | None = None,
        removed_layers: Sequence[int] | None = None,
        mode: str | None = None,
        revision: str | None = None,
        layer_by_layer: bool | None = None,
        calibration_data: CalibrationData = None,
        output_loading_info: bool = False,
        **kwargs: Any,
    ) -> nn.Module | tuple[nn.Module, dict[str, Any]]:
        """Load (a) a native pruned checkpoint, (b) a recipe, (c) a dense base with
        ``removed_layers`` (original indices), or (d) a dense base pruned on load as
        ``shortgpt_config`` asks, from a folder or a Hub id.

        With a request, ``shortgpt_config=ShortGPTConfig(ratio=0.25, recovery="linear")``,
        the base is scored, pruned and repaired while it loads (see `pipeline`): in
        memory when its checkpoint fits, else layer by layer from its safetensors
        shards, after which only the kept layers are loaded, the repair folded in,
        so a model larger than memory is never whole in memory. ``layer_by_layer``
        forces the choice (None: choose; the choice and its reason are logged, and
        with ``output_loading_info=True`` the call returns ``(model, info)``, where
        ``info["shortgpt"]`` is the `PruneResult`; ``info`` is empty when nothing
        was pruned on load). ``calibration_data`` overrides the request's calibration
        file with any data `score_layers` takes. Training recoveries (LoRA) are not
        run here: `heal` the returned model.

        ``mode="prefill_skip"`` skips ``removed_layers`` during prefill only instead
        of removing them (the default is the recipe's own mode). ``revision`` is
        that of the checkpoint or recipe; a recipe pins its base's revision
        itself. Other kwargs (``dtype``, ``device_map``, ``max_memory``,
        ``offload_folder``, ``attn_implementation``, ``token``...) go to
        ``from_pretrained``."""
        if model_args:
            raise InvalidRequest("PrunedForCausalLM.from_pretrained takes no positional arguments besides the model")
        adapter = (kwargs.get("adapter_kwargs") or {}).get(
            "_adapter_model_path"
        )  # AutoModelForCausalLM on an adapter folder
        adapter_kwargs = {k: v for k, v in (kwargs.get("adapter_kwargs") or {}).items() if k != "_adapter_model_path"}
        for key in _AUTO_KWARGS:
            kwargs.pop(key, None)
        if isinstance(kwargs.get("config"), RecipeConfig):  # what AutoModelForCausalLM read from the recipe's marker
            kwargs = kwargs.pop("config").absorbed_kwargs() | kwargs
        if kwargs.pop("subfolder", None):
            raise InvalidRequest("subfolder= is not supported for pruned models: give the folder itself")
        info: dict[str, Any] = {}
        if shortgpt_config is not None and shortgpt_config.is_request:
            if removed_layers is not None or mode is not None:
                raise InvalidRequest("give the layers in shortgpt_config, not also as removed_layers or mode")
            result = prune_pretrained(
                pretrained_model_name_or_path,
                shortgpt_config,
                layer_by_layer=layer_by_layer,
                calibration_data=calibration_data,
                revision=revision,
                **kwargs,
            )
            model, info["shortgpt"] = result.model, result
        else:
            if shortgpt_config is not None:  # a record: the recipe it describes, applied to this base
                if removed_layers is not None:
                    raise InvalidRequest("give the layers once: in the shortgpt_config record or as removed_layers")
                if map_keys(shortgpt_config):
                    raise InvalidRequest(
                        "this record's repair maps are not in it: load the recipe or checkpoint folder that has them"
                    )
                removed_layers, mode = shortgpt_config.removed_layers, mode or shortgpt_config.mode
            hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
            source = resolve(pretrained_model_name_or_path, revision, **hub)
            model = load_pruned(source, removed_layers=removed_layers, mode=mode, **kwargs)
        if adapter is not None:  # transformers' PEFT integration: the adapter goes on the model it names as base
            model.load_adapter(adapter, adapter_kwargs=adapter_kwargs)
        return (model, info) if output_loading_info else model
