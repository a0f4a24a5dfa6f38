"""`materialize`: a pruned native checkpoint written tensor by tensor from the base's shards.

The skeleton is pruned with the same `prune` that in-memory pruning uses, so
the config, the tensor names and the shard layout are what `save_pruned`
writes; each kept tensor is then copied into the new shards, one in memory
at a time, with any repair folded into the few tensors it changes. Removed
layers are never read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_folder, check_destination
from ..calibration import CalibrationData
from ..config import ShortGPTConfig
from ..errors import InvalidRequest, ShortGPTError, UnsupportedModel, VerificationFailed
from ..evaluation import HEADLINE, PerplexitySettings, perplexity_batches
from ..layers import find_decoder_layers, probe_ids
from ..reading import load_tokenizer, read_recipe, recipe_base
from ..recovery.linear import (
    LinearMap,
    LinearRepair,
    fold_maps,
    fold_rule,
    fold_targets,
    load_maps,
    maps_from_record,
    save_maps,
)
from ..scoring import LayerScores
from ..sources import resolve
from ..verification import logits_close, parity_tolerance
from .checkpoint import (
    DTYPE_NAMES,
    INDEX,
    Checkpoint,
    layer_keys,
    load_tensors,
    meta_skeleton,
    prune_skeleton,
    record_conversions,
)
from .walk import perplexity_of, walked_logits


def safetensors_header(layout: dict[str, torch.Tensor]) -> bytes:
    """The header of a safetensors file holding ``layout``'s tensors (meta tensors: shapes
    and dtypes only) in that order, so that the data can follow one tensor at a time.
    safetensors' own ``save_file`` needs every tensor of a shard in memory at once;
    the format (a little-endian u64 length, JSON padded to 8 bytes, then the raw
    bytes back to back) is what its reader, and transformers', read."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in layout.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def pruned_record(
    name_or_path: str | Path,
    removed_layers: Sequence[int],
    scores: LayerScores | None = None,
    repair: LinearRepair | None = None,
    request: dict[str, Any] | None = None,
) -> ShortGPTConfig:
    """The `ShortGPTConfig` that removing ``removed_layers`` from a dense model records
    (for `save_recipe`, with ``maps=repair.tensors`` when repaired), worked out on the
    meta device: no tensor is read."""
    model = meta_skeleton(resolve(name_or_path))
    prune_skeleton(model, removed_layers, scores, repair=repair, request=request)
    return ShortGPTConfig.from_model(model)


def _fold_repair(
    model: nn.Module, checkpoint: Checkpoint, maps: list[LinearMap], names: dict[str, str]
) -> dict[str, torch.Tensor]:
    """The tensors a linear repair changes, under their names in the pruned checkpoint
    (``names``: new name -> the base checkpoint's).

    For each kept layer that takes a map (or the input embeddings), the tensors
    its fold targets come from (found by running transformers' own
    ``revert_weight_conversion`` on the skeleton's meta parameters: one tensor
    per expert for a model stored that way) are read into the pruned skeleton,
    folded by the same `fold_maps` as in memory, and turned back into the
    checkpoint's layout the same way, as ``save_pretrained`` does. They are freed
    from the skeleton again; only the changed tensors wait to be written."""
    from transformers.core_model_loading import revert_weight_conversion

    kept = ShortGPTConfig.from_model(model).kept_layers
    current = {old: new for new, old in enumerate(kept)}
    fold = fold_rule(model)
    module_names = {id(module): name for name, module in model.named_modules()}
    hosts = dict.fromkeys(m.after for m in maps if m.map is not None and (m.after is None or m.after in current))
    changed: dict[str, torch.Tensor] = {}

    def stored(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = revert_weight_conversion(model, params)
        strange = [key for key in out if key not in names]
        if strange:
            raise UnsupportedModel(
                f"the repaired tensor {strange[0]} has no counterpart among the checkpoint's tensors: "
                "this checkpoint stores its weights under other names; load the model in memory to repair it"
            )
        return out

    for after in hosts:
        targets = fold_targets(model, -1 if after is None else current[after], fold)
        params = {f"{module_names[id(module)]}.{name}": module._parameters[name] for module, name in targets}
        keys = list(stored(params))
        load_tensors(model, checkpoint, [names[k] for k in keys], torch.device("cpu"), {names[k]: k for k in keys})
        fold_maps(model, [m for m in maps if m.after == after])
        folded = {name: module._parameters[attr].detach() for name, (module, attr) in zip(params, targets, strict=True)}
        changed |= {key: tensor.contiguous() for key, tensor in stored(folded).items()}
        for module, _ in targets:
            module.to_empty(device="meta")
    return changed


def materialize(
    name_or_path: str | Path,
    out_dir: str | Path,
    *,
    removed_layers: Sequence[int] | None = None,
    scores: LayerScores | None = None,
    repair: LinearRepair | None = None,
    request: dict[str, Any] | None = None,
    eval_data: CalibrationData = None,
    eval_settings: PerplexitySettings = HEADLINE,
    verify: bool = True,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    _checkpoint: Checkpoint | None = None,
) -> Path:
    """Write the pruned native checkpoint of a recipe (or of a dense model and
    ``removed_layers``) straight from the base's safetensors shards, one tensor in
    memory at a time: what `save_pruned` would write for the same model, tensor for
    tensor, without ever building it. ``scores`` (from `score_layers_sequentially`)
    are recorded in ``config.shortgpt`` as `prune` records them; a ``repair`` (from
    `fit_linear_sequentially`), or the maps a recipe carries, is folded into the few
    tensors it touches; ``request`` (a `ShortGPTConfig` request's fields) is recorded as
    the request the checkpoint carries out. With a ``repair`` and ``eval_data``, the held-out perplexity of
    plain removal and of the repaired checkpoint (measured layer by layer, in its
    temporary folder before it is moved into place) go into the repair's record, as
    ``prune(..., recovery="linear")`` records them. With ``verify``, the written
    checkpoint's logits, computed layer by layer in its temporary folder, must equal
    the base's with the layers skipped (and any maps applied to the outputs they
    fold into) before the folder is moved into place; this reads the base and the
    result once more each. Atomic like every other write."""
    from huggingface_hub import split_torch_state_dict_into_shards

    source = resolve(name_or_path)
    check_destination(out_dir, overwrite)
    record = None
    if source.kind == "recipe":
        if removed_layers is not None or repair is not None:
            raise InvalidRequest(f"{source.describe()} names its removed layers and repair itself; give neither")
        record = read_recipe(source)
        if record.mode != "remove":
            raise InvalidRequest(f"{source.describe()} skips layers in prefill only; there is nothing to materialize")
        base, removed = recipe_base(record), list(record.removed_layers)
        map_tensors = load_maps(source, record)
        maps = maps_from_record(record, map_tensors)
    elif source.kind == "model" and not source.pruned:
        if not removed_layers:
            raise InvalidRequest(f"{source.describe()} is dense: name the layers to remove (removed_layers / --layers)")
        base, removed = source, list(removed_layers)
        maps, map_tensors = (repair.maps, repair.tensors) if repair is not None else ([], {})
    else:
        raise InvalidRequest(f"materialize reads a recipe or a dense model; {source.describe()} is neither")
    checkpoint = _checkpoint or Checkpoint.open(base)
    model = meta_skeleton(base)
    record_conversions(model, checkpoint)
    found = find_decoder_layers(model)
    prefix = f"{found.path}."
    by_layer = layer_keys(checkpoint, prefix, len(found.layers), base.describe())
    kept = [i for i in range(len(found.layers)) if i not in set(removed)]
    prune_skeleton(model, removed, scores, record, repair, request)
    # The kept tensors as the checkpoint stores them (save_pretrained writes that same form back),
    # the layer index in their names renumbered; removed layers' tensors are never opened.
    in_layers = {key for keys in by_layer for key in keys}
    names = {key: key for key in checkpoint.files if key not in in_layers}
    for new, old in enumerate(kept):
        names |= {f"{prefix}{new}.{key[len(f'{prefix}{old}.') :]}": key for key in by_layer[old]}
    tensors = checkpoint.meta_tensors(list(names.values()))
    try:  # before anything is written
        split = split_torch_state_dict_into_shards(
            {new: tensors[old] for new, old in names.items()}, max_shard_size=max_shard_size
        )
    except ValueError as e:
        raise InvalidRequest(f"max shard size {max_shard_size!r} is not a size like 5GB or 500MB ({e})") from None
    folded = _fold_repair(model, checkpoint, maps, names) if maps else {}
    # Verification and the repair's perplexity walk the base now (with the layers skipped) and the
    # written checkpoint later, in its temporary folder: one walk for both there.
    ids = probe_ids(model)
    probe = [(ids, torch.ones_like(ids))] if verify else []
    if verify:
        current = set(range(len(found.layers))) - set(removed)  # a map whose layer a later prune removed went too
        kept_maps = [m for m in maps if m.after is None or m.after in current]
        walked = walked_logits(base, probe, checkpoint=checkpoint, skip=removed, maps=kept_maps, progress=False)
        expected = next(walked)
    measured = repair is not None and eval_data is not None
    how = eval_settings
    held_out = (  # perplexity_batches' (ids, mask, labels)
        perplexity_batches(load_tokenizer(base), eval_data, how.seq_len, how.stride, how.max_tokens, 8)
        if measured
        else []
    )
    held_inputs = [(batch_ids, mask) for batch_ids, mask, _ in held_out]
    if measured:
        walked = walked_logits(base, held_inputs, checkpoint=checkpoint, skip=removed, progress=progress)
        before = perplexity_of(walked, held_out)
    with atomic_folder(out_dir, overwrite) as tmp:
        bar = tqdm(total=len(names), unit="tensor", desc="materializing", disable=not progress)
        for filename, keys in split.filename_to_tensors.items():
            layout = {key: folded.get(key, tensors[names[key]]) for key in keys}
            with open(tmp / filename, "wb") as f:
                f.write(safetensors_header(layout))
                for key in keys:  # one tensor in memory at a time
                    if key in folded:
                        tensor = folded.pop(key)
                    else:
                        ((_, tensor),) = checkpoint.read([names[key]])
                    f.write(tensor.contiguous().view(torch.uint8).numpy())  # its buffer, not a copy
                    del tensor
                    bar.update()
        bar.close()
        if split.is_sharded:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": split.tensor_to_filename,
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_maps(map_tensors, ShortGPTConfig.from_model(model), tmp)  # as save_pruned keeps them, for a recipe
        try:
            load_tokenizer(source).save_pretrained(tmp)
        except ShortGPTError:
            pass  # a base saved without a tokenizer gives a checkpoint without one, as save_pruned does
        written = walked_logits(resolve(tmp), probe + held_inputs, progress=progress) if probe + held_inputs else None
        if verify and not logits_close(next(written), expected, parity_tolerance(model)):
            raise VerificationFailed(
                "verification failed: the materialized checkpoint's logits differ from the base's with those layers "
                "removed; nothing was written"
            )
        if measured:
            after = perplexity_of(written, held_out)
            record = model.config.shortgpt
            entry = record["recovery"][-1] | dict(
                perplexity_before=round(before, 4),
                perplexity_after=round(after, 4),
                perplexity_settings=eval_settings.describe(),
            )
            model.config.shortgpt = record | {"recovery": [*record["recovery"][:-1], entry]}
            model.config.save_pretrained(tmp)
    return Path(out_dir).resolve()
