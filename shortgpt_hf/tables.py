"""The tables the command line prints, laid out to fit an 80-column terminal.

`show` prints a table's title and caption as plain lines, around the table:
rich would wrap them to the table's own width, which squeezes a long title
into a narrow column and breaks a caption mid-word, also in a file that
stdout is redirected to.

rich shrinks a table that is too wide by wrapping or cutting its cells, which
turns numbers into ``1.4…``. So the tables keep their columns few and short:
model names are shortened to their last path part (the caption has them in
full), a task and its metric share one column, and how a number was measured
(the perplexity windows, the calibration) goes in the caption, where wrapping
is harmless.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .ablation import Ablation, AblationRun
    from .evaluation import EvalReport, EvalResult
    from .scoring import LayerScores

WIDTH = 80


def _table(title: str, caption: str | None = None) -> Table:
    return Table(title=title, caption=caption, box=box.SIMPLE_HEAD, caption_justify="left", title_justify="left")


def show(table: Table) -> None:
    """Print a table to stdout: its title, the grid in rich's layout, then its caption."""
    grid = copy.copy(table)
    grid.title = grid.caption = None
    if table.title:
        print(table.title, flush=True)
    Console(highlight=False).print(grid)
    if table.caption:
        print(table.caption, flush=True)


def short_name(name: str, limit: int = 18) -> str:
    """The last part of a path or Hub id, cut in the middle when it is still too long."""
    name = Path(name.rstrip("/")).name or name
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}~{name[-(limit - limit // 2) :]}"


def layer_ranges(layers: Sequence[int]) -> str:
    """``[3, 12, 13, 14, 17]`` as ``3,12-14,17``."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


FIDELITY_LABELS = {
    "kl_mean": "KL mean",
    "kl_p99": "KL p99",
    "top1_agreement": "top-1 agreement",
    "perplexity_ratio": "ppl / dense ppl",
}


def measure_name(r: EvalResult) -> str:
    """One short label for a task and its metric: ``perplexity``, ``general_knowledge acc``,
    ``KL mean (shakespeare-heldout)``."""
    if r.task == r.metric:
        return r.metric
    if r.task.startswith("fidelity:"):
        return f"{FIDELITY_LABELS.get(r.metric, r.metric)} ({r.dataset})"
    if r.task.startswith("suite:"):
        metric = r.metric.removesuffix("_mean")
        return f"{r.task.partition(':')[2]} mean {FIDELITY_LABELS.get(metric, metric)}"
    task = r.task.partition(":")[2] or r.task
    return f"{task} {r.metric}"


def _how_measured(results: Sequence[EvalResult]) -> str:
    notes = dict.fromkeys(  # fidelity is measured on the perplexity's own windows
        f"{r.metric} on {r.dataset}: {r.settings}" for r in results if r.settings and not r.task.startswith("fidelity:")
    )
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
        row = (
            [str(i)]
            + ([str(original[i])] if original is not None else [])
            + [f"{value:.5f}", "<- lowest" if i in marked else ""]
        )
        table.add_row(*row)
    return table


def eval_table(reports: Sequence[EvalReport]) -> Table:
    """One column per model, in order; a report's baseline, if any, comes first.
    Model names are cut to what leaves the numbers room; with many models the
    chance and sample-count columns (also in the JSON) give way."""
    columns = [r for report in reports for r in ([report.baseline] if report.baseline is not None else []) + [report]]
    for extras in (True, False):
        for limit in range(24, 6, -1):
            table = _eval_grid(reports[0].results, columns, limit, extras)
            if _fits(table):
                return table
    return table


def _eval_grid(rows: Sequence[EvalResult], columns: Sequence[EvalReport], limit: int, extras: bool) -> Table:
    names = [short_name(r.model, limit) for r in columns]
    if len(set(names)) < len(names):  # cut names that no longer tell the models apart: number them
        names = [f"[{i}]" for i in range(1, len(columns) + 1)]
        full = ", ".join(f"{n} {r.model}" for n, r in zip(names, columns, strict=True))
    else:
        full = ", ".join(r.model for r, n in zip(columns, names, strict=True) if n != r.model)
    caption = "; ".join(filter(None, [_how_measured(rows), f"models: {full}" if full else ""]))
    table = _table("evaluation", caption or None)
    table.add_column("measure", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    if extras:
        table.add_column("chance", justify="right", no_wrap=True)
        table.add_column("n", justify="right", no_wrap=True)
    for r in rows:
        values = []
        for report in columns:
            try:
                values.append(f"{report.get(r.task, r.metric):.4g}")
            except KeyError:
                values.append("-")
        if extras:
            values += [
                "-" if r.chance is None else f"{r.chance:.3f}",
                "-" if r.num_samples is None else str(r.num_samples),
            ]
        table.add_row(measure_name(r), *values)
    return table


def _fits(table: Table) -> bool:
    console = Console(width=10 * WIDTH)
    return console.measure(table).maximum <= WIDTH


def ablation_tables(result: Ablation) -> list[Table]:
    """Per measure and per way of recovering, one table (methods down, fractions
    removed across); then the layers each run removed."""
    ratios = sorted({run.ratio for run in result.runs})
    counts = {run.ratio: len(run.removed_layers) for run in result.runs}
    header = [f"{ratio:.0%} ({counts[ratio]})" for ratio in ratios]
    recoveries = list(dict.fromkeys(run.recovery for run in result.runs))

    def label(run: AblationRun) -> str:
        return run.metric if run.schedule == "one-shot" else f"{run.metric} ({run.schedule})"

    def grid(title: str, caption: str | None, runs: list[AblationRun], cell: Callable[[AblationRun], str]) -> Table:
        table = _table(title, caption)
        table.add_column("method")
        for h in header:
            table.add_column(h, justify="right", no_wrap=True)
        for method in dict.fromkeys(map(label, runs)):
            by_ratio = {run.ratio: run for run in runs if label(run) == method}
            table.add_row(method, *(cell(by_ratio[r]) if r in by_ratio else "-" for r in ratios))
        return table

    tables = []
    for (task, metric), dense in zip(result.measures(), result.dense, strict=True):
        for recovery in recoveries:
            runs = [run for run in result.runs if run.recovery == recovery]
            title = (
                f"{measure_name(dense)} of {short_name(result.model)} "
                f"({result.num_layers} layers; dense {dense.value:.4g})"
            )
            title += "" if recovery == "none" else f", after {recovery} recovery"
            tables.append(
                grid(
                    title,
                    _how_measured([dense]) or None,
                    runs,
                    lambda run, task=task, metric=metric: f"{run.value(task, metric):.4g}",
                )
            )
    plain = [run for run in result.runs if run.recovery == recoveries[0]]
    tables.append(grid("layers removed (original indices)", None, plain, lambda run: layer_ranges(run.removed_layers)))
    return tables
