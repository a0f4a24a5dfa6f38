"""The prune job, from a model's name to a pruned model or folder: one pipeline, two paths.

`prune_pretrained` (behind ``PrunedForCausalLM.from_pretrained(..., shortgpt_config=...)``)
and `prune_to_folder` (behind ``shortgpt prune``) take a `ShortGPTConfig`
request and choose how to carry it out:

- **in memory**, when the checkpoint fits: the model is loaded whole and
  `pruning.carry_out` scores, removes, verifies and repairs it;
- **layer by layer**, when it does not (or when asked): the same metrics and
  training-free repairs run through the layer walk (``streaming``), one layer
  in memory at a time, and the result is built from the kept layers only: a
  model loaded with only those layers and the repair folded in, or a
  checkpoint written tensor by tensor, or a recipe.

Both paths choose the same layers and give the same logits. Everything that
can be refused (an impossible removal, an unknown method, an unreadable
calibration file, a folder that cannot be written) is refused before any
weight is read. The path taken and why is logged (``shortgpt_hf`` logger,
INFO) and kept in the `PruneResult`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import check_destination
from .calibration import CalibrationData, check_sources
from .config import ShortGPTConfig
from .errors import InvalidRequest, ShortGPTError, VerificationFailed
from .evaluation import HEADLINE, SUMMARY_TOKENS, PerplexitySettings, evaluate, fidelity_record, perplexity
from .families import describe, is_vision_language
from .layers import count_parameters, find_decoder_layers, input_device, probe_ids
from .loading import load_from_base, load_model
from .pruning import carry_out
from .reading import load_tokenizer, num_layers_of, text_config_of
from .recovery.base import recovered_base
from .registry import METRICS, RECOVERY_METHODS
from .saving import save_pruned, save_recipe
from .scoring import LayerScores
from .selection import select_layers
from .sources import HUB_KWARGS, Source, resolve
from .streaming import (
    LinearRepair,
    available_memory,
    checkpoint_bytes,
    dense_driver,
    materialize,
    perplexity_sequentially,
    pruned_record,
    score_layers_sequentially,
)
from .streaming.checkpoint import meta_skeleton
from .streaming.walk import WalkedReference, fit_removal, walked_logits
from .surgery import check_supported, remove_layers
from .texts import heldout_texts
from .verification import logits_close, parity_tolerance, uncached_logits, verify_pruned

logger = logging.getLogger("shortgpt_hf")

IN_MEMORY, LAYER_BY_LAYER = "in memory", "layer by layer"
STREAMING_SHARE = 0.7  # of the free memory: above it, auto goes layer by layer (activations and copies need the rest)


@dataclass
class PruneResult:
    """What a prune job did: the record, the path it took and why, the scores it chose by,
    each recovery step's figures, and what it wrote (or the model it built)."""

    config: ShortGPTConfig  # the record, as the model's config.shortgpt holds it
    path: str  # IN_MEMORY or LAYER_BY_LAYER
    reason: str
    num_layers_before: int
    scores: LayerScores | None = None
    folder: Path | None = None
    kind: str | None = None  # "checkpoint" or "recipe" when a folder was written
    verified: bool = False
    parameters_before: int | None = None
    parameters_after: int | None = None
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def recovery(self) -> list[dict[str, Any]]:
        """The recovery steps this job ran, with their figures (held-out perplexity before and after...)."""
        steps = self.config.recovery or []
        asked = len((self.config.request or {}).get("recovery") or [])
        return steps[len(steps) - asked :] if asked else []


def choose_path(
    source: Source, layer_by_layer: bool | None, dtype: Any = None, device_map: Any = None
) -> tuple[bool, str]:
    """Whether to go layer by layer, and why: asked for, or a dense checkpoint larger than
    `STREAMING_SHARE` of the free memory of the device it would run on."""
    if layer_by_layer is False:
        return False, "as asked"
    dense = source.kind == "model" and not source.pruned
    if layer_by_layer is None and (not dense or device_map):
        return False, "a pruned model or recipe" if not dense else "placed with device_map"
    if not dense:
        raise InvalidRequest(f"layer by layer prunes a dense model's checkpoint; {source.describe()} is not one")
    if device_map:
        raise InvalidRequest("layer by layer places one layer at a time itself; give no device_map")
    if layer_by_layer:
        return True, "as asked"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, free = checkpoint_bytes(source), available_memory(device)
    stored_half = str(getattr(text_config_of(source), "dtype", "")).endswith(("bfloat16", "float16"))
    if dtype in (torch.float32, "float32") and stored_half:
        size *= 2
    streaming = size > STREAMING_SHARE * free
    return streaming, f"{_size(size)} of weights, {_size(free)} free on {device}"


def _start(
    name_or_path: str | Path, config: ShortGPTConfig, layer_by_layer: bool | None, kwargs: dict[str, Any]
) -> tuple[Source, bool, str, int]:
    """What both jobs do before any weight is read: resolve the name (with the Hub arguments among
    ``kwargs``; ``revision`` is taken out of them), choose the path, refuse what cannot be done, and
    say which path and why. The source, whether layer by layer, why, and the current layer count."""
    hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    source = resolve(name_or_path, kwargs.pop("revision", None), **hub)
    streaming, reason = choose_path(source, layer_by_layer, kwargs.get("dtype"), kwargs.get("device_map"))
    n = check_request(source, config, streaming)
    how = f"{LAYER_BY_LAYER}, from the safetensors shards" if streaming else IN_MEMORY
    logger.info("path: %s (%s)", how, reason)
    return source, streaming, reason, n


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def check_request(source: Source, config: ShortGPTConfig, streaming: bool) -> int:
    """Refuse, from configs and files alone, what cannot be carried out; the number of layers
    the model has now (before any weight is read)."""
    if not config.is_request:
        raise InvalidRequest("this ShortGPTConfig is a record (removed_layers is set); give a request")
    if config.calibration is not None:
        check_sources(config.calibration)
    n = num_layers_of(source)
    if n is not None:
        config.removal_count(n)
    trained = config.trained_steps()
    if trained:
        raise InvalidRequest(
            f"recovery {trained[0]!r} trains the pruned model, which this job does not do while loading or writing: "
            "prune here, then train it (or carry out the request in memory with prune(model, config))"
        )
    if streaming and config.mode == "prefill_skip":
        raise InvalidRequest("prefill skipping keeps every layer in memory; it cannot go layer by layer")
    return n or 0


def prune_pretrained(
    name_or_path: str | Path,
    config: ShortGPTConfig,
    *,
    layer_by_layer: bool | None = None,
    calibration_data: CalibrationData = None,
    tokenizer: Any = None,
    progress: bool = True,
    **from_pretrained_kwargs: Any,
) -> PruneResult:
    """Load a dense model and carry out ``config`` while loading; the result's ``model`` is native.

    ``layer_by_layer``: None chooses (layer by layer when the checkpoint does not
    fit, see `choose_path`), True or False forces it. Layer by layer, the model is
    scored and repaired from its shards and then loaded with only its kept layers,
    the repair folded in: it is never whole in memory. Other keyword arguments
    (``dtype``, ``device_map``...) go to ``from_pretrained``."""
    source, streaming, reason, n = _start(name_or_path, config, layer_by_layer, from_pretrained_kwargs)
    if not streaming:
        model, tok = load_model(str(name_or_path), revision=source.revision, **from_pretrained_kwargs)
        return _in_memory(
            model, tokenizer or tok, config, calibration_data, reason, progress, source, from_pretrained_kwargs
        )
    dtype = _walk_dtype(from_pretrained_kwargs.get("dtype"))
    scores, removed, repair = _walk(source, config, calibration_data, tokenizer, dtype, progress)
    record = pruned_record(source.location, removed, scores, repair, config.request_dict())
    model = load_from_base(source, record, repair.tensors if repair else None, **from_pretrained_kwargs)
    if config.verify:
        _verify_walked(model, source, removed, repair, dtype)
    if repair is not None and config.measure:
        _measure_walked(model, source, removed, tokenizer, config.seq_len, dtype, progress)
    tok = tokenizer or load_tokenizer(source)
    _measure_fidelity(model, tok, source, config, from_pretrained_kwargs, progress, calibration_data)
    return PruneResult(
        ShortGPTConfig.from_model(model),
        LAYER_BY_LAYER,
        reason,
        n,
        scores,
        verified=config.verify,
        parameters_before=record.original_num_parameters,
        parameters_after=count_parameters(model),
        model=model,
    )


def prune_to_folder(
    name_or_path: str | Path,
    config: ShortGPTConfig,
    out_dir: str | Path,
    *,
    recipe: bool = False,
    overwrite: bool = False,
    layer_by_layer: bool | None = None,
    max_shard_size: int | str | None = None,
    calibration_data: CalibrationData = None,
    progress: bool = True,
    **from_pretrained_kwargs: Any,
) -> PruneResult:
    """Carry out ``config`` on a model and write the result to ``out_dir``: a native checkpoint
    (verified by reloading it, when the request verifies), or a recipe. What ``shortgpt prune`` runs.

    In memory it loads the model whole; layer by layer the checkpoint is written
    tensor by tensor from the base's shards (``streaming.materialize``) and
    verified the same way, layer by layer. Nothing is written unless everything
    succeeds, and an existing folder is only replaced with ``overwrite``. ``max_shard_size``
    (as ``save_pretrained`` reads it; None: the writer's default) shards the checkpoint."""
    check_destination(out_dir, overwrite)
    source, streaming, reason, n = _start(name_or_path, config, layer_by_layer, from_pretrained_kwargs)
    if not streaming:
        model, tok = load_model(str(name_or_path), revision=source.revision, **from_pretrained_kwargs)
        result = _in_memory(model, tok, config, calibration_data, reason, progress, source, from_pretrained_kwargs)
        if recipe:
            result.folder = save_recipe(result.model, out_dir, tok, overwrite=overwrite, verify=config.verify)
        else:
            result.folder = save_pruned(
                result.model, out_dir, tok, overwrite=overwrite, verify=config.verify, max_shard_size=max_shard_size
            )
        result.kind, result.verified = ("recipe" if recipe else "checkpoint"), config.verify
        return result
    dtype = _walk_dtype(from_pretrained_kwargs.get("dtype"))
    scores, removed, repair = _walk(source, config, calibration_data, None, dtype, progress)
    if recipe:
        record = pruned_record(source.location, removed, scores, repair, config.request_dict())
        folder = save_recipe(record, out_dir, overwrite=overwrite, maps=repair.tensors if repair else None)
        verified = False  # a recipe written layer by layer is never built
    else:
        folder = materialize(
            source.location,
            out_dir,
            removed_layers=removed,
            scores=scores,
            repair=repair,
            request=config.request_dict(),
            eval_data=heldout_texts()[:1] if repair is not None and config.measure else None,
            eval_settings=PerplexitySettings(config.seq_len, None, HEADLINE.max_tokens),
            verify=config.verify,
            overwrite=overwrite,
            progress=progress,
            **({} if max_shard_size is None else {"max_shard_size": max_shard_size}),
        )
        record, verified = None, config.verify
    if record is None:
        record = ShortGPTConfig.from_dict(json.loads((Path(folder) / "config.json").read_text())["shortgpt"])
    return PruneResult(
        record,
        LAYER_BY_LAYER,
        reason,
        n,
        scores,
        folder=Path(folder),
        kind="recipe" if recipe else "checkpoint",
        verified=verified,
        parameters_before=record.original_num_parameters,
        parameters_after=_parameters_after(source, record),
    )


def _in_memory(
    model: nn.Module,
    tokenizer: Any,
    config: ShortGPTConfig,
    calibration_data: CalibrationData,
    reason: str,
    progress: bool,
    source: Source,
    load_kwargs: dict[str, Any],
) -> PruneResult:
    """Carry out ``config`` on the loaded model, then measure the result against its base."""
    before, num_before = count_parameters(model), len(find_decoder_layers(model).layers)
    carried = carry_out(
        model,
        config,
        tokenizer=tokenizer,
        calibration_data=calibration_data,
        eval_data=heldout_texts()[:1] if config.measure else None,
        progress=progress,
    )
    _measure_fidelity(carried.model, tokenizer, source, config, load_kwargs, progress, calibration_data)
    record = ShortGPTConfig.from_model(model)
    return PruneResult(
        record,
        IN_MEMORY,
        reason,
        num_before,
        carried.scores,
        verified=config.verify and config.mode == "remove",  # prefill skipping changes no weights to check
        parameters_before=before,
        parameters_after=count_parameters(model),
        model=carried.model,
    )


def _walk_dtype(dtype: Any) -> Any:
    return None if dtype in (None, "auto") else dtype


def _walk(
    source: Source,
    config: ShortGPTConfig,
    calibration_data: CalibrationData,
    tokenizer: Any,
    dtype: Any,
    progress: bool,
) -> tuple[LayerScores | None, list[int], LinearRepair | None]:
    """Score (when needed) and fit the training-free repair (when asked) layer by layer:
    the layers to remove (original indices) and the repair, with every refusal the
    in-memory path makes made first, on the meta skeleton."""
    skeleton = meta_skeleton(source)
    total = len(find_decoder_layers(skeleton).layers)
    count = config.removal_count(total)
    step = (config.recovery or [None])[0]
    options = {k: v for k, v in (step or {}).items() if k != "method"}
    if step is not None:
        RECOVERY_METHODS[step["method"]].check(skeleton, **options)  # options were bound when the request was built
    check_supported(skeleton)
    calibration = calibration_data if calibration_data is not None else config.calibration
    walk = dict(tokenizer=tokenizer, seq_len=config.seq_len, batch_size=config.batch_size, dtype=dtype)
    scores = None
    if config.layers is None:
        scores = score_layers_sequentially(
            source.location,
            calibration,
            config.metric,
            max_tokens=config.calibration_tokens,
            block_size=config.block_size,
            seed=config.seed,
            max_layers=count if METRICS[config.metric].greedy else None,
            progress=progress,
            **walk,
        )
    removed = select_layers(total, config.layers, None if config.layers else count, None, scores)
    check_supported(skeleton, removed)
    repair = None
    if step is not None:
        driver = dense_driver(source.location, calibration, max_tokens=config.recovery_tokens, **walk)
        repair = fit_removal(driver, step["method"], removed, options, progress)
    return scores, removed, repair


def _verify_walked(
    model: nn.Module, source: Source, removed: list[int], repair: LinearRepair | None, dtype: Any
) -> None:
    """A model built from its kept layers must compute what the base computes with those layers
    skipped (and the repair's maps applied as hooks), walked layer by layer; and its cached
    decoding must equal an uncached forward."""
    ids = probe_ids(model)
    batch = [(ids, torch.ones_like(ids))]
    maps = repair.maps if repair is not None else ()
    expected = next(walked_logits(source, batch, skip=removed, maps=maps, dtype=dtype, progress=False))
    if not logits_close(uncached_logits(model, ids), expected, parity_tolerance(model)):
        raise VerificationFailed(
            "verification failed: the model built from the kept layers differs from the base with those layers "
            "removed, walked layer by layer"
        )
    verify_pruned(model)


def _measure_fidelity(
    model: nn.Module,
    tokenizer: Any,
    source: Source,
    config: ShortGPTConfig,
    load_kwargs: dict,
    progress: bool,
    calibration_data: CalibrationData,
) -> None:
    """`record_fidelity` for a prune that measures: against the source itself, as it was resolved
    (the same revision, token and cache), or against the base a pruned source records."""
    if not config.measure or config.mode != "remove":
        return
    record = ShortGPTConfig.from_model(model)
    dense = source.kind == "model" and not source.pruned
    record_fidelity(
        model,
        tokenizer,
        source if dense else record.base_model_name_or_path,
        revision=None if dense else record.base_revision,
        hub={} if dense else {k: v for k, v in load_kwargs.items() if k in HUB_KWARGS},
        dtype=_walk_dtype(load_kwargs.get("dtype")),
        seq_len=config.seq_len,
        default_calibration=calibration_data is None and config.calibration is None,
        progress=progress,
    )


def record_fidelity(
    model: nn.Module,
    tokenizer: Any,
    base: str | Source,
    *,
    revision: str | None = None,
    hub: dict[str, Any] | None = None,
    dtype: Any = None,
    seq_len: int = HEADLINE.seq_len,
    default_calibration: bool = True,
    progress: bool = True,
) -> None:
    """Record in ``config.shortgpt["fidelity"]`` how far a pruned (or pruned and healed) model drifts
    from its dense ``base`` on every genre of the held-out suite (`evaluation.fidelity_record`; the
    first `SUMMARY_TOKENS` of each). The base is walked layer by layer from its checkpoint, so a
    second copy of the model is never in memory; one that cannot be walked (or a vision-language
    model) is said in the log and skipped, never failing what measured it. ``default_calibration``:
    whether the model was calibrated (and healed) on the packaged mixture, which "unseen" refers to."""
    inner = recovered_base(model)  # a PEFT model's record is its base model's
    if is_vision_language(inner.config):  # the walk reads text-only checkpoints; the suite is text anyway
        logger.info("fidelity not measured: %s is a vision-language model", describe(inner))
        return
    walk = dict(dtype=dtype, device=input_device(inner), progress=False, **(hub or {}))
    try:  # the walk opens the base's shards only here: a base that cannot be read fails here, not the caller
        reference = WalkedReference(base, revision=revision, **walk)
        report = evaluate(
            model,
            tokenizer,
            ["suite"],
            reference=reference,
            seq_len=seq_len,
            progress=progress,
            max_tokens=SUMMARY_TOKENS,
        )
    except (ShortGPTError, torch.OutOfMemoryError) as e:
        name = base.location if isinstance(base, Source) else base
        logger.info("fidelity not measured: its dense base %s cannot be walked (%s)", name, e)
        return
    inner.config.shortgpt = {**inner.config.shortgpt, "fidelity": fidelity_record(report, default_calibration)}


def _measure_walked(
    model: nn.Module, source: Source, removed: list[int], tokenizer: Any, seq_len: int, dtype: Any, progress: bool
) -> None:
    """Record the repair's held-out perplexity on a model built layer by layer: plain removal
    measured by the layer walk (the unrepaired model is never built), the repaired one in memory."""
    tok = tokenizer or load_tokenizer(source)
    settings = PerplexitySettings(seq_len, None, HEADLINE.max_tokens)
    held = heldout_texts()[:1]
    how = dict(seq_len=settings.seq_len, stride=settings.stride, max_tokens=settings.max_tokens, progress=progress)
    before = perplexity_sequentially(source.location, held, skip=removed, tokenizer=tok, dtype=dtype, **how)
    after = perplexity(model, tok, held, **how)
    record = model.config.shortgpt
    entry = record["recovery"][-1] | dict(
        perplexity_before=round(before, 4), perplexity_after=round(after, 4), perplexity_settings=settings.describe()
    )
    model.config.shortgpt = record | {"recovery": [*record["recovery"][:-1], entry]}


def _parameters_after(source: Source, record: ShortGPTConfig) -> int:
    """The pruned model's parameter count, from the meta skeleton (nothing read)."""
    skeleton = meta_skeleton(source)
    remove_layers(skeleton, record.removed_layers)
    return count_parameters(skeleton)
