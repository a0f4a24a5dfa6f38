"""Writing pruned checkpoints without ever leaving a half-written or clobbered folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .atomic import atomic_folder
from .config import RecipeConfig, ShortGPTConfig
from .errors import InvalidRequest, ShortGPTError, VerificationFailed
from .families import auto_class
from .layers import probe_ids, text_config
from .loading import load_pruned
from .reading import load_tokenizer, text_config_of
from .recovery.linear import linear_maps, save_maps
from .registry import RECOVERY_METHODS
from .sources import resolve
from .verification import explained, logits_close, parity_tolerance, uncached_logits, verify_reload


def save_pruned(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    verify: bool = True,
    max_shard_size: int | str | None = None,
) -> Path:
    """Save a native checkpoint atomically (in shards of at most ``max_shard_size``, as
    ``save_pretrained`` reads it; None: its default). With ``verify``, the written folder is
    reloaded with the plain transformers Auto class its config maps to
    (``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a
    vision-language model) and must give the same logits before it is moved
    into place (this briefly holds a second copy in memory). Its weights are
    never changed, and any failure leaves no folder behind. Afterwards the model
    names the folder (``model.name_or_path``), as a model loaded from it would."""
    if verify:
        auto_class(model.config)  # a model no Auto class can reload is refused before anything is written
    with atomic_folder(out_dir, overwrite) as tmp:
        write_checkpoint(model, tmp, tokenizer, max_shard_size)
        if verify:
            verify_reload(model, tmp)
    return point_at(model, out_dir)


def write_checkpoint(
    model: nn.Module, folder: Path, tokenizer: Any = None, max_shard_size: int | str | None = None
) -> None:
    """The files of a native pruned checkpoint, into an existing (temporary) folder."""
    record = ShortGPTConfig.from_model(model)
    with explained(model, "saving the checkpoint"):
        model.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    if record is not None and linear_maps(model):  # not needed to load it; lets a recipe be written from it later
        save_maps(linear_maps(model), record, folder)


def point_at(model: nn.Module, out_dir: str | Path) -> Path:
    """Make a just-saved model name its folder, as if loaded from there: PEFT then
    records that folder as an adapter's base, and `heal` / `save_healed` accept it."""
    saved = Path(out_dir).resolve()
    model.name_or_path = model.config.name_or_path = str(saved)
    return saved


def save_recipe(
    model_or_config: nn.Module | ShortGPTConfig,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    verify: bool = False,
    maps: dict[str, Any] | None = None,
) -> Path:
    """Write the recipe form: ``shortgpt_config.json`` naming the base model and its
    pinned revision (plus the tokenizer files, and ``shortgpt/linear_maps.safetensors``
    when the model was repaired with linear maps), a few KB or MB whatever the
    model size, and a small ``config.json`` that marks the folder as a recipe.
    `PrunedForCausalLM.from_pretrained` rebuilds the pruned model from it, and so,
    after ``import shortgpt_hf``, do ``AutoModelForCausalLM`` and ``pipeline``; with
    ``verify`` (a model given) it does so before the folder is moved into place
    and must reproduce the model's logits. A record given without a model
    passes the linear repair maps it names as ``maps`` (key -> tensor)."""
    is_model = not isinstance(model_or_config, ShortGPTConfig)
    with atomic_folder(out_dir, overwrite) as tmp:
        write_recipe(model_or_config, tmp, tokenizer, maps)
        if verify and is_model:
            ids = probe_ids(model_or_config)
            with explained(model_or_config, "rebuilding the model from the recipe"):
                rebuilt = uncached_logits(load_pruned(resolve(tmp), dtype=model_or_config.dtype), ids)
                expected = uncached_logits(model_or_config, ids)
            if not logits_close(rebuilt, expected, parity_tolerance(model_or_config)):
                raise VerificationFailed("verification failed: the recipe rebuilds a model with different logits")
    return point_at(model_or_config, out_dir) if is_model else Path(out_dir).resolve()


def write_recipe(
    model_or_config: nn.Module | ShortGPTConfig, folder: Path, tokenizer: Any = None, maps: dict[str, Any] | None = None
) -> None:
    """The files of a recipe, into an existing (temporary) folder; refuses what a recipe cannot rebuild."""
    is_model = not isinstance(model_or_config, ShortGPTConfig)
    record = ShortGPTConfig.from_model(model_or_config) if is_model else model_or_config
    if record is None:
        raise InvalidRequest("this model has not been pruned: nothing to write as a recipe")
    if not record.base_model_name_or_path:
        raise InvalidRequest("cannot write a recipe: the base model is unknown (base_model_name_or_path is empty)")
    trained = [step.get("method") for step in record.recovery or [] if not _refoldable(step.get("method"))]
    if trained:
        # A recipe rebuilds weights from the base (plus stored maps); trained weights would silently be lost.
        raise InvalidRequest(
            f"this model was recovered with {', '.join(trained)}, which a recipe cannot rebuild from its base: "
            "save it as a full checkpoint (save_pruned), or save the adapter (save_healed)"
        )
    base = None if is_model and tokenizer is not None else _base(record)
    if (
        tokenizer is None and base is not None
    ):  # pipeline(model=recipe) reads the tokenizer from the recipe: carry the base's
        tokenizer = _or_none(lambda: load_tokenizer(base))
    record.save_pretrained(folder)
    # config.json: lets AutoModelForCausalLM and pipeline find PrunedForCausalLM
    vocab = (
        text_config(model_or_config).vocab_size
        if is_model
        else _or_none(lambda: text_config_of(base).vocab_size)
        if base
        else None
    )
    RecipeConfig(**({"vocab_size": vocab} if vocab else {})).save_pretrained(folder)
    save_maps(linear_maps(model_or_config) if is_model else maps or {}, record, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _refoldable(method: str | None) -> bool:
    """Whether a recovery step is one a recipe rebuilds: a training-free method's maps, stored with it."""
    return method in RECOVERY_METHODS and RECOVERY_METHODS[method].needs_removed_layers


def _base(record: ShortGPTConfig) -> Any:
    """The recipe's base, when it can be found (a recipe may be written for a base that is elsewhere)."""
    return _or_none(lambda: resolve(record.base_model_name_or_path))


def _or_none(read: Any) -> Any:
    try:
        return read()
    except ShortGPTError:
        return None
