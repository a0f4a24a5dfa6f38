"""The training loop every training recovery shares: plain accelerate, distilled from the dense model by default.

One loop, so that LoRA adapters (`lora`) and tuning a few whole layers
(`partial`) train the same way: on CPU, one GPU, or several processes under
``accelerate launch`` (each process gets its own share of the batches and the
schedule still ends at ``steps``); the loss is ``(1 - kd_weight) * CE +
kd_weight * KL`` to a teacher, by default the dense base with ``kd_weight=1``,
or next-token cross-entropy alone. What trains is whatever in the model has
``requires_grad``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration import TokenWindows
from ..config import ShortGPTConfig
from ..errors import InvalidRequest, ShortGPTError
from ..layers import input_device, text_config
from ..sources import recorded_name, resolve
from .base import RecoveryMethod, keyword_options, recovered_base

BASE_TEACHER = "base"  # the dense model a pruned one records as its base


@dataclass(frozen=True)
class TrainingOptions:
    """How a training recovery trains: the options `lora` and `partial` share, each method's
    own (which layers, what rank) aside. Checked when built, so a bad value fails in one line
    before any data is prepared.

    ``lr`` None means the method's own default (`TrainingRecovery.default_lr`): LoRA's
    adapters start at zero and take a larger rate than whole layers do. With a ``teacher``
    the loss is ``(1 - kd_weight) * CE + kd_weight * KL`` at ``temperature``. By default
    the teacher is ``"base"``, the dense model this one was pruned from, and ``kd_weight``
    is 1 (KL alone): on held-out genres no training text comes from, distilling kept the
    dense model's behaviour better than cross-entropy on the same text, which adapts the
    model to that text instead (see `dense_teacher` for what a teacher can be; None, or
    ``kd_weight=0``, trains on cross-entropy alone).
    ``callback(step, model, logs)`` is called after each optimizer step (``logs`` has
    ``loss``, ``lr`` and ``process``).
    """

    steps: int = 50
    lr: float | None = None
    batch_size: int = 4
    teacher: nn.Module | str | None = BASE_TEACHER
    kd_weight: float = 1.0
    temperature: float = 1.0
    gradient_accumulation_steps: int = 1
    seed: int = 0
    progress: bool = True
    callback: Callable[[int, nn.Module, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.kd_weight <= 1:
            raise InvalidRequest(
                f"the distillation weight (kd_weight / --kd-weight) must be between 0 and 1, got {self.kd_weight}"
            )
        if self.steps < 1:
            raise InvalidRequest(f"the number of training steps (steps / --steps) must be at least 1, got {self.steps}")
        if self.gradient_accumulation_steps < 1:
            raise InvalidRequest(
                f"gradient_accumulation_steps must be at least 1, got {self.gradient_accumulation_steps}"
            )
        if self.temperature <= 0:
            raise InvalidRequest(f"temperature must be positive, got {self.temperature}")
        if self.lr is not None and not self.lr > 0:
            raise InvalidRequest(f"the learning rate (lr / --lr) must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise InvalidRequest(f"batch_size must be at least 1, got {self.batch_size}")


TRAINING_OPTIONS = frozenset(f.name for f in fields(TrainingOptions))


class TrainingRecovery(RecoveryMethod):
    """A recovery method that trains part of the model with `train`: its `apply` takes its own
    options by name and the shared `TrainingOptions` as ``**training``."""

    default_lr: ClassVar[float]

    def option_names(self) -> set[str]:
        return keyword_options(self.apply) | TRAINING_OPTIONS

    def training(self, model: nn.Module, given: dict[str, Any], *, load: bool) -> TrainingOptions:
        """The shared options from what the caller gave, checked, with this method's learning rate
        and (``load``) the teacher model itself, or only found (`check`), so that a missing one is
        refused before any data is prepared."""
        options = TrainingOptions(**given)
        options = options if options.lr is not None else replace(options, lr=self.default_lr)
        return replace(options, teacher=dense_teacher(model, options, load=load))


def dense_teacher(model: nn.Module, options: TrainingOptions, *, load: bool = True) -> nn.Module | None:
    """The model ``options.teacher`` stands for. ``"base"``: the dense model ``model`` was pruned
    from, by the name and revision its record keeps (a model not pruned yet, as `prune` runs a
    method, is its own base); another name or folder: that model. Either is loaded in the
    student's dtype, spread with ``device_map="auto"`` when the student is spread over devices,
    else moved to the training device by `train`. A model is used as given; None, or
    ``kd_weight=0``, is no teacher. A pruned model that records no base heals on cross-entropy,
    with a warning; a base recorded but not found is refused, as is a teacher whose vocabulary
    is not the student's."""
    from ..loading import load_model  # here: loading imports the recovery package, which imports this

    teacher = options.teacher
    student = recovered_base(model)
    if teacher is None or options.kd_weight == 0 or isinstance(teacher, nn.Module):
        chosen = teacher if options.kd_weight > 0 else None
        return _same_vocabulary(chosen, student)
    name, revision = str(teacher), None
    if teacher == BASE_TEACHER:
        record = ShortGPTConfig.from_model(student)
        name, revision = (
            (record.base_model_name_or_path, record.base_revision) if record else recorded_name(student.name_or_path)
        )
        if not name:
            if load:
                warnings.warn(
                    "this pruned model records no dense base to distil from (teacher='base'), so it heals on "
                    "cross-entropy alone: pass teacher=<the dense model> to distil",
                    stacklevel=4,
                )
            return None
    try:
        resolve(name, revision)
    except ShortGPTError as e:
        raise InvalidRequest(
            f"the teacher to distil from: {e} (give another with teacher= / --teacher, or none with kd_weight=0)"
        ) from None
    if getattr(student, "is_loaded_in_4bit", False):
        raise InvalidRequest(
            "a 4-bit (QLoRA) student would get a full-precision teacher by name: load the teacher as you want it "
            "and pass the model (teacher=...), or train on cross-entropy (kd_weight=0)"
        )
    if not load:
        return None
    spread = len(set((getattr(student, "hf_device_map", None) or {}).values())) > 1
    placement = {"device_map": "auto"} if spread else {}
    dense, _ = load_model(name, tokenizer=False, revision=revision, dtype=student.dtype, **placement)
    return _same_vocabulary(dense, student)


def _same_vocabulary(teacher: nn.Module | None, student: nn.Module) -> nn.Module | None:
    """``teacher``, or a one-line refusal when its next-token distribution is over another vocabulary."""
    if teacher is not None:
        ours, theirs = text_config(student).vocab_size, text_config(recovered_base(teacher)).vocab_size
        if ours != theirs:
            raise InvalidRequest(
                f"the teacher predicts over {theirs:,} tokens and this model over {ours:,}: distil from a model "
                "with the same tokenizer"
            )
    return teacher


LOSS_CHUNK_ELEMENTS = 2**23  # logits per chunk of the loss: 32 MiB for each float32 temporary


def healing_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """The training loss: next-token cross-entropy averaged over the real tokens, or with
    ``teacher_logits`` ``(1 - kd_weight) * CE + kd_weight * KL``, KL(teacher || student)
    at ``temperature`` averaged over the real tokens and scaled by T^2 as usual.

    Computed ``chunk_tokens`` tokens at a time (default: `LOSS_CHUNK_ELEMENTS` logits),
    gradient included (`_ChunkedLoss`): the float32 log-probabilities of both models
    (each batch x seq x vocab floats, 192 MiB for SmolLM2 at the CLI's 4 x 256 tokens)
    then exist one chunk at a time, not several of them whole until the backward
    pass, and neither model's logits outlive the forward pass. The value and the
    gradient are the unchunked ones up to float rounding.
    """
    # Position i predicts token i + 1: the last position and padding predict nothing.
    targets = F.pad(ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100), (0, 1), value=-100)
    chunk = chunk_tokens or max(1, LOSS_CHUNK_ELEMENTS // logits.shape[-1])
    weight = kd_weight if teacher_logits is not None else 0.0
    return _ChunkedLoss.apply(logits, targets, mask.float(), teacher_logits, weight, temperature, chunk)


class _ChunkedLoss(torch.autograd.Function):
    """`healing_loss` with its gradient computed in the forward pass, chunk by chunk, from
    the closed forms (softmax minus one-hot for the cross-entropy; the student's minus the
    teacher's tempered probabilities, over T, for the KL): autograd would keep every chunk's
    intermediates until the backward pass, and recomputing them there (checkpointing) would
    cost a second pass over the vocabulary. Only the gradient, one logits-sized tensor, is
    kept; neither model's logits are."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        teacher: torch.Tensor | None,
        kd_weight: float,
        temperature: float,
        chunk: int,
    ) -> torch.Tensor:
        grad = torch.empty_like(logits)
        logits, teacher = logits.flatten(0, 1), None if teacher is None else teacher.flatten(0, 1)
        targets, weights, flat_grad = targets.flatten(), weights.flatten(), grad.flatten(0, 1)
        ce_scale = (1 - kd_weight) / (targets != -100).sum()
        kd_scale = kd_weight * temperature**2 / weights.sum()
        loss = torch.zeros((), device=logits.device)
        for start in range(0, len(logits), chunk):
            rows = slice(start, start + chunk)
            z, real, w = logits[rows].float(), (targets[rows] != -100).unsqueeze(-1), weights[rows].unsqueeze(-1)
            y = targets[rows].clamp(min=0).unsqueeze(-1)
            log_p = z.log_softmax(-1)
            loss -= ce_scale * (log_p.gather(-1, y) * real).sum()
            g = log_p.exp_().scatter_add_(-1, y, -real.float()).mul_(ce_scale * real)
            if teacher is not None:
                log_q = (z / temperature).log_softmax(-1)
                log_t = (teacher[rows].float() / temperature).log_softmax(-1)
                loss += kd_scale * (F.kl_div(log_q, log_t, log_target=True, reduction="none") * w).sum()
                g += log_q.exp_().sub_(log_t.exp_()).mul_(w * kd_scale / temperature)
            flat_grad[rows] = g
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output, *[None] * 6)


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def train(
    model: nn.Module,
    windows: TokenWindows,
    tokenizer: Any,
    options: TrainingOptions,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train what in ``model`` has ``requires_grad`` for ``options.steps`` optimizer steps (10% warm-up,
    then linear decay to zero); return the model, unwrapped and in eval mode, and what the run records."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin
    from torch.utils.data import DataLoader

    steps, teacher, kd_weight = options.steps, options.teacher, options.kd_weight
    gradient_accumulation_steps = options.gradient_accumulation_steps

    # The dataloader's end must not force a premature optimizer step: the data is cycled.
    plugin = GradientAccumulationPlugin(num_steps=gradient_accumulation_steps, sync_with_dataloader=False)
    # cpu=True on a machine with no accelerator: without it, processes started by `accelerate launch`
    # or torchrun would each train alone instead of as one gloo group.
    accelerator = Accelerator(cpu=not _has_accelerator(), gradient_accumulation_plugin=plugin)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    # Not given to accelerator.prepare, which would step it once per process: it is stepped once per
    # optimizer step below, so the schedule ends at ``steps`` whatever the number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps)
    )
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    loader = DataLoader(
        windows.windows, batch_size=options.batch_size, collate_fn=functools.partial(TokenWindows.pad, pad_id=pad_id)
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # each process gets its own share
    distilling = teacher is not None and kd_weight > 0
    if teacher is not None:
        if not getattr(teacher, "hf_device_map", None):  # like the student, on the device this process trains on
            teacher.to(accelerator.device)
        teacher.eval()
        teacher_device = input_device(teacher)

    def batch_loss(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss of one batch. A function of its own so that both models' logits are freed
        when it returns (the loss keeps only their gradient): alive in the backward pass, with the
        student's activations, or into the next step, they would add two batch x seq x vocab tensors."""
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        teacher_logits = None
        if distilling:
            with torch.inference_mode():
                teacher_logits = teacher(
                    input_ids=ids.to(teacher_device), attention_mask=mask.to(teacher_device), use_cache=False
                ).logits.to(logits.device)
        return healing_loss(logits, ids, mask, teacher_logits, kd_weight, options.temperature)

    def cycled() -> Any:
        while True:
            yield from loader

    batches = cycled()
    model.train()
    tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
    bar = tqdm(
        range(steps),
        desc=f"healing ({'CE' if not distilling else 'KD' if kd_weight == 1 else 'CE+KD'})",
        disable=not (options.progress and accelerator.is_main_process),
    )
    for step in bar:
        for _ in range(gradient_accumulation_steps):
            ids, mask = next(batches)
            with accelerator.accumulate(model):
                loss = batch_loss(ids, mask)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            tokens += mask.sum()
        rate = scheduler.get_last_lr()[0]  # the rate this step was taken with
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if options.callback is not None:
            options.callback(
                step + 1,
                accelerator.unwrap_model(model),
                {"loss": loss.item(), "lr": rate, "process": accelerator.process_index},
            )
    model = accelerator.unwrap_model(model)
    model.eval()
    return model, {
        "steps": steps,
        "processes": accelerator.num_processes,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "tokens": int(accelerator.reduce(tokens, reduction="sum")),
        "lr": options.lr,
        "teacher": (teacher.name_or_path or "in-memory model") if teacher is not None else None,
        "kd_weight": kd_weight if teacher is not None else 0.0,
        "temperature": options.temperature if teacher is not None else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
