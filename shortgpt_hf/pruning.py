"""`prune`: the one call that carries out a removal on a model in memory, records why, and proves the result.

It takes a request (`ShortGPTConfig`, or the same as keywords), scores the
model itself when the request asks for a count or a ratio and no scores are
given, and ties together the concerns that live in their own modules:
`selection` (which layers), `surgery` (removing them correctly for the
family), `recovery` (repairing the removal) and `verification` (checking the
result against the definition of a correct removal). Whatever goes wrong, on
any path, the user's model is put back exactly as it was.

A model larger than memory takes the same request through `pipeline`, which
runs the same metrics and repairs layer by layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .calibration import CalibrationData
from .config import ShortGPTConfig, tag_pruned
from .errors import InvalidRequest
from .evaluation import HEADLINE
from .layers import count_parameters, find_decoder_layers, layers_as_identity, probe_ids, text_config
from .prefill_skip import enable_prefill_skip
from .recovery.base import RecoveryStep, plan, recovered_base, run, takes_option
from .registry import METRICS
from .scoring import LayerScores, score_layers
from .selection import select_layers
from .sources import recorded_name
from .surgery import check_supported, remove_layers, restore, snapshot
from .texts import heldout_texts
from .verification import explained, uncached_logits, verify_pruned


def _record(model: nn.Module, current: list[int], scores: LayerScores | None) -> ShortGPTConfig:
    """The config after removing CURRENT layers ``current``, composed with any earlier pruning."""
    previous = ShortGPTConfig.from_model(model)
    original_n = previous.original_num_hidden_layers if previous else text_config(model).num_hidden_layers
    originals = previous.kept_layers if previous else list(range(original_n))
    removed = sorted(set(previous.removed_layers if previous else []) | {originals[i] for i in current})
    base, revision = (
        (previous.base_model_name_or_path, previous.base_revision) if previous else recorded_name(model.name_or_path)
    )
    record = ShortGPTConfig(
        removed_layers=removed,
        original_num_hidden_layers=original_n,
        model_type=text_config(model).model_type,
        base_model_name_or_path=base,
        base_revision=revision,
        original_num_parameters=previous.original_num_parameters if previous else count_parameters(model),
    )
    if scores is not None:
        _add_scores(record, scores, originals)
    elif previous is not None:
        record.metric, record.layer_scores = previous.metric, previous.layer_scores
        record.block_size, record.calibration = previous.block_size, previous.calibration
    if previous is not None:  # what was done to the model before this removal is still part of its history
        record.recovery = previous.recovery
    return record


# recovery_options keys that say how a step is prepared and measured, not how the method runs
_PLAN_OPTIONS = ("seq_len", "max_tokens", "eval_data", "eval_tokens")


def prune(
    model: nn.Module,
    config: ShortGPTConfig | Sequence[int] | None = None,
    *,
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
    ratio: float | None = None,
    scores: LayerScores | None = None,
    verify: bool | None = None,
    recovery: str | None = None,
    recovery_data: CalibrationData = None,
    tokenizer: Any = None,
    recovery_options: dict[str, Any] | None = None,
    calibration_data: CalibrationData = None,
    progress: bool = True,
) -> nn.Module:
    """Remove decoder layers in place and record them in ``model.config.shortgpt``.

    Ask with a request, ``prune(model, ShortGPTConfig(ratio=0.25, recovery="linear"))``,
    or the same as keywords: ``layers`` (current indices; also the second
    positional argument), ``n_layers`` or ``ratio``. A count or a ratio takes the
    lowest-scoring layers of ``scores``, or, when none are given, of the request's
    metric (``"bi"`` for keywords), which `prune` computes itself on
    ``calibration_data`` (default: the request's calibration file, else the
    packaged text). The record keeps ORIGINAL indices, so pruning twice composes.

    With ``verify`` (a request's default; ``False`` for keywords) the result is
    checked against the unpruned model with those layers skipped, and for
    cached-vs-uncached parity. ``recovery`` runs recovery steps as part of the
    removal (``"linear"``: training-free maps fitted on the layers before they
    go; ``"lora"`` returns a PEFT model) on ``recovery_data`` (default: the
    calibration data); with keywords, ``recovery_options`` holds the method's
    options plus ``seq_len``, ``max_tokens``, ``eval_data`` and ``eval_tokens``
    as for `recover`. On any failure (a refused configuration, a failed check,
    an unexpected exception, even Ctrl-C) the model is restored. Errors are one
    line (`ShortGPTError` subclasses); Ctrl-C stays a ``KeyboardInterrupt``.
    """
    options = dict(recovery_options or {})
    progress = options.pop("progress", progress)  # how to run, not what to do: never part of the request
    if isinstance(config, ShortGPTConfig):
        if any(v is not None for v in (layers, n_layers, ratio, verify, recovery)) or options:
            raise InvalidRequest("give the request either as a ShortGPTConfig or as keywords, not both")
        request, eval_data, eval_tokens = config, heldout_texts()[:1] if config.measure else None, HEADLINE.max_tokens
    else:
        if config is not None:
            if layers is not None:
                raise InvalidRequest("give the layers once (positionally or as layers=)")
            if not isinstance(config, Sequence) or isinstance(config, str):
                raise InvalidRequest(f"give a ShortGPTConfig or a list of layer indices, got {config!r}")
            layers = config
        given = [v for v in (layers, n_layers, ratio) if v is not None]
        if len(given) != 1:
            raise InvalidRequest("give exactly one of layers, n_layers or ratio (or a ShortGPTConfig)")
        if options and recovery is None:
            raise InvalidRequest(f"recovery_options {sorted(options)} were given without a recovery method")
        if scores is not None and layers is None:  # the caller's scores chose: the request is those layers
            layers = select_layers(len(find_decoder_layers(model).layers), None, n_layers, ratio, scores)
            n_layers = ratio = None
        plan_options = {k: options.pop(k) for k in _PLAN_OPTIONS if k in options}
        eval_data, eval_tokens = plan_options.get("eval_data"), plan_options.get("eval_tokens", HEADLINE.max_tokens)
        request = ShortGPTConfig(
            layers=None if layers is None else list(layers),
            n_layers=n_layers,
            ratio=ratio,
            verify=bool(verify),
            recovery=None if recovery is None else [{"method": recovery, **options}],
            seq_len=plan_options.get("seq_len", 256),
            recovery_tokens=plan_options.get("max_tokens"),
            measure=eval_data is not None,
        )
    return carry_out(
        model,
        request,
        scores=scores,
        tokenizer=tokenizer,
        calibration_data=calibration_data,
        recovery_data=recovery_data,
        eval_data=eval_data,
        eval_tokens=eval_tokens,
        progress=progress,
    ).model


@dataclass
class Carried:
    """What `carry_out` did: the model (a PEFT model when a training step ran) and the scores it chose by."""

    model: nn.Module
    scores: LayerScores | None


def carry_out(
    model: nn.Module,
    request: ShortGPTConfig,
    *,
    scores: LayerScores | None = None,
    tokenizer: Any = None,
    calibration_data: CalibrationData = None,
    recovery_data: CalibrationData = None,
    eval_data: CalibrationData = None,
    eval_tokens: int | None = HEADLINE.max_tokens,
    progress: bool = True,
) -> Carried:
    """Carry out ``request`` on ``model`` in memory: check everything that can be checked, then score
    (unless ``scores`` are given or the layers are named), remove, verify and recover. `prune` and the
    in-memory path of `pipeline` both end here."""
    if not request.is_request:
        raise InvalidRequest("this ShortGPTConfig is a record (removed_layers is set); give a request")
    found = find_decoder_layers(model)
    n = len(found.layers)
    count = request.removal_count(n)
    previous = ShortGPTConfig.from_model(model)
    if previous is not None and previous.mode == "prefill_skip":
        raise InvalidRequest(
            "this model skips layers during prefill; call disable_prefill_skip(model) before pruning it"
        )
    calibration = calibration_data if calibration_data is not None else request.calibration
    data = recovery_data if recovery_data is not None else calibration
    check_supported(model)
    steps = [
        _plan(model, step, data, tokenizer, request, eval_data, eval_tokens, progress)
        for step in (request.recovery or [])
    ]
    if scores is None and request.layers is None:
        metric = METRICS[request.metric]
        scores = score_layers(
            model,
            calibration,
            request.metric,
            tokenizer=tokenizer,
            seq_len=request.seq_len,
            batch_size=request.batch_size,
            max_tokens=request.calibration_tokens,
            block_size=request.block_size,
            seed=request.seed,
            max_layers=count if metric.greedy else None,
            progress=progress,
        )
    chosen = select_layers(n, request.layers, None if request.layers else count, None, scores)
    if request.mode == "prefill_skip":
        enable_prefill_skip(model, chosen, boundary=True)
        record = _add_scores(ShortGPTConfig.from_model(model), scores, list(range(n)))
        record.request = request.request_dict()
        model.config.shortgpt = record.to_dict()
        return Carried(model, scores)
    check_supported(model, chosen)
    record = _record(model, chosen, scores)
    record.request = request.request_dict()
    snap = snapshot(model)
    was_training = model.training
    try:
        first = steps[0] if steps and steps[0].method.needs_removed_layers else None
        fitted = first.fit(model, chosen) if first is not None else None
        reference = None
        if request.verify:
            model.eval()
            with (
                explained(model, "computing the reference (removed layers as identity)"),
                layers_as_identity(model, chosen),
            ):
                reference = uncached_logits(model, probe_ids(model))
        with explained(model, "removing layers"):
            remove_layers(model, chosen)
        model.config.shortgpt = record.to_dict()
        if request.verify:
            with explained(model, "verification"):
                verify_pruned(model, reference)
        result = model
        for step in steps:  # planned, and so checked, before anything was scored or removed
            result = run(result, step, fitted if step is first else None)
            if request.verify and step.method.needs_removed_layers:  # trained adapters change the structure
                with explained(model, f"verification after {step.method.name} recovery"):
                    verify_pruned(recovered_base(result))
    except BaseException:
        restore(model, snap)
        raise
    finally:
        model.train(was_training)
    tag_pruned(model)
    return Carried(result, scores)


def _plan(
    model: nn.Module,
    step: dict[str, Any],
    data: CalibrationData,
    tokenizer: Any,
    request: ShortGPTConfig,
    eval_data: CalibrationData,
    eval_tokens: int | None,
    progress: bool,
) -> RecoveryStep:
    options = {k: v for k, v in step.items() if k != "method"}
    return plan(
        model,
        step["method"],
        data,
        tokenizer=tokenizer,
        seq_len=request.seq_len,
        max_tokens=request.recovery_tokens,
        eval_data=eval_data,
        eval_tokens=eval_tokens,
        **{"progress": progress, **options} if takes_option(step["method"], "progress") else options,
    )


def _add_scores(record: ShortGPTConfig, scores: LayerScores | None, originals: list[int]) -> ShortGPTConfig:
    """``record`` with the scores it chose by, each under the ORIGINAL index of the layer it scored."""
    if scores is not None:
        per_original: list[float | None] = [None] * record.original_num_hidden_layers
        for current_index, value in enumerate(scores.scores):
            per_original[originals[current_index]] = value
        record.metric = scores.metric
        record.layer_scores = per_original
        record.block_size = scores.block_size
        record.calibration = scores.calibration_summary()
    return record


@contextlib.contextmanager
def restored_after(model: nn.Module) -> Iterator[nn.Module]:
    """Prune ``model`` in place as often as you like inside; on exit every removed
    layer, config entry, cache index and device-map entry is back. Lets an
    ablation evaluate many prunes of one model without a copy per prune (a
    copy of a 7B model is 14+ GB), and re-score between prunes (iterative)."""
    snap = snapshot(model)
    try:
        yield model
    finally:
        restore(model, snap)
