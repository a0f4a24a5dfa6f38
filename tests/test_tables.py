"""The CLI's tables fit an 80-column terminal with every number whole (rich
would otherwise wrap or cut cells, turning 1.4e+08 into 1.4…)."""

import io

from rich.console import Console

from shortgpt_hf import EvalReport, EvalResult, PerplexitySettings
from shortgpt_hf.ablation import Ablation, AblationRun
from shortgpt_hf.scoring import LayerScores
from shortgpt_hf.tables import ablation_tables, eval_table, layer_ranges, score_table

SETTINGS = PerplexitySettings().describe()


def rendered(table) -> str:
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(table)
    return console.export_text()


def fits(text: str) -> bool:
    return max(len(line) for line in text.splitlines()) <= 80 and "…" not in text


def results(ppl: float, acc: float) -> list[EvalResult]:
    return [
        EvalResult("perplexity", "shakespeare-heldout", "perplexity", ppl, False, 4095, settings=SETTINGS),
        EvalResult("mc:general_knowledge", "bigbench/general_knowledge", "acc", acc, True, 70, 0.144),
        EvalResult("mc:general_knowledge", "bigbench/general_knowledge", "acc_norm", acc, True, 70, 0.144),
        EvalResult("mc:emoji_movie", "bigbench/emoji_movie", "acc_norm", acc, True, 100, 0.2),
    ]


def test_eval_tables_fit_and_say_how_perplexity_was_measured():
    base = EvalReport("/home/someone/models/smollm2-135m-dense-reference", results(51.76, 0.414))
    pruned = EvalReport(
        "/home/someone/experiments/smollm2-135m-shortgpt-linear-repair", results(150.5, 0.286), baseline=base
    )
    text = rendered(eval_table([pruned]))
    assert fits(text), text
    assert "51.76" in text and "150.5" in text and "general_knowledge acc_norm" in text
    assert SETTINGS in " ".join(text.split()), "the perplexity settings are shown with the numbers"
    several = [EvalReport(f"/tmp/runs/variant-{i}-with-a-long-name", results(100.0 + i, 0.3)) for i in range(4)]
    text = rendered(eval_table(several))
    assert fits(text), text
    assert all(f"{100 + i:.4g}" in text for i in range(4))
    assert "[4] /tmp/runs/variant-3-with-a-long-name" in " ".join(text.split()), (
        "names cut alike are numbered, and spelled out below"
    )


def test_ablation_tables_fit_with_every_method_and_ratio():
    methods = [
        ("bi", "one-shot"),
        ("relative_magnitude", "one-shot"),
        ("relative_magnitude", "iterative"),
        ("random", "one-shot"),
    ]
    runs = [
        AblationRun(
            metric,
            schedule,
            ratio,
            list(range(3, 3 + n)) + [25, 26],
            results(1.4e8 if metric == "random" else 150.5, 0.1),
            recovery,
        )
        for metric, schedule in methods
        for ratio, n in ((0.1, 1), (0.2, 4), (0.25, 6), (0.3, 7))
        for recovery in ("none", "linear+lora")
    ]
    study = Ablation("/home/someone/models/smollm2-135m", 30, results(51.76, 0.414), {}, {}, runs)
    tables = ablation_tables(study)
    assert len(tables) == 2 * len(study.dense) + 1, "per measure, one table per way of recovering; then the layers"
    for table in tables:
        text = rendered(table)
        assert fits(text), text
    text = rendered(tables[0])
    assert "relative_magnitude (iterative)" in text and "1.4e+08" in text
    assert "after linear+lora recovery" in " ".join(rendered(tables[1]).split())
    assert "3-8,25-26" in rendered(tables[-1])


def test_score_table_fits():
    scores = LayerScores(
        "relative_magnitude",
        [0.01 * i for i in range(30)],
        30,
        8192,
        "shakespeare:hamlet+macbeth+julius_caesar+tempest",
        256,
    )
    text = rendered(score_table(scores, {3, 4}, original=list(range(30))))
    assert fits(text), text
    assert "8,192 tokens" in text


def test_layer_ranges():
    assert layer_ranges([17, 3, 12, 13, 14, 25, 26]) == "3,12-14,17,25-26"
    assert layer_ranges([]) == ""
