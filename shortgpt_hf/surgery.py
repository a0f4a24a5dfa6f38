"""Removing decoder layers so that the result is still an ordinary, correct model.

Replacing the ``nn.ModuleList`` is the easy part. A transformers 5.x model
also keys its KV cache by each attention's ``layer_idx``, and builds its masks
and cache layers from per-layer settings in the config (``layer_types``,
``max_window_layers``, hybrid attention/mamba layouts...). Leave either stale
and the model runs, silently wrong: cached generation diverges from an
uncached forward, sliding-window layers get full masks, and a saved checkpoint
reloads with random layers. `remove_layers` fixes all of it, driven by the
per-family table in `families`, and `snapshot` / `restore` undo it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import UnsupportedModel
from .families import Family, describe, describe_config, family_of
from .layers import DecoderLayers, find_decoder_layers, text_config


def check_supported(model: nn.Module, indices: Sequence[int] = ()) -> None:
    """Refuse, before anything is touched, a model or a removal the family cannot express."""
    check_config(model.config, indices, type(model).__name__)
    family = family_of(text_config(model))
    if family.rebuild is not None and getattr(model, "hf_device_map", None):
        # The rebuilt modules would carry none of accelerate's placement hooks.
        raise UnsupportedModel(
            f"{describe(model)} rebuilds modules when layers are removed, which shortgpt_hf cannot do on a model "
            "dispatched with device_map; load it on one device to prune it"
        )


def check_config(config: Any, indices: Sequence[int], class_name: str) -> None:
    """`check_supported` from the config alone, so a loader can refuse before reading any weight."""
    cfg = config.get_text_config(decoder=True)
    family = family_of(cfg)
    name = describe_config(config, class_name)
    for refusal in family.refusals:
        refusal.check(cfg, name)
    removed = set(indices)
    kept = [i for i in range(cfg.num_hidden_layers) if i not in removed]
    family.check_keeps_attention(cfg, kept, name)
    for periodic in family.periodic:
        periodic.refit(cfg, kept, name)


def fix_config(cfg: Any, family: Family, kept: list[int]) -> None:
    """Rewrite the text config so every per-layer setting follows the ``kept`` original layers."""
    old_n = cfg.num_hidden_layers
    new_index = {old: new for new, old in enumerate(kept)}
    updates: dict[str, Any] = {}
    for periodic in family.periodic:  # computed from the old layout, so before anything changes
        updates.update(periodic.refit(cfg, kept, family.name))
    for key in family.layer_indices:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)):
            updates[key] = [new_index[i] for i in value if i in new_index]
    for key in family.per_layer:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) == old_n:
            updates[key] = type(value)(value[i] for i in kept)
    for key in family.thresholds:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            updates[key] = sum(1 for old in kept if old < value)
    updates.update(family.reset)
    updates["num_hidden_layers"] = len(kept)
    for key, value in updates.items():
        setattr(cfg, key, value)


def _renumber(layers: nn.ModuleList) -> None:
    """Give every module of each kept layer that carries a ``layer_idx`` its new index (cache slot)."""
    for new, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new


def _rename_device_map(device_map: dict[str, Any], path: str, kept: list[int]) -> dict[str, Any]:
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)(\..*)?$")
    new_index = {old: new for new, old in enumerate(kept)}
    renamed = {}
    for key, device in device_map.items():
        match = pattern.match(key)
        if match is None:
            renamed[key] = device
        elif int(match.group(1)) in new_index:
            renamed[f"{path}.{new_index[int(match.group(1))]}{match.group(2) or ''}"] = device
    return renamed


def remove_layers(model: nn.Module, indices: Sequence[int]) -> None:
    """Structurally remove CURRENT layers ``indices``; no bookkeeping of why (see `prune`)."""
    check_supported(model, indices)
    found = find_decoder_layers(model)
    cfg = text_config(model)
    family = family_of(cfg)
    removed = set(indices)
    kept = [i for i in range(len(found.layers)) if i not in removed]
    setattr(found.decoder, found.attr, nn.ModuleList(found.layers[i] for i in kept))
    _renumber(getattr(found.decoder, found.attr))
    fix_config(cfg, family, kept)
    if family.rebuild is not None:
        family.rebuild(model, found.decoder, kept)
    if getattr(model, "hf_device_map", None):
        model.hf_device_map = _rename_device_map(model.hf_device_map, found.path, kept)


_MODULE_DICTS = ("_modules", "_parameters", "_buffers")


def _shallow(module: nn.Module) -> dict[str, Any]:
    return {k: (copy.copy(v) if k in _MODULE_DICTS else v) for k, v in vars(module).items()}


@dataclass
class Snapshot:
    """What `remove_layers` mutates, so that any failure, or an ablation, can put it back exactly.

    The model's and the decoder's attributes are copied shallowly (that covers
    the layer list, ``hf_device_map`` and any table a family's ``rebuild``
    recomputes), and so are every decoder submodule's child and parameter
    dicts (a ``rebuild`` may swap a kept layer's submodules; a recovery that
    folds a map into kept weights installs new parameters rather than writing
    into the old ones). Modules and tensors are shared, never copied, so a
    snapshot of a 70B model costs kilobytes.
    """

    found: DecoderLayers
    model_state: dict[str, Any]
    decoder_state: dict[str, Any]
    children: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]
    config: dict[str, Any]
    shortgpt: Any
    layer_idx: list[tuple[nn.Module, int]]


def snapshot(model: nn.Module) -> Snapshot:
    """Record what `remove_layers` may change; cheap, so `prune` takes one every time."""
    found = find_decoder_layers(model)
    return Snapshot(
        found=found,
        model_state=_shallow(model),
        decoder_state=_shallow(found.decoder),
        children=[(m, copy.copy(m._modules), copy.copy(m._parameters)) for m in found.decoder.modules()],
        config=copy.deepcopy(vars(text_config(model))),
        shortgpt=copy.deepcopy(getattr(model.config, "shortgpt", None)),
        layer_idx=[(m, m.layer_idx) for m in found.layers.modules() if isinstance(getattr(m, "layer_idx", None), int)],
    )


def restore(model: nn.Module, snap: Snapshot) -> None:
    """Put back everything `snapshot` recorded: layer list, rebuilt modules, folded weights, config, record,
    cache indices."""
    for module, children, parameters in snap.children:
        module._modules = copy.copy(children)
        module._parameters = copy.copy(parameters)
    training = model.training  # a mode set meanwhile (model.eval()) is the user's, not the surgery's
    for module, state in ((model, snap.model_state), (snap.found.decoder, snap.decoder_state)):
        vars(module).clear()
        vars(module).update({k: (copy.copy(v) if k in _MODULE_DICTS else v) for k, v in state.items()})
    model.train(training)  # the layers put back take the model's mode too
    cfg = text_config(model)
    vars(cfg).clear()
    vars(cfg).update(copy.deepcopy(snap.config))
    if snap.shortgpt is None:
        vars(model.config).pop("shortgpt", None)
    else:
        model.config.shortgpt = copy.deepcopy(snap.shortgpt)
    for module, idx in snap.layer_idx:
        module.layer_idx = idx
