"""The paper's metric comparison (Figures 4-5) on any model: prune with each
metric at each ratio, evaluate, plot; optionally with each way of recovering
(none, training-free linear repair, LoRA healing, or linear repair then LoRA).

Every run prunes the one loaded model in place and puts it back afterwards
(`restored_after`), so an ablation needs no copy of the model and works on a
model dispatched over several devices. One-shot runs rank layers once on the
dense model; iterative runs remove one layer at a time and re-score the
shortened model before choosing the next, which the paper leaves open.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationData
from .config import ShortGPTConfig
from .errors import InvalidRequest
from .evaluation import EvalReport, EvalResult, check_tasks, evaluate
from .layers import find_decoder_layers
from .pruning import prune, restored_after
from .reading import tokenizer_for
from .records import JsonRecord
from .recovery import recover
from .recovery.base import takes_option
from .registry import METRICS, RECOVERY_METHODS
from .scoring import LayerScores, score_layers
from .selection import removal_count

SCHEMA_VERSION = 1
SCHEDULES = ("one-shot", "iterative")
ABLATION_TASKS = ("ppl", "mc")  # one text per run: an ablation evaluates dozens of prunes


def default_metrics() -> list[str]:
    """What the ablation runs unless told otherwise: every registered metric but the greedy
    searches (one calibration pass per layer chosen; ask for them by name)."""
    return [name for name, metric in METRICS.items() if not metric.greedy]


def recovery_choices() -> list[str]:
    """The ways an ablation can recover each removal: none, every registered method, and a
    training-free method followed by each training one ("linear+lora"); from the registry."""
    fitted = [name for name, m in RECOVERY_METHODS.items() if m.needs_removed_layers]
    trained = [name for name, m in RECOVERY_METHODS.items() if not m.needs_removed_layers]
    return ["none", *RECOVERY_METHODS, *(f"{a}+{b}" for a in fitted for b in trained)]


@dataclass
class AblationRun:
    metric: str
    schedule: str
    ratio: float
    removed_layers: list[int]  # original indices
    results: list[EvalResult]
    recovery: str = "none"

    @property
    def method(self) -> str:
        name = self.metric if self.schedule == "one-shot" else f"{self.metric} ({self.schedule})"
        return name if self.recovery == "none" else f"{name} + {self.recovery}"

    def value(self, task: str, metric: str) -> float:
        return EvalReport("", self.results).get(task, metric)


@dataclass
class Ablation(JsonRecord):
    model: str
    num_layers: int
    dense: list[EvalResult]
    scores: dict[str, list[float]]  # one-shot scores on the dense model, per metric
    calibration: dict[str, Any]
    runs: list[AblationRun] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ablation:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InvalidRequest(f"ablation schema {data.get('schema_version')} is not {SCHEMA_VERSION}")
        runs = [AblationRun(**{**r, "results": [EvalResult(**x) for x in r["results"]]}) for r in data["runs"]]
        fields = {k: data[k] for k in ("model", "num_layers", "scores", "calibration")}
        return cls(**fields, dense=[EvalResult(**x) for x in data["dense"]], runs=runs)

    def find(self, method: str, ratio: float) -> AblationRun:
        for run in self.runs:
            if run.method == method and abs(run.ratio - ratio) < 1e-9:
                return run
        raise KeyError(f"no run of {method} at ratio {ratio}")

    def measures(self) -> list[tuple[str, str]]:
        """The (task, metric) pairs measured, in report order."""
        return [(r.task, r.metric) for r in self.dense]

    def plot(self, folder: str | Path) -> list[Path]:
        """One PNG per measure (value against the fraction removed, one line per
        method, dense and chance levels dashed) and ``layer_scores.png``, in
        ``folder`` (made if missing), on bare matplotlib figures (no pyplot state)."""
        from matplotlib.figure import Figure

        from .atomic import save_figure

        folder = Path(folder)
        written = []
        methods = list(dict.fromkeys(run.method for run in self.runs))
        for (task, metric), dense in zip(self.measures(), self.dense, strict=True):
            fig = Figure(figsize=(6.4, 4))
            ax = fig.subplots()
            for method in methods:
                points = sorted((run.ratio, run.value(task, metric)) for run in self.runs if run.method == method)
                ax.plot(
                    [0.0] + [p[0] for p in points],
                    [dense.value] + [p[1] for p in points],
                    marker="o",
                    label=method,
                    linestyle="--" if "iterative" in method else "-",
                )
            ax.axhline(dense.value, color="grey", linestyle=":", linewidth=1, label="dense")
            if dense.chance is not None:
                ax.axhline(dense.chance, color="black", linestyle="-.", linewidth=1, label="chance")
            if metric == "perplexity":
                ax.set_yscale("log")
            ax.set_xlabel("fraction of layers removed")
            ax.set_ylabel(f"{metric} ({dense.dataset})")
            ax.set_title(f"{self.model}: {metric}" if task == metric else f"{self.model}: {task} {metric}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = folder / (f"{metric}.png" if task == metric else f"{task.replace(':', '_')}_{metric}.png")
            written.append(save_figure(fig, path))
        if self.scores:
            fig = Figure(figsize=(max(6, 0.28 * self.num_layers), 2.2 * len(self.scores)))
            axes = fig.subplots(len(self.scores), 1, squeeze=False)
            for ax, (metric, values) in zip(axes[:, 0], self.scores.items(), strict=True):
                ax.bar(range(len(values)), values)
                ax.set_ylabel(metric)
            axes[-1, 0].set_xlabel("layer")
            fig.suptitle(f"{self.model}: per-layer scores on the dense model (low = removed first)")
            fig.tight_layout()
            written.append(save_figure(fig, folder / "layer_scores.png"))
        return written


def check_request(
    ratios: Sequence[float],
    metrics: Sequence[str],
    schedules: Sequence[str],
    tasks: Sequence[str],
    recoveries: Sequence[str] = ("none",),
) -> None:
    """Refuse a bad ablation request before the model is loaded or scored."""
    choices = recovery_choices()
    bad_recovery = [r for r in recoveries if r not in choices]
    if bad_recovery or not recoveries:
        raise InvalidRequest(f"recoveries must be among {', '.join(choices)}, got {', '.join(bad_recovery) or 'none'}")
    if not ratios:
        raise InvalidRequest("give at least one ratio")
    outside = [r for r in ratios if not 0 < r < 1]
    if outside:
        raise InvalidRequest(f"ratio must be between 0 and 1, got {outside[0]}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise InvalidRequest(
            f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}"
        )
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad or not schedules:
        raise InvalidRequest(f"schedules must be among {', '.join(SCHEDULES)}, got {', '.join(schedules) or 'none'}")
    if not tasks:
        raise InvalidRequest("give at least one evaluation task (ppl, mc...)")
    check_tasks(tasks)


def ablate(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    ratios: Sequence[float] = (0.1, 0.2, 0.3),
    metrics: Sequence[str] | None = None,
    schedules: Sequence[str] = ("one-shot",),
    tasks: Sequence[str] = ABLATION_TASKS,
    calibration: CalibrationData = None,
    calibration_tokens: int = 8192,
    recoveries: Sequence[str] = ("none",),
    recovery_options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
    **eval_kwargs: Any,
) -> Ablation:
    """Prune ``model`` with every metric at every ratio and evaluate each result.

    ``schedules``: "one-shot" ranks once on the dense model; "iterative"
    removes one layer at a time, re-scoring in between (hidden-state metrics
    only: the order baselines do not change when re-scored). ``calibration``
    and ``calibration_tokens`` go to `score_layers`; ``eval_kwargs`` (``stride``,
    ``max_tokens``, ``mc_limit``...) to `evaluate`. The model is unchanged afterwards.

    ``recoveries`` evaluates each one-shot removal again after each way of
    recovering from it (`recovery_choices`): a training-free method (``linear``)
    is fitted on ``calibration`` as part of the removal; a training one
    (``lora``) runs on the pruned model with `recover`; ``a+b`` runs both in order.
    ``metrics`` defaults to `default_metrics`.
    ``recovery_options`` maps a method name to its options (e.g.
    ``{"lora": {"steps": 100}, "linear": {"ridge": 1e-3}}``). The
    ``linear_residual`` metric (not run unless asked: it is a greedy search)
    is the selection made for linear repair.
    """
    metrics = default_metrics() if metrics is None else list(metrics)
    check_request(ratios, metrics, schedules, tasks, recoveries)
    num_layers = len(find_decoder_layers(model).layers)
    if ShortGPTConfig.from_model(model) is not None:
        raise InvalidRequest(
            "ablate a dense model: this one is already pruned, and the ratios would not be of its original depth"
        )
    counts = {r: removal_count(num_layers, ratio=r) for r in sorted(set(ratios))}
    tokenizer = tokenizer or tokenizer_for(model)
    label = name or str(getattr(model, "name_or_path", "") or type(model).__name__)

    def run_eval(m: nn.Module) -> list[EvalResult]:
        return evaluate(m, tokenizer, tasks, progress=False, **eval_kwargs).results

    def score(m: nn.Module, metric: str) -> LayerScores:
        steps = max(counts.values()) if METRICS[metric].greedy else None
        return score_layers(
            m,
            calibration,
            metric,
            tokenizer=tokenizer,
            max_tokens=calibration_tokens,
            seed=seed,
            max_layers=steps,
            progress=False,
        )

    options = recovery_options or {}

    def recovered(n: int, scores: LayerScores, recovery: str) -> list[EvalResult]:
        """Evaluate one removal after one way of recovering from it (the caller restores the model)."""
        steps = [] if recovery == "none" else recovery.split("+")
        fitted = steps[0] if steps and RECOVERY_METHODS[steps[0]].needs_removed_layers else None
        kwargs = (
            dict(
                recovery=fitted,
                recovery_data=calibration,
                tokenizer=tokenizer,
                recovery_options={**_quiet(fitted), **options.get(fitted, {})},
            )
            if fitted
            else {}
        )
        prune(model, n_layers=n, scores=scores, **kwargs)
        trained = steps[1:] if fitted else steps
        if not trained:
            return run_eval(model)
        trainable = {p: p.requires_grad for p in model.parameters()}  # PEFT freezes the base; given back as it was
        try:
            result = model
            with warnings.catch_warnings():  # the adapter is evaluated and dropped, never saved
                warnings.filterwarnings("ignore", message="this pruned model is not saved")
                for name in trained:
                    result = recover(
                        result, name, calibration, tokenizer=tokenizer, **_quiet(name), **options.get(name, {})
                    )
            return run_eval(result)
        finally:
            for p, flag in trainable.items():
                p.requires_grad_(flag)

    one_shot = {metric: score(model, metric) for metric in metrics}
    calib = next((s.calibration_summary() for s in one_shot.values() if s.num_tokens), {})
    result = Ablation(label, num_layers, run_eval(model), {m: s.scores for m, s in one_shot.items()}, calib)
    plan = [("one-shot", m) for m in metrics if "one-shot" in schedules]
    plan += [  # re-scoring changes only what reads the model (not the order baselines)
        ("iterative", m)
        for m in metrics
        if "iterative" in schedules and METRICS[m].reads_text and not METRICS[m].greedy
    ]
    one_shot_runs = len(recoveries) if "one-shot" in schedules else 0
    bar = tqdm(
        total=sum(one_shot_runs if s == "one-shot" else 1 for s, _ in plan) * len(counts),
        desc="ablation",
        disable=not progress,
    )
    for schedule, metric in plan:
        if schedule == "one-shot":
            for ratio, n in counts.items():
                for recovery in recoveries:
                    with restored_after(model):
                        results = recovered(n, one_shot[metric], recovery)
                        result.runs.append(AblationRun(metric, schedule, ratio, _removed(model), results, recovery))
                    bar.update()
        else:
            with restored_after(model):
                removed = 0
                for ratio, n in counts.items():
                    while removed < n:
                        scores: LayerScores = one_shot[metric] if removed == 0 else score(model, metric)
                        prune(model, n_layers=1, scores=scores)
                        removed += 1
                    result.runs.append(AblationRun(metric, schedule, ratio, _removed(model), run_eval(model)))
                    bar.update()
    bar.close()
    return result


def _quiet(method: str) -> dict[str, Any]:
    """``progress=False`` for a method that shows progress (the ablation has its own bar)."""
    return {"progress": False} if takes_option(method, "progress") else {}


def _removed(model: nn.Module) -> list[int]:
    return list(ShortGPTConfig.from_model(model).removed_layers)
