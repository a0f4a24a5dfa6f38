"""The LoRA recovery method: healing with PEFT adapters, optionally distilled from the dense model.

A short fine-tune of low-rank adapters wins back much of what removing layers
cost (Gromov et al. heal with QLoRA). The loop is plain accelerate, so the same
code runs on CPU, one GPU, or several under ``accelerate launch``; with a
teacher (the dense model) the loss mixes next-token cross-entropy with KL to
the teacher's distribution.

The adapter must name the PRUNED model as its base: an adapter that records
the unpruned base makes ``AutoPeftModelForCausalLM`` load the full model and put
the adapters on the wrong layers. `heal` points it at the saved
pruned checkpoint the model was loaded from, and `save_healed` refuses to write
an adapter whose base is not a saved pruned checkpoint.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationData, TokenWindows
from ..config import ShortGPTConfig
from ..errors import ShortGPTError
from ..families import describe, is_vision_language
from ..layers import find_decoder_layers, input_device
from .base import RecoveryMethod, recover, register

METHODS = ("lora", "qlora")


def adjacent_layers(record: ShortGPTConfig) -> list[int]:
    """Post-pruning indices of the kept layers that touch a removed gap."""
    removed = set(record.removed_layers)
    return [new for new, old in enumerate(record.kept_layers) if old - 1 in removed or old + 1 in removed]


def pruned_reference(model: nn.Module) -> str | None:
    """Where this pruned model is saved as a native checkpoint (what an adapter must
    name as its base), or None if it only exists in memory or as a recipe."""
    name = model.name_or_path
    config = Path(name) / "config.json"
    if not name or not config.is_file():
        return None
    saved = json.loads(config.read_text()).get("shortgpt")
    current = getattr(model.config, "shortgpt", None)
    if not saved or not current or saved.get("removed_layers") != current.get("removed_layers"):
        return None
    return str(Path(name).resolve())


def _check_method(method: str, model: nn.Module) -> None:
    if method not in METHODS:
        raise ShortGPTError(f"method must be one of {METHODS}, got {method!r}")
    if method == "qlora":
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ShortGPTError("QLoRA needs a CUDA GPU and the bitsandbytes package; use method='lora' here")
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ShortGPTError("QLoRA trains on a 4-bit base: load the pruned model with quantization_config=BitsAndBytesConfig(load_in_4bit=True)")


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student), scaled by T^2 as usual."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * mask).sum() / mask.sum() * temperature**2


@register
class LoraRecovery(RecoveryMethod):
    """LoRA (or QLoRA) adapters trained with PEFT in a plain accelerate loop; see `heal`."""

    name = "lora"

    def check(self, model: nn.Module, *, quantized: bool = False, kd_weight: float = 0.5, steps: int = 50, **options: Any) -> None:
        if is_vision_language(model.config):
            # PEFT's AutoPeftModelForCausalLM could not reload the adapter, and text-only
            # batches would leave the vision side untrained: train it with PEFT directly.
            raise ShortGPTError(f"healing supports text-only causal LMs; {describe(model)} is a vision-language model")
        _check_method("qlora" if quantized else "lora", model)
        if not 0 <= kd_weight <= 1:
            raise ShortGPTError(f"kd_weight must be between 0 and 1, got {kd_weight}")
        if steps < 1:
            raise ShortGPTError(f"steps must be at least 1, got {steps}")

    def apply(
        self,
        model: nn.Module,
        windows: TokenWindows,
        tokenizer: Any,
        *,
        quantized: bool = False,
        r: int = 8,
        alpha: int = 16,
        target_modules: list[str] | str | None = None,
        layers: str | list[int] = "all",
        steps: int = 50,
        lr: float = 2e-4,
        batch_size: int = 4,
        teacher: nn.Module | None = None,
        kd_weight: float = 0.5,
        temperature: float = 1.0,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        progress: bool = True,
        callback: Any = None,
    ) -> tuple[nn.Module, dict[str, Any]]:
        from accelerate import Accelerator
        from peft import LoraConfig, get_peft_model

        record = ShortGPTConfig.from_model(model)
        found = find_decoder_layers(model)
        if layers == "all":
            to_transform = None
        elif layers == "adjacent":
            to_transform = adjacent_layers(record)
        elif isinstance(layers, (list, tuple)) and all(0 <= int(i) < len(found.layers) for i in layers) and layers:
            to_transform = [int(i) for i in layers]
        else:
            raise ShortGPTError(f"layers must be 'all', 'adjacent' or post-pruning indices in 0..{len(found.layers) - 1}, got {layers!r}")

        if target_modules is None:  # every linear layer of this family's decoder block (never the output head)
            target_modules = sorted({name.rsplit(".", 1)[-1] for name, m in found.layers[0].named_modules() if isinstance(m, nn.Linear)})
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=target_modules,
            layers_to_transform=to_transform,
            layers_pattern=found.attr if to_transform is not None else None,
            task_type="CAUSAL_LM",
            base_model_name_or_path=pruned_reference(model),
        )
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        if quantized:
            from peft import prepare_model_for_kbit_training

            peft_model = prepare_model_for_kbit_training(peft_model)

        accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
        peft_model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)
        if teacher is not None:
            teacher.eval()
            teacher_device = input_device(teacher)
        batches = itertools.cycle(list(windows.batches(batch_size, getattr(tokenizer, "pad_token_id", None) or 0)))
        peft_model.train()
        tokens = 0
        bar = tqdm(range(steps), desc=f"healing ({'CE+KD' if teacher is not None else 'CE'})", disable=not (progress and accelerator.is_main_process))
        for step in bar:
            for _ in range(gradient_accumulation_steps):
                ids, mask = next(batches)
                ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
                with accelerator.accumulate(peft_model):
                    logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
                    if teacher is not None and kd_weight > 0:
                        with torch.no_grad():
                            teacher_logits = teacher(input_ids=ids.to(teacher_device), attention_mask=mask.to(teacher_device), use_cache=False).logits.to(logits.device)
                        loss = (1 - kd_weight) * loss + kd_weight * _distill_loss(logits, teacher_logits, mask.float(), temperature)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                tokens += int(mask.sum())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if callback is not None:
                callback(step + 1, accelerator.unwrap_model(peft_model))
        peft_model = accelerator.unwrap_model(peft_model)
        peft_model.eval()
        details = {
            "quantized": quantized,
            "r": r,
            "alpha": alpha,
            "target_modules": target_modules,
            "layers": layers if isinstance(layers, str) else list(layers),
            "steps": steps,
            "tokens": tokens,
            "lr": lr,
            "teacher": (teacher.name_or_path or "in-memory model") if teacher is not None else None,
            "kd_weight": kd_weight if teacher is not None else 0.0,
            "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        }
        return peft_model, details


def heal(
    model: nn.Module,
    data: CalibrationData = None,
    method: str = "lora",
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    eval_data: CalibrationData = None,
    eval_tokens: int = 4096,
    **options: Any,
) -> nn.Module:
    """Train LoRA adapters on a pruned model and return the ``PeftModel``.

    ``data``: calibration-style text (default: the packaged calibration plays).
    ``method``: "lora", or "qlora" on a 4-bit base. Options: ``layers`` ("all",
    "adjacent" (kept layers next to a removed gap) or post-pruning indices),
    ``target_modules`` (default: every linear layer of the family's decoder
    block, never the output head), ``r``, ``alpha``, ``steps``, ``lr``,
    ``batch_size``, ``gradient_accumulation_steps``, ``seed``. With ``teacher``
    the loss is ``(1 - kd_weight) * CE + kd_weight * KL`` at ``temperature``.
    With ``eval_data``, held-out perplexity before and after is recorded in
    the ``config.shortgpt["recovery"]`` entry. ``callback(step, peft_model)``
    is called after each optimizer step (for curves). Runs on top of any
    earlier recovery step (e.g. a folded linear repair).
    """
    if method not in METHODS:
        raise ShortGPTError(f"method must be one of {METHODS}, got {method!r}")
    return recover(
        model, "lora", data, tokenizer=tokenizer, seq_len=seq_len, eval_data=eval_data, eval_tokens=eval_tokens, quantized=method == "qlora", **options
    )


def save_healed(peft_model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, merge: bool = False, overwrite: bool = False) -> Path:
    """Save a healed model: the adapter alone (its config names the saved pruned
    base, so ``AutoPeftModelForCausalLM`` rebuilds the pruned model), or with
    ``merge=True`` a native checkpoint that keeps ``config.shortgpt`` and its
    ``healing`` record."""
    from ..saving import atomic_folder, save_pruned

    if merge:
        merged = peft_model.merge_and_unload()
        return save_pruned(merged, out_dir, tokenizer, overwrite=overwrite)
    base_ref = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
    if not base_ref or not (Path(base_ref) / "config.json").is_file():
        raise ShortGPTError(
            "the adapter's base is not a saved pruned checkpoint (save the pruned model with save_pruned and load it "
            "from there before healing), or save with merge=True"
        )
    with atomic_folder(out_dir, overwrite) as tmp:
        peft_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir).resolve()


