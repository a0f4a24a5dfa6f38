"""Zero-shot multiple-choice accuracy by log-likelihood, on BIG-bench JSON tasks.

Perplexity says how much a pruned model's language modelling degrades; the
paper's headline numbers are multiple-choice accuracies, where a model can keep
ranking answers correctly while its perplexity rises. Each choice is scored as
the summed log-probability of its tokens after the question; ``acc`` takes the
highest, ``acc_norm`` the highest per character of the choice (so long answers
are not penalised for having more tokens), as lm-evaluation-harness does.

Prompts follow BIG-bench's own zero-shot JSON-task format (``bigbench/api/
json_task.py``): task prefix, input prefix (default ``"\\nQ: "``), the input,
the choices appended in BIG-bench's seeded order when the task asks for it,
and the output prefix (default ``"\\nA: "``). A few tasks whose data ship in
the ``bigbench`` PyPI sdist (Apache-2.0) are packaged, gzipped and unmodified,
under ``data/bigbench/`` (see ``data/NOTICE.md``); any other BIG-bench
``task.json`` can be given by path.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import InvalidRequest, SourceUnavailable
from .layers import eval_mode, input_device

# Where SmolLM2-135M is clearly above chance zero-shot (measured on the dense model; re-checked in tests).
PACKAGED_TASKS = ("general_knowledge", "emoji_movie")
BIGBENCH_SEED = 42  # BIG-bench's default random_seed for the order of appended choices


@dataclass
class Question:
    context: str
    choices: list[str]
    scores: list[float]  # BIG-bench target_scores, 1 for a right answer


@dataclass
class MultipleChoiceTask:
    name: str
    questions: list[Question]
    source: str  # "bigbench/<task>" for packaged tasks, else the file name

    @property
    def chance(self) -> float:
        """The expected score of picking a choice uniformly at random."""
        return float(np.mean([np.mean(q.scores) for q in self.questions]))

    @classmethod
    def from_bigbench(
        cls, data: dict[str, Any], name: str, source: str, limit: int | None = None, list_choices: bool = False
    ) -> MultipleChoiceTask:
        """Format a BIG-bench JSON task as its zero-shot evaluation does; with
        ``list_choices=False`` (cloze form) the choices are not listed in the
        question, only scored as answers."""
        examples = [e for e in data.get("examples", []) if e.get("target_scores")]
        if not examples:
            raise InvalidRequest(f"task {name!r} has no multiple-choice examples (no target_scores)")
        if limit is not None:
            if limit < 1:
                raise InvalidRequest(f"limit must be at least 1, got {limit}")
            order = np.random.RandomState(BIGBENCH_SEED).permutation(len(examples))[:limit]
            examples = [examples[i] for i in sorted(order)]
        input_prefix = data.get("example_input_prefix", "\nQ: ")
        output_prefix = data.get("example_output_prefix", "\nA: ")
        choice_prefix = data.get("choice_prefix", "\n  choice: ")
        append = list_choices and data.get("append_choices_to_input", True)
        task_prefix = str(data.get("task_prefix", ""))
        questions = []
        for e in examples:
            choices = list(e["target_scores"])
            text = e["input"]
            if append:
                shown = np.random.RandomState(BIGBENCH_SEED).permutation(sorted(choices))
                text = text + choice_prefix + choice_prefix.join(shown)
            context = task_prefix + input_prefix + text + output_prefix
            questions.append(Question(context, choices, [float(e["target_scores"][c]) for c in choices]))
        return cls(name, questions, source)


def load_task(spec: str, limit: int | None = None, list_choices: bool = False) -> MultipleChoiceTask:
    """A packaged task by name (see `PACKAGED_TASKS`) or a BIG-bench ``task.json`` by path.

    The default cloze form (choices not listed in the question) is how
    lm-evaluation-harness scores small models on ARC or HellaSwag: listing up
    to 13 choices left SmolLM2-135M at chance and made each question several
    times longer to score."""
    path = Path(spec)
    if path.suffix == ".json" or os.sep in spec:
        if not path.is_file():
            raise SourceUnavailable(f"multiple-choice task file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{path} is not valid JSON: {e}") from None
        name = data.get("name") or path.parent.name
        return MultipleChoiceTask.from_bigbench(data, name, path.name, limit, list_choices)
    if spec not in PACKAGED_TASKS:
        raise InvalidRequest(
            f"unknown multiple-choice task {spec!r}; packaged: {', '.join(PACKAGED_TASKS)} "
            "(or a path to a BIG-bench task.json)"
        )
    raw = files("shortgpt_hf").joinpath("data", "bigbench", f"{spec}.json.gz").read_bytes()
    return MultipleChoiceTask.from_bigbench(
        json.loads(gzip.decompress(raw)), spec, f"bigbench/{spec}", limit, list_choices
    )


def _encode(tokenizer: Any, context: str, choice: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of context+choice and how many trailing ones are the choice.

    The context's trailing whitespace moves onto the choice ("A:" + " four"),
    and the choice's tokens are those of the joint encoding past the context's,
    so a choice is tokenized as it would appear in running text."""
    stripped = context.rstrip()
    choice = context[len(stripped) :] + choice
    whole = tokenizer(stripped + choice).input_ids
    n_context = len(tokenizer(stripped).input_ids)
    n_choice = max(1, len(whole) - n_context)
    return whole[-max_len:], min(n_choice, max_len - 1)


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    requests: list[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_len: int = 1024,
    progress: bool = False,
) -> list[float]:
    """Summed log-probability of each ``(context, choice)``'s choice tokens.

    Requests run longest first in LEFT-padded batches (explicit position ids
    keep each row's positions exact), so every row's choice tokens sit at the
    end and the vocabulary projection runs only on those last positions
    (``logits_to_keep``) instead of on the whole context."""
    encoded = [_encode(tokenizer, c, x, max_len) for c, x in requests]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = [0.0] * len(requests)
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="choices", disable=not progress):
            rows = order[start : start + batch_size]
            width = len(encoded[rows[0]][0])
            keep = max(encoded[i][1] for i in rows) + 1
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):
                seq = encoded[i][0]
                ids[r, width - len(seq) :] = torch.tensor(seq)
                mask[r, width - len(seq) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                logits_to_keep=keep,
            ).logits
            # logits[:, j] predicts token width - keep + j + 1
            logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
            targets = ids[:, width - keep + 1 :]
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for r, i in enumerate(rows):
                result[i] = float(picked[r, keep - 1 - encoded[i][1] :].sum())
    return result


def multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    task: MultipleChoiceTask | str,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, float]:
    """``acc`` and ``acc_norm`` (BIG-bench's multiple_choice_grade: the target score
    of the chosen answer, averaged), with ``chance`` and the number of questions."""
    if isinstance(task, str):
        task = load_task(task, limit)
    requests = [(q.context, c) for q in task.questions for c in q.choices]
    lls = choice_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    acc, acc_norm, at = [], [], 0
    for q in task.questions:
        ll = np.array(lls[at : at + len(q.choices)])
        at += len(q.choices)
        lengths = np.array([max(1, len(c)) for c in q.choices], dtype=float)
        acc.append(q.scores[int(np.argmax(ll))])
        acc_norm.append(q.scores[int(np.argmax(ll / lengths))])
    return {
        "acc": float(np.mean(acc)),
        "acc_norm": float(np.mean(acc_norm)),
        "chance": task.chance,
        "num_questions": len(task.questions),
    }
