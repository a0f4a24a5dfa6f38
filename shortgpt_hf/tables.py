"""The tables the command line prints, laid out to fit an 80-column terminal.

rich shrinks a table that is too wide by wrapping or cutting its cells, which
turns numbers into ``1.4…``. So the tables keep their columns few and short:
model names are shortened to their last path part (the caption has them in
full), a task and its metric share one column, and how a number was measured
(the perplexity windows, the calibration) goes in the caption, where wrapping
is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.table import Table

if TYPE_CHECKING:
    from .ablation import Ablation
    from .evaluation import EvalReport, EvalResult
    from .scoring import LayerScores

WIDTH = 80


def _table(title: str, caption: str | None = None) -> Table:
    return Table(title=title, caption=caption, box=box.SIMPLE_HEAD, caption_justify="left", title_justify="left")


def short_name(name: str, limit: int = 18) -> str:
    """The last part of a path or Hub id, cut in the middle when it is still too long."""
    name = Path(name.rstrip("/")).name or name
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}~{name[-(limit - limit // 2):]}"


def layer_ranges(layers: Sequence[int]) -> str:
    """``[3, 12, 13, 14, 17]`` as ``3,12-14,17``."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def measure_name(r: EvalResult) -> str:
    """One short label for a task and its metric: ``perplexity``, ``general_knowledge acc``."""
    if r.task == r.metric:
        return r.metric
    task = r.task.partition(":")[2] or r.task
    return f"{task} {r.metric}"


def _how_measured(results: Sequence[EvalResult]) -> str:
    notes = dict.fromkeys(f"{r.metric} on {r.dataset}: {r.settings}" for r in results if r.settings)
    return "; ".join(notes)


def score_table(scores: LayerScores, marked: set[int], original: list[int] | None = None) -> Table:
    caption = f"calibration: {scores.num_tokens:,} tokens of {scores.calibration}" if scores.num_tokens else None
    table = _table(f"{scores.metric} per layer", caption)
    table.add_column("layer", justify="right")
    if original is not None:
        table.add_column("original", justify="right")
    table.add_column(scores.metric, justify="right")
    table.add_column("")
    for i, value in enumerate(scores.scores):
        row = [str(i)] + ([str(original[i])] if original is not None else []) + [f"{value:.5f}", "<- lowest" if i in marked else ""]
        table.add_row(*row)
    return table


def eval_table(reports: Sequence[EvalReport]) -> Table:
    """One column per model, in order; a report's baseline, if any, comes first."""
    columns = [r for report in reports for r in ([report.baseline] if report.baseline is not None else []) + [report]]
    names = [short_name(r.model) for r in columns]
    full = ", ".join(r.model for r, n in zip(columns, names) if n != r.model)
    caption = "; ".join(filter(None, [_how_measured(reports[0].results), f"models: {full}" if full else ""]))
    table = _table("evaluation", caption or None)
    table.add_column("measure")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("chance", justify="right")
    table.add_column("n", justify="right")
    for r in reports[0].results:
        values = []
        for report in columns:
            try:
                values.append(f"{report.get(r.task, r.metric):.4g}")
            except KeyError:
                values.append("-")
        chance = "-" if r.chance is None else f"{r.chance:.3f}"
        table.add_row(measure_name(r), *values, chance, "-" if r.num_samples is None else str(r.num_samples))
    return table


def ablation_tables(result: Ablation) -> list[Table]:
    """One table per measure (methods down, fractions removed across), then the layers each run removed."""
    ratios = sorted({run.ratio for run in result.runs})
    counts = {run.ratio: len(run.removed_layers) for run in result.runs}
    methods = list(dict.fromkeys(run.method for run in result.runs))
    header = [f"{ratio:.0%} ({counts[ratio]})" for ratio in ratios]
    tables = []
    for (task, metric), dense in zip(result.measures(), result.dense):
        title = f"{measure_name(dense)} of {short_name(result.model)} ({result.num_layers} layers; dense {dense.value:.4g})"
        table = _table(title, _how_measured([dense]) or None)
        table.add_column("method")
        for h in header:
            table.add_column(h, justify="right")
        for method in methods:
            by_ratio = {run.ratio: run for run in result.runs if run.method == method}
            table.add_row(method, *(f"{by_ratio[r].value(task, metric):.4g}" if r in by_ratio else "-" for r in ratios))
        tables.append(table)
    layers = _table("layers removed (original indices)")
    layers.add_column("method")
    for h in header:
        layers.add_column(h)
    for method in methods:
        by_ratio = {run.ratio: run for run in result.runs if run.method == method}
        layers.add_row(method, *(layer_ranges(by_ratio[r].removed_layers) if r in by_ratio else "-" for r in ratios))
    return [*tables, layers]
