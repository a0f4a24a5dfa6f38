"""The LoRA recovery method: healing with PEFT adapters, distilled from the dense model by default.

A short fine-tune of low-rank adapters wins back much of what removing layers
cost (Gromov et al. heal with QLoRA). The loop is plain accelerate, so the same
code runs on CPU, one GPU, or several under ``accelerate launch``; the loss is
KL to the dense model's next-token distribution (cross-entropy on the text
alone, or a mix, on request).

The adapter must name the PRUNED model as its base: an adapter that records
the unpruned base makes ``AutoPeftModelForCausalLM`` load the full model and put
the adapters on the wrong layers. `heal` points it at where the pruned model is
saved (a full checkpoint, or a recipe), warns when it is saved nowhere, and
`save_healed` refuses to write an adapter whose base is not that place.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import CalibrationData, TokenWindows
from ..compat import quiet_peft
from ..config import ShortGPTConfig
from ..errors import ShortGPTError
from ..evaluation import HEADLINE
from ..families import describe, is_vision_language
from ..layers import find_decoder_layers
from ..reading import read_recipe
from ..sources import resolve
from .base import recover, register
from .training import TrainingRecovery, train

METHODS = ("lora", "qlora")


def adjacent_layers(record: ShortGPTConfig) -> list[int]:
    """Post-pruning indices of the kept layers that touch a removed gap."""
    removed = set(record.removed_layers)
    return [new for new, old in enumerate(record.kept_layers) if old - 1 in removed or old + 1 in removed]


def pruned_reference(model: nn.Module) -> str | None:
    """Where this pruned model is saved, as a full checkpoint or as a recipe that
    rebuilds it (what an adapter must name as its base), or None if it exists
    only in memory. The saved record must be this model's, up to recovery steps
    added since (an adapter trained now is one)."""
    current = ShortGPTConfig.from_model(model)
    if current is None or not model.name_or_path:
        return None
    try:
        source = resolve(model.name_or_path)
        if source.kind == "recipe":
            saved = read_recipe(source)
        elif source.kind == "model" and source.pruned:
            saved = ShortGPTConfig.from_dict(json.loads(source.read_text("config.json"))["shortgpt"])
        else:
            return None
    except ShortGPTError:
        return None
    steps = saved.recovery or []
    if saved.removed_layers != current.removed_layers or (current.recovery or [])[: len(steps)] != steps:
        return None
    return source.portable


def _check_method(method: str, model: nn.Module) -> None:
    if method not in METHODS:
        raise ShortGPTError(f"method must be one of {METHODS}, got {method!r}")
    if method == "qlora":
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ShortGPTError("QLoRA needs a CUDA GPU and the bitsandbytes package; use method='lora' here")
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ShortGPTError(
                "QLoRA trains on a 4-bit base: load the pruned model with "
                "quantization_config=BitsAndBytesConfig(load_in_4bit=True)"
            )


@register
class LoraRecovery(TrainingRecovery):
    """LoRA (or QLoRA) adapters trained with PEFT in a plain accelerate loop; see `heal`."""

    name = "lora"
    summary = "LoRA adapters trained with PEFT, distilled from the dense base by default; returns a PEFT model"
    default_lr = 2e-4

    def check(
        self,
        model: nn.Module,
        *,
        quantized: bool = False,
        peft_config: Any = None,
        r: int | None = None,
        alpha: int | None = None,
        target_modules: list[str] | str | None = None,
        layers: str | list[int] | None = None,
        **training: Any,
    ) -> None:
        if is_vision_language(model.config):
            # PEFT's AutoPeftModelForCausalLM could not reload the adapter, and text-only
            # batches would leave the vision side untrained: train it with PEFT directly.
            raise ShortGPTError(f"healing supports text-only causal LMs; {describe(model)} is a vision-language model")
        _check_method("qlora" if quantized else "lora", model)
        self.training(model, training, load=False)

    def apply(
        self,
        model: nn.Module,
        windows: TokenWindows,
        tokenizer: Any,
        *,
        peft_config: Any = None,
        quantized: bool = False,
        r: int | None = None,
        alpha: int | None = None,
        target_modules: list[str] | str | None = None,
        layers: str | list[int] | None = None,
        **training: Any,
    ) -> tuple[nn.Module, dict[str, Any]]:
        from peft import get_peft_model

        options = self.training(model, training, load=True)

        reference = pruned_reference(model)
        if reference is None:
            warnings.warn(
                "this pruned model is not saved, so an adapter saved from it with PEFT's save_pretrained would name "
                f"{model.name_or_path or 'no base'!r} as its base and could not be reloaded: save it with save_pruned "
                "(or save_recipe) before healing",
                stacklevel=2,
            )
        else:
            model.name_or_path = model.config.name_or_path = reference  # PEFT copies it into the adapter as its base
        config = _lora_config(model, peft_config, r, alpha, target_modules, layers, reference)
        torch.manual_seed(options.seed)  # the adapters' initialization
        with quiet_peft():
            peft_model = get_peft_model(model, config)
        if quantized:
            from peft import prepare_model_for_kbit_training

            peft_model = prepare_model_for_kbit_training(peft_model)

        peft_model, run = train(peft_model, windows, tokenizer, options)
        config = peft_model.peft_config[peft_model.active_adapter]
        details = {
            "quantized": quantized,
            "r": config.r,
            "alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules)
            if isinstance(config.target_modules, (set, list))
            else config.target_modules,
            "layers": layers if isinstance(layers, str) else _transformed(config.layers_to_transform),
            "variant": ("DoRA" if config.use_dora else "LoRA") + (", rsLoRA" if config.use_rslora else ""),
            **run,
        }
        return peft_model, details


def _transformed(layers: int | list[int] | None) -> str | list[int]:
    """What a LoraConfig's ``layers_to_transform`` (None, one index or a list) covers, for the record."""
    if layers is None:
        return "all"
    return [layers] if isinstance(layers, int) else list(layers)


def _lora_config(
    model: nn.Module,
    peft_config: Any,
    r: int | None,
    alpha: int | None,
    target_modules: Any,
    layers: Any,
    reference: str | None,
) -> Any:
    """The user's own ``LoraConfig`` (DoRA, rsLoRA, chosen targets...), or one built from
    the shortcut arguments; either way it names the pruned base."""
    import copy

    from peft import LoraConfig

    if peft_config is not None:
        if not isinstance(peft_config, LoraConfig):
            raise ShortGPTError(f"peft_config must be a peft LoraConfig, got {type(peft_config).__name__}")
        given = [
            name
            for name, value in (("r", r), ("alpha", alpha), ("target_modules", target_modules), ("layers", layers))
            if value is not None
        ]
        if given:
            raise ShortGPTError(f"give either peft_config or {', '.join(given)}, not both")
        config = copy.deepcopy(peft_config)  # the user's object stays as it was
        config.task_type = config.task_type or "CAUSAL_LM"
        config.base_model_name_or_path = reference
        return config
    found = find_decoder_layers(model)
    layers = "all" if layers is None else layers
    if layers == "all":
        to_transform = None
    elif layers == "adjacent":
        to_transform = adjacent_layers(ShortGPTConfig.from_model(model))
    elif isinstance(layers, (list, tuple)) and layers and all(0 <= int(i) < len(found.layers) for i in layers):
        to_transform = [int(i) for i in layers]
    else:
        raise ShortGPTError(
            f"layers must be 'all', 'adjacent' or post-pruning indices in 0..{len(found.layers) - 1}, got {layers!r}"
        )
    if target_modules is None:  # every linear layer of this family's decoder block (never the output head)
        target_modules = sorted(
            {name.rsplit(".", 1)[-1] for name, m in found.layers[0].named_modules() if isinstance(m, nn.Linear)}
        )
    return LoraConfig(
        r=8 if r is None else r,
        lora_alpha=16 if alpha is None else alpha,
        lora_dropout=0.0,
        target_modules=target_modules,
        layers_to_transform=to_transform,
        layers_pattern=found.attr if to_transform is not None else None,
        task_type="CAUSAL_LM",
        base_model_name_or_path=reference,
    )


def heal(
    model: nn.Module,
    data: CalibrationData = None,
    method: str = "lora",
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    eval_data: CalibrationData = None,
    eval_tokens: int | None = HEADLINE.max_tokens,
    **options: Any,
) -> nn.Module:
    """Train LoRA adapters on a pruned model and return the ``PeftModel``.

    ``data``: calibration-style text (default: the packaged calibration mixture).
    ``method``: "lora", or "qlora" on a 4-bit base. Options: ``layers`` ("all",
    "adjacent" (kept layers next to a removed gap) or post-pruning indices),
    ``target_modules`` (default: every linear layer of the family's decoder
    block, never the output head), ``r``, ``alpha``; or instead of those four,
    ``peft_config``: any peft ``LoraConfig`` (DoRA, rsLoRA, your own targets).
    Training (`TrainingOptions`): ``steps`` (optimizer steps), ``lr`` (10%
    warm-up, then linear decay to zero at the last step), ``batch_size`` (per
    process), ``gradient_accumulation_steps``, ``seed``. The loss is
    ``(1 - kd_weight) * CE + kd_weight * KL`` at ``temperature`` to ``teacher``:
    by default ``"base"``, the dense model the pruned one records (loaded for
    the purpose), with ``kd_weight=1``; ``teacher=None`` or ``kd_weight=0``
    trains on cross-entropy alone, which adapts the model to ``data`` rather
    than keeping the dense model's behaviour elsewhere.
    With ``eval_data``, held-out perplexity before and after is recorded in
    the ``config.shortgpt["recovery"]`` entry. ``callback(step, peft_model, logs)``
    is called after each optimizer step (for curves; ``logs`` has ``loss``,
    ``lr`` and ``process``). Runs on top of any earlier recovery step (e.g. a
    folded linear repair).

    Under ``accelerate launch`` (several GPUs, or CPU processes) each process
    trains on its own share of the batches and the schedule still ends at
    ``steps``; the global batch is ``batch_size x gradient_accumulation_steps x
    processes``.
    """
    if method not in METHODS:
        raise ShortGPTError(f"method must be one of {METHODS}, got {method!r}")
    return recover(
        model,
        "lora",
        data,
        tokenizer=tokenizer,
        seq_len=seq_len,
        eval_data=eval_data,
        eval_tokens=eval_tokens,
        quantized=method == "qlora",
        **options,
    )


def save_healed(
    peft_model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, merge: bool = False, overwrite: bool = False
) -> Path:
    """Save a healed model: the adapter alone (its config names the saved pruned
    base, a checkpoint or a recipe, so ``AutoPeftModelForCausalLM`` rebuilds the
    pruned model), or with ``merge=True`` a native checkpoint that keeps
    ``config.shortgpt`` and its recovery record. PEFT's own
    ``peft_model.save_pretrained`` writes the same adapter; this adds the
    checks, the tokenizer and an atomic write. Under ``accelerate launch``
    only the main process checks and writes; the others wait for it, and raise
    the same error if it fails."""
    from accelerate import PartialState

    from ..atomic import atomic_folder, check_destination
    from ..saving import save_pruned
    from ..verification import explained

    state = PartialState()
    failure = None
    if state.is_main_process:  # checks and writes on one process; every process then raises the same error, or none
        try:
            if not merge:
                base_ref = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
                if not base_ref or base_ref != pruned_reference(peft_model.get_base_model()):
                    raise ShortGPTError(
                        f"the adapter's base ({base_ref or 'none'}) is not where this pruned model is saved: "
                        "save the pruned model with save_pruned (or save_recipe) before healing, "
                        "or save with merge=True"
                    )
            check_destination(out_dir, overwrite)
            with explained("the healed model", "saving it"):
                if merge:
                    save_pruned(peft_model.merge_and_unload(), out_dir, tokenizer, overwrite=overwrite)
                else:
                    with atomic_folder(out_dir, overwrite) as tmp:
                        peft_model.save_pretrained(tmp)
                        if tokenizer is not None:
                            tokenizer.save_pretrained(tmp)
        except ShortGPTError as e:
            if state.num_processes == 1:
                raise
            failure = str(e)  # the other processes wait below: they must learn of it, or they would wait forever
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        failure = broadcast_object_list([failure], from_process=0)[0]
        if merge and not state.is_main_process:
            peft_model.merge_and_unload()  # every process ends with the same merged model
    if failure is not None:
        raise ShortGPTError(failure)
    return Path(out_dir).resolve()
