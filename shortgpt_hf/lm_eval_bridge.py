"""Running lm-evaluation-harness on a model that is already in memory.

The harness is how the community reports numbers (the paper's MMLU, HellaSwag,
PIQA...). Wrapping the live model in ``HFLM(pretrained=model)`` evaluates
exactly what the user pruned — an in-memory prune, a loaded recipe or a
dispatched model — without saving and reloading it. Its tasks read their data
through ``datasets``, usually from the Hub: offline, only tasks whose data is
local (your own YAML in ``include_path``, or a populated datasets cache) run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from torch import nn

from .errors import InvalidRequest
from .layers import input_device
from .records import EvalResult


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """lm-eval's TaskManager, once it is known that lm-eval is installed, the include
    folder exists and every task is known: cheap next to an evaluation, so callers
    check this before they spend minutes on other measures."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InvalidRequest("lm-eval tasks need lm-evaluation-harness: pip install 'shortgpt_hf[eval]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise InvalidRequest(f"lm-eval include path is not a folder: {include_path}")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InvalidRequest(
            f"lm-eval knows no task {', '.join(map(repr, unknown))}"
            + ("" if include_path else " (local task YAMLs go in include_path)")
        )
    return manager


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    manager: Any,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> list[EvalResult]:
    """One `EvalResult` per task and metric the harness reports (stderr rows dropped);
    ``manager`` is `task_manager`'s for these tasks."""
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # lm-eval records `git describe` of the current directory, which says nothing about an in-memory
    # model and prints "fatal: not a git repository" outside one; the hash is left out instead.
    quiet_git = mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
    try:
        with quiet_git:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                bootstrap_iters=0,
            )
    except (OSError, ConnectionError, ValueError) as e:  # the datasets/Hub errors of a task whose data is unreachable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidRequest(
            f"lm-eval could not run {', '.join(tasks)}: {first} (is the task's data local? "
            "offline, use a task YAML in include_path or a populated datasets cache)"
        ) from None
    results = []
    for task, metrics in output["results"].items():
        better = output.get("higher_is_better", {}).get(task, {})
        n = output.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}({filter_name})"
            results.append(
                EvalResult(f"lm_eval:{task}", f"lm_eval/{task}", name, float(value), bool(better.get(metric, True)), n)
            )
    return results
