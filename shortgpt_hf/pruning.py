"""`prune`: the one call that removes layers, records why, and proves the result.

It ties together the three concerns that live in their own modules:
`selection` (which layers), `surgery` (removing them correctly for the
family) and `verification` (checking the result against the definition of a
correct removal). Whatever goes wrong, on any path, the user's model is put
back exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from .config import ShortGPTConfig
from .errors import ShortGPTError
from .layers import find_decoder_layers, layers_as_identity, probe_ids, text_config
from .selection import select_layers
from .sources import recorded_name
from .surgery import check_supported, remove_layers, restore, snapshot
from .verification import explained, uncached_logits, verify_pruned

if TYPE_CHECKING:
    from .calibration import CalibrationData
    from .scoring import LayerScores


def hub_tags(record: ShortGPTConfig) -> list[str]:
    """The Hub tags of a pruned model: on its card, and on anything transformers' own ``push_to_hub`` uploads."""
    return ["shortgpt", "layer-pruning", "pruned"] + (["prefill-skip"] if record.mode == "prefill_skip" else [])


def tag_pruned(model: nn.Module) -> None:
    """Tag a pruned model through transformers' ``add_model_tags``, so its own
    ``push_to_hub`` / ``save_pretrained(push_to_hub=True)`` tag the repo too."""
    record = ShortGPTConfig.from_model(model)
    if record is None or not hasattr(model, "add_model_tags"):
        return
    model.model_tags = list(model.model_tags or [])  # a fresh list: a snapshot taken before may share the old one
    model.add_model_tags(hub_tags(record))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


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
    if previous is not None:  # what was done to the model before this removal is still part of its history
        record.recovery = previous.recovery
    return record


def prune(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    *,
    n_layers: int | None = None,
    ratio: float | None = None,
    scores: LayerScores | None = None,
    verify: bool = False,
    recovery: str | None = None,
    recovery_data: CalibrationData = None,
    tokenizer: Any = None,
    recovery_options: dict[str, Any] | None = None,
) -> nn.Module:
    """Remove decoder layers in place and record them in ``model.config.shortgpt``.

    Ask with exactly one of: ``layers`` (current indices), ``n_layers`` or
    ``ratio`` (both choose the lowest-scoring layers of ``scores``). The record
    keeps ORIGINAL indices, so pruning twice composes. With ``verify=True`` the
    result is checked against the unpruned model with those layers skipped, and
    for cached-vs-uncached parity. On any failure (a refused configuration, a
    failed check, an unexpected exception, even Ctrl-C) the model is restored.
    Errors arrive as one `ShortGPTError` line naming the family and the step
    that failed; Ctrl-C stays a ``KeyboardInterrupt``.

    ``recovery`` names a recovery method to run as part of the removal
    (``"linear"``: training-free maps fitted on the layers before they go, see
    `shortgpt_hf.recovery.linear`; ``"lora"`` returns a PEFT model), on
    ``recovery_data`` (default: the packaged calibration plays) with
    ``recovery_options`` (the method's options, plus ``seq_len``, ``eval_data``
    and ``eval_tokens`` as for `recover`). It is checked before anything is
    touched and undone with the removal if anything fails.
    """
    from .recovery.base import plan, recovered_base, run

    found = find_decoder_layers(model)
    chosen = select_layers(len(found.layers), layers, n_layers, ratio, scores)
    previous = ShortGPTConfig.from_model(model)
    if previous is not None and previous.mode == "prefill_skip":
        raise ShortGPTError(
            "this model skips layers during prefill; call disable_prefill_skip(model) before pruning it"
        )
    check_supported(model, chosen)
    step = (
        plan(model, recovery, recovery_data, tokenizer=tokenizer, **(recovery_options or {}))
        if recovery is not None
        else None
    )
    record = _record(model, chosen, scores)
    snap = snapshot(model)
    was_training = model.training
    try:
        fitted = step.fit(model, chosen) if step is not None else None
        reference = None
        if verify:
            model.eval()
            with (
                explained(model, "computing the reference (removed layers as identity)"),
                layers_as_identity(model, chosen),
            ):
                reference = uncached_logits(model, probe_ids(model))
        with explained(model, "removing layers"):
            remove_layers(model, chosen)
        model.config.shortgpt = record.to_dict()
        if verify:
            with explained(model, "verification"):
                verify_pruned(model, reference)
        result = model
        if step is not None:
            result = run(model, step, fitted)
            if verify:
                with explained(model, f"verification after {recovery} recovery"):
                    verify_pruned(recovered_base(result))
    except BaseException:
        restore(model, snap)
        raise
    finally:
        model.train(was_training)
    tag_pruned(model)
    return result


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
