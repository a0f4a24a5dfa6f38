"""Removing decoder layers so that the result is still an ordinary, correct model.

Replacing the ``nn.ModuleList`` is the easy 10%. A transformers 5.x model also
keys its KV cache by each attention's ``layer_idx`` and builds its masks and
cache layers from per-layer lists in the config (``layer_types``...). Leave
either stale and the model runs, silently wrong: cached generation diverges
from an uncached forward, sliding-window layers get full masks, and a saved
checkpoint reloads with random layers. `remove_layers` fixes all of it in one
place (DESIGN.md §2), and `verify_pruned` proves it on every prune.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import ShortGPTConfig, base_name, hub_revision
from .errors import ShortGPTError
from .layers import find_decoder_layers, input_device, layers_as_identity, probe_ids, text_config

if TYPE_CHECKING:
    from .scoring import LayerScores

# Config lists that hold layer INDICES (remapped), as opposed to one entry per
# layer (sliced). Any other list as long as the layer count is per-layer.
_INDEX_LISTS = ("moe_layers", "full_attn_idxs")
_NOT_PER_LAYER = ("eos_token_id", "bos_token_id", "pad_token_id", "architectures")


def check_supported(model: nn.Module) -> None:
    """Refuse configurations whose per-layer behaviour cannot survive renumbering."""
    cfg = text_config(model)
    name = f"{cfg.model_type} ({type(model).__name__})"
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise ShortGPTError(
            f"{name} uses scale_attn_by_inverse_layer_idx: each layer's attention scale is fixed by "
            "its original index, which a pruned checkpoint cannot express"
        )
    if getattr(cfg, "num_kv_shared_layers", 0):
        raise ShortGPTError(f"{name} shares KV caches across layers (num_kv_shared_layers); removing layers would break the sharing")
    if getattr(cfg, "kv_source_layers", None):
        raise ShortGPTError(f"{name} reads KV from other layers (kv_source_layers); removing layers would break it")
    if getattr(cfg, "moe_layer_freq", 1) not in (1, None):
        raise ShortGPTError(f"{name} places MoE layers by moe_layer_freq={cfg.moe_layer_freq}, which cannot be renumbered")


def removal_count(num_layers: int, n_layers: int | None = None, ratio: float | None = None) -> int:
    """How many layers ``n_layers`` or ``ratio`` removes, refusing none or all (cheap: check before scoring)."""
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ShortGPTError(f"ratio must be between 0 and 1, got {ratio}")
        n_layers = round(ratio * num_layers)
        if n_layers == 0:
            raise ShortGPTError(f"ratio {ratio} removes zero of {num_layers} layers")
    if not 0 < n_layers < num_layers:
        raise ShortGPTError(f"n_layers must remove between 1 and {num_layers - 1} of {num_layers} layers, got {n_layers}")
    return n_layers


def select_layers(
    num_layers: int,
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
    ratio: float | None = None,
    scores: "LayerScores | None" = None,
) -> list[int]:
    """Turn one of the three ways of asking into a sorted list of CURRENT layer indices."""
    given = [k for k, v in (("layers", layers), ("n_layers", n_layers), ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise ShortGPTError(f"give exactly one of layers, n_layers or ratio (got {', '.join(given) or 'none'})")
    if layers is not None:
        chosen = [int(i) for i in layers]
        if len(set(chosen)) != len(chosen):
            raise ShortGPTError(f"duplicate layer indices in {chosen}")
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise ShortGPTError(f"layer indices {bad} are out of range 0..{num_layers - 1}")
    else:
        count = removal_count(num_layers, n_layers, ratio)
        if scores is None:
            raise ShortGPTError("n_layers and ratio need scores (from score_layers) to choose layers")
        if scores.num_layers != num_layers:
            raise ShortGPTError(
                f"scores cover {scores.num_layers} layers but the model has {num_layers}; re-score the model"
            )
        chosen = scores.lowest(count)
    if not chosen:
        raise ShortGPTError("no layers to remove")
    if len(chosen) >= num_layers:
        raise ShortGPTError(f"cannot remove all {num_layers} layers")
    return sorted(chosen)


def _fix_config(cfg: Any, kept: list[int]) -> None:
    """Rewrite the text config so every per-layer setting follows the kept layers."""
    old_n = cfg.num_hidden_layers
    new_index = {old: new for new, old in enumerate(kept)}
    for key in _INDEX_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)):
            setattr(cfg, key, [new_index[i] for i in value if i in new_index])
    for key, value in list(vars(cfg).items()):
        if key in _INDEX_LISTS or key in _NOT_PER_LAYER or key.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == old_n:
            setattr(cfg, key, type(value)(value[i] for i in kept))
    if hasattr(cfg, "mlp_only_layers") and hasattr(cfg, "decoder_sparse_step"):
        dense = set(cfg.mlp_only_layers or [])
        step = cfg.decoder_sparse_step or 1
        sparse = [i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0 for i in range(old_n)]
        cfg.mlp_only_layers = [new for new, old in enumerate(kept) if not sparse[old]]
        cfg.decoder_sparse_step = 1
    for key in ("first_k_dense_replace", "max_window_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            setattr(cfg, key, sum(1 for old in kept if old < value))
    if getattr(cfg, "num_nextn_predict_layers", 0):
        # MTP weights are keyed after the last layer; after pruning nothing sits there.
        cfg.num_nextn_predict_layers = 0
    cfg.num_hidden_layers = len(kept)


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
    check_supported(model)
    found = find_decoder_layers(model)
    cfg = text_config(model)
    removed = set(indices)
    kept = [i for i in range(len(found.layers)) if i not in removed]
    parent = model.get_submodule(found.parent_path) if found.parent_path else model
    setattr(parent, found.attr, nn.ModuleList(found.layers[i] for i in kept))
    _renumber(getattr(parent, found.attr))
    _fix_config(cfg, kept)
    if getattr(model, "hf_device_map", None):
        model.hf_device_map = _rename_device_map(model.hf_device_map, found.path, kept)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _record(model: nn.Module, current: list[int], scores: "LayerScores | None") -> ShortGPTConfig:
    """The config after removing CURRENT layers ``current``, composed with any earlier pruning."""
    previous = ShortGPTConfig.from_model(model)
    original_n = previous.original_num_hidden_layers if previous else text_config(model).num_hidden_layers
    originals = previous.kept_layers if previous else list(range(original_n))
    removed = sorted(set(previous.removed_layers if previous else []) | {originals[i] for i in current})
    record = ShortGPTConfig(
        removed_layers=removed,
        original_num_hidden_layers=original_n,
        model_type=text_config(model).model_type,
        base_model_name_or_path=previous.base_model_name_or_path if previous else base_name(model.name_or_path),
        base_revision=previous.base_revision if previous else hub_revision(model.name_or_path),
        original_num_parameters=previous.original_num_parameters if previous else count_parameters(model),
    )
    if scores is not None:
        per_original: list[float | None] = [None] * original_n
        for current_index, value in enumerate(scores.scores):
            per_original[originals[current_index]] = value
        record.metric = scores.metric
        record.layer_scores = per_original
        record.block_size = scores.block_size
        record.calibration = scores.calibration_summary()
    elif previous is not None:
        record.metric, record.layer_scores = previous.metric, previous.layer_scores
        record.block_size, record.calibration = previous.block_size, previous.calibration
    return record


def parity_tolerance(model: nn.Module) -> float:
    return 1e-4 if model.dtype == torch.float32 else 3e-2


def logits_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.float().cpu(), b.float().cpu()
    return bool((a - b).abs().max() <= tol * max(1.0, a.abs().max().item()))


@torch.no_grad()
def uncached_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(input_device(model)), use_cache=False).logits.float().cpu()


@torch.no_grad()
def verify_pruned(model: nn.Module, reference: torch.Tensor | None = None) -> None:
    """Check a pruned model's KV-cache bookkeeping: cached decoding must equal an uncached forward.

    With ``reference`` (logits of the unpruned model with the removed layers as
    identity, on `probe_ids`), also check that removal changed nothing else.
    Raises `ShortGPTError` on a mismatch.
    """
    ids = probe_ids(model)
    full = uncached_logits(model, ids)
    tol = parity_tolerance(model)
    if reference is not None and not logits_close(full, reference, tol):
        raise ShortGPTError("verification failed: the pruned model does not match the original with those layers skipped")
    split = ids.shape[1] // 2
    device = input_device(model)
    try:
        out = model(input_ids=ids[:, :split].to(device), use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(split, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t : t + 1].to(device), cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
    except (IndexError, KeyError, RuntimeError) as e:  # e.g. a stale layer_idx past the cache's end
        raise ShortGPTError(f"verification failed: cached decoding crashed after pruning ({type(e).__name__}: {e})") from e
    cached = torch.stack([s.float().cpu() for s in steps], dim=1)
    if not logits_close(cached, full[:, split - 1 : -1], tol):
        raise ShortGPTError(
            "verification failed: cached decoding differs from an uncached forward after pruning "
            f"({type(model).__name__}); this model family needs support in shortgpt_hf"
        )


def prune(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    *,
    n_layers: int | None = None,
    ratio: float | None = None,
    scores: "LayerScores | None" = None,
    verify: bool = False,
) -> nn.Module:
    """Remove decoder layers in place and record them in ``model.config.shortgpt``.

    Ask with exactly one of: ``layers`` (current indices), ``n_layers`` or
    ``ratio`` (both choose the lowest-scoring layers of ``scores``). The record
    keeps ORIGINAL indices, so pruning twice composes. With ``verify=True`` the
    result is checked against the unpruned model with those layers skipped, and
    for cached-vs-uncached parity; on failure the model is restored and
    `ShortGPTError` raised.
    """
    check_supported(model)
    found = find_decoder_layers(model)
    chosen = select_layers(len(found.layers), layers, n_layers, ratio, scores)
    record = _record(model, chosen, scores)
    reference = None
    if verify:
        model_was_training = model.training
        model.eval()
        with layers_as_identity(model, chosen):
            reference = uncached_logits(model, probe_ids(model))
    snapshot = _snapshot(model, found) if verify else None
    remove_layers(model, chosen)
    model.config.shortgpt = record.to_dict()
    if verify:
        try:
            verify_pruned(model, reference)
        except ShortGPTError:
            _restore(model, snapshot)
            raise
        finally:
            model.train(model_was_training)
    return model


@contextlib.contextmanager
def restored_after(model: nn.Module) -> Iterator[nn.Module]:
    """Prune ``model`` in place as often as you like inside; on exit every removed
    layer, config entry, cache index and device-map entry is back. Lets an
    ablation evaluate many prunes of one model without a copy per prune (a
    copy of a 7B model is 14+ GB), and re-score between prunes (iterative)."""
    snapshot = _snapshot(model, find_decoder_layers(model))
    try:
        yield model
    finally:
        _restore(model, snapshot)


def _snapshot(model: nn.Module, found: Any) -> dict[str, Any]:
    """What `remove_layers` mutates, so a failed verification can undo it."""
    cfg = text_config(model)
    return {
        "found": found,
        "config": copy.deepcopy(vars(cfg)),
        "shortgpt": copy.deepcopy(getattr(model.config, "shortgpt", None)),
        "device_map": copy.copy(getattr(model, "hf_device_map", None)),
        "layer_idx": [(m, m.layer_idx) for m in found.layers.modules() if isinstance(getattr(m, "layer_idx", None), int)],
    }


def _restore(model: nn.Module, snap: dict[str, Any]) -> None:
    found = snap["found"]
    parent = model.get_submodule(found.parent_path) if found.parent_path else model
    setattr(parent, found.attr, found.layers)
    vars(text_config(model)).update(snap["config"])
    if snap["shortgpt"] is None:
        vars(model.config).pop("shortgpt", None)
    else:
        model.config.shortgpt = snap["shortgpt"]
    if snap["device_map"] is not None:
        model.hf_device_map = snap["device_map"]
    for module, idx in snap["layer_idx"]:
        module.layer_idx = idx
