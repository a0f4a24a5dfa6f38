"""Measuring what pruning cost: held-out perplexity, multiple-choice accuracy,
and lm-evaluation-harness tasks, gathered in one `EvalReport`.

An `EvalReport` is what ``shortgpt eval`` prints, writes as JSON, and hands to
the model card; ``compare`` sets a pruned model's report beside its base's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationData, token_streams
from .domains import DOMAINS
from .errors import InvalidRequest, ShortGPTError, SourceUnavailable
from .fidelity import FidelityTotals, ReferenceLogits
from .layers import eval_mode, input_device
from .records import EvalResult, JsonRecord

DEFAULT_TASKS = ("suite", "mc")  # every genre, unseen ones included, before any single text
HELDOUT_DATASET = "shakespeare-heldout"


@dataclass(frozen=True)
class PerplexitySettings:
    """The one definition of the perplexity we print, record and put on cards.

    `perplexity`, `evaluate`, `ablate`, ``shortgpt eval`` and the before/after
    numbers of a recovery all default to `HEADLINE`: the first 4,096 tokens of
    the text, in disjoint windows of 256 tokens, as lm-evaluation-harness scores
    rolling perplexity (each token is scored once, with the tokens before it in
    its own window as context). Disjoint windows are the cheapest definition, which
    matters when an ablation evaluates dozens of models; a smaller ``stride``
    gives every token more context and a lower number, at about
    ``seq_len / stride`` times the cost. Numbers taken with other settings are
    not comparable, so every one is shown with `describe`."""

    seq_len: int = 256
    stride: int | None = None  # None: disjoint windows
    max_tokens: int | None = 4096

    def describe(self) -> str:
        tokens = "all tokens" if self.max_tokens is None else f"first {self.max_tokens:,} tokens"
        windows = (
            f"disjoint {self.seq_len}-token windows"
            if self.stride is None
            else f"{self.seq_len}-token windows moved by {self.stride}"
        )
        return f"{tokens}, {windows}"


HEADLINE = PerplexitySettings()


def _windows(
    stream: torch.Tensor, seq_len: int, stride: int, bos: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sliding windows over one document: ``(ids, is_target)`` pairs.

    Each window holds ``seq_len`` tokens (the first being BOS for tokenizers
    that use one) and starts ``stride`` tokens after the previous; only the
    tokens no earlier window scored are targets, each with at least
    ``seq_len - stride`` tokens of context after the first window. A stride of
    the whole window gives non-overlapping windows, whose first tokens (no
    context) are not scored; any shorter stride scores every token once."""
    body = seq_len - (bos is not None)
    out, scored_until = [], 0
    for begin in range(0, len(stream), stride):
        end = min(begin + body, len(stream))
        piece = stream[begin:end]
        positions = torch.arange(begin, end)
        target = (positions >= scored_until) & ((positions > begin) | (bos is not None))
        if bos is not None:
            piece, target = torch.cat([torch.tensor([bos]), piece]), torch.cat([torch.tensor([False]), target])
        out.append((piece, target))
        scored_until = end
        if end == len(stream):
            break
    return out


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: CalibrationData = None,
    *,
    seq_len: int = HEADLINE.seq_len,
    stride: int | None = HEADLINE.stride,
    max_tokens: int | None = HEADLINE.max_tokens,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Token-level perplexity of ``texts`` (any calibration form; default: the
    packaged held-out plays, never used for calibration), over the first
    ``max_tokens`` tokens, in windows of ``seq_len`` tokens moved by ``stride``
    (default: disjoint windows, see `PerplexitySettings`; smaller: more context
    per token, at about ``seq_len / stride`` times the cost)."""
    batches = perplexity_batches(tokenizer, texts, seq_len, stride, max_tokens, batch_size)
    nll, count, _ = _log_likelihood(model, batches, progress)
    return math.exp(nll / count)


def perplexity_batches(
    tokenizer: Any,
    texts: CalibrationData,
    seq_len: int,
    stride: int | None,
    max_tokens: int | None,
    batch_size: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The padded ``(input_ids, attention_mask, labels)`` batches that perplexity scores
    (labels -100 where a token is padding or not a target), for `perplexity` and for
    scoring them layer by layer (``streaming.perplexity_sequentially``)."""
    from .texts import heldout_texts

    if seq_len < 2:
        raise InvalidRequest(f"the window length (seq_len / --seq-len) must be at least 2 tokens, got {seq_len}")
    streams, _, bos = token_streams(heldout_texts() if texts is None else texts, tokenizer)
    body = seq_len - (bos is not None)
    stride = body if stride is None else stride
    if not 1 <= stride <= body:
        raise InvalidRequest(
            f"the window stride (stride / --stride) must be between 1 and {body} "
            f"(the window length{' less one for BOS' if bos is not None else ''}), got {stride}"
        )
    if max_tokens is not None:
        kept, budget = [], max_tokens
        for s in streams:
            if budget > 0:
                kept.append(s[:budget])
                budget -= len(kept[-1])
        streams = kept
    windows = [w for s in streams for w in _windows(s, seq_len, stride, bos)]
    if sum(int(t.sum()) for _, t in windows) == 0:
        raise InvalidRequest("no tokens to evaluate perplexity on")
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    batches = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (piece, target) in enumerate(chunk):
            ids[row, : len(piece)] = piece
            mask[row, : len(piece)] = 1
            labels[row, : len(piece)] = piece.masked_fill(~target, -100)
        batches.append((ids, mask, labels))
    return batches


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of each labelled token given the ones before it, and how many tokens that is."""
    logits, targets = logits.float().cpu(), labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    ).item()
    return nll, int((targets != -100).sum())


@torch.no_grad()
def _log_likelihood(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    progress: bool,
    reference: nn.Module | ReferenceLogits | None = None,
) -> tuple[float, int, FidelityTotals | None]:
    """Summed negative log-likelihood over `perplexity_batches` and the number of tokens it covers;
    with a ``reference`` model, also its fidelity totals on the same windows, one batch of both
    models' logits at a time."""
    device = input_device(model)
    nll, count = 0.0, 0
    totals = FidelityTotals() if reference is not None else None
    in_memory = isinstance(reference, nn.Module)
    walked = None if reference is None or in_memory else reference.logits([(i, m) for i, m, _ in batches])
    with eval_mode(model), eval_mode(reference) if in_memory else contextlib.nullcontext():
        for ids, mask, labels in tqdm(batches, desc="perplexity", disable=not progress):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            batch_nll, batch_count = negative_log_likelihood(logits, labels)
            nll, count = nll + batch_nll, count + batch_count
            if totals is not None:
                if in_memory:
                    where = input_device(reference)
                    inputs = dict(input_ids=ids.to(where), attention_mask=mask.to(where), use_cache=False)
                    expected = reference(**inputs).logits
                else:
                    expected = next(walked)
                totals.add(logits, expected, labels)
                del expected
            del logits
    return nll, count, totals


@dataclass
class EvalReport(JsonRecord):
    """A model's results, and optionally its dense baseline's (for side-by-side tables and the card)."""

    model: str
    results: list[EvalResult] = field(default_factory=list)
    baseline: EvalReport | None = None

    def get(self, task: str, metric: str) -> float:
        for r in self.results:
            if r.task == task and r.metric == metric:
                return r.value
        raise KeyError(f"no {task}/{metric} in this report")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        base = data.get("baseline")
        return cls(data["model"], [EvalResult(**r) for r in data["results"]], cls.from_dict(base) if base else None)

    @classmethod
    def from_json(cls, path: str | Path, model: str | None = None) -> EvalReport:
        """A report that `to_json` or ``shortgpt eval --json`` wrote.

        ``shortgpt eval A B --json`` writes a list, one report per model; then
        ``model`` (a name or folder, as given to any command) picks the report of
        the model that names the same thing, and the list's one dense model, if
        it holds exactly one other, becomes its baseline: what a card's
        dense-versus-pruned table needs."""
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, list):
                return cls.from_dict(data)
            reports = [cls.from_dict(d) for d in data]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = getattr(e, "strerror", None) or "not a report of shortgpt eval"
            raise InvalidRequest(f"{path} is not an evaluation report written by shortgpt eval ({reason})") from None
        return _pick_report(reports, model, path)

    def card_rows(self) -> list[dict[str, Any]]:
        """The ``eval_results`` of `model_card` / `push_to_hub`: this report as
        "pruned", the baseline's matching numbers (if any) as "dense"."""
        rows = []
        for r in self.results:
            row = {"task": r.task, "dataset": r.dataset, "metric": r.metric, "pruned": r.value, "settings": r.settings}
            if self.baseline is not None:
                try:
                    row["dense"] = self.baseline.get(r.task, r.metric)
                except KeyError:
                    pass
            rows.append(row)
        return rows


def _pick_report(reports: list[EvalReport], model: str | None, path: str | Path) -> EvalReport:
    """The report of ``model`` among several (see `EvalReport.from_json`)."""
    from .sources import recorded_name, resolve

    if len(reports) == 1:
        return reports[0]
    names = ", ".join(r.model for r in reports)
    if model is None:
        raise InvalidRequest(f"{path} holds reports of several models ({names}); name the one to use")
    same = [r for r in reports if recorded_name(r.model)[0] == recorded_name(model)[0]]
    if len(same) != 1:
        raise InvalidRequest(
            f"{path} holds reports of {names}; {'none' if not same else 'more than one'} of them is {model}"
        )
    report = same[0]
    if report.baseline is None:
        dense = []
        for other in reports:
            try:
                if other is not report and not resolve(other.model).pruned:
                    dense.append(other)
            except ShortGPTError:  # a model that no longer resolves cannot be told dense
                pass
        report.baseline = dense[0] if len(dense) == 1 else None
    return report


def check_tasks(tasks: Sequence[str]) -> None:
    """Refuse an unknown task or a missing task file before any model is loaded or run."""
    from .multiple_choice import load_task

    for spec in tasks:
        kind, _, arg = spec.partition(":")
        if spec == "suite":
            continue
        if kind == "ppl":
            if arg and not Path(arg).is_file():
                raise SourceUnavailable(f"perplexity text file not found: {arg}")
        elif kind == "mc":
            for name in arg.split("+") if arg else []:
                load_task(name)
        else:
            raise InvalidRequest(
                f"unknown task {spec!r}: use ppl, ppl:FILE, suite, mc, mc:NAME[+NAME] or mc:FILE.json "
                "(lm-eval tasks go in lm_eval_tasks)"
            )


def _perplexity_results(
    model: nn.Module, tokenizer: Any, spec: str, options: dict[str, Any], reference: nn.Module | ReferenceLogits | None
) -> list[EvalResult]:
    """``ppl`` or ``ppl:FILE``: see `_text_results`."""
    source = spec.partition(":")[2] or None
    dataset = f"file:{Path(source).name}" if source else HELDOUT_DATASET
    return _text_results(model, _batches(tokenizer, source, options), dataset, options, reference)


def _suite_results(
    model: nn.Module, tokenizer: Any, options: dict[str, Any], reference: nn.Module | ReferenceLogits | None
) -> list[EvalResult]:
    """Every domain of the held-out suite (`domains`) and, against a ``reference``, the mean fidelity
    figures over all domains and over the unseen ones (the genres the packaged calibration never reads)."""
    parts = [_batches(tokenizer, domain.read(), options) for domain in DOMAINS]
    if reference is not None and not isinstance(reference, nn.Module):
        reference = _OneWalk(reference, parts)
    results = []
    for domain, batches in zip(DOMAINS, parts, strict=True):
        task = f"perplexity:{domain.name}"
        results += _text_results(model, batches, domain.name, options, reference, task=task)
    if reference is None:
        return results
    groups = {"all": [d.name for d in DOMAINS], "unseen": [d.name for d in DOMAINS if not d.calibrated]}
    for group, names in groups.items():
        for metric, better in (("perplexity_ratio", False), ("kl_mean", False), ("top1_agreement", True)):
            values = [r.value for r in results if r.metric == metric and r.dataset in names]
            mean = sum(values) / len(values)
            results.append(EvalResult(f"suite:{group}", "+".join(names), f"{metric}_mean", mean, better, len(values)))
    return results


class _OneWalk:
    """A reference walked layer by layer (`ReferenceLogits`) once for every genre of the suite, its
    logits handed out genre by genre: walking it per genre would read every shard of the base once
    per genre. The genres must ask for their batches in the order given here (checked)."""

    def __init__(self, reference: ReferenceLogits, parts: list[list[tuple[torch.Tensor, ...]]]):
        # the same batch objects come back, genre by genre: no genre is tokenized twice
        self._expected = [ids for part in parts for ids, *_ in part]
        self._logits = reference.logits([(ids, mask) for part in parts for ids, mask, *_ in part])
        self._given = 0

    def logits(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
        start, self._given = self._given, self._given + len(batches)
        expected = self._expected[start : self._given]
        if len(expected) != len(batches) or not all(i is e for (i, _), e in zip(batches, expected, strict=False)):
            raise ShortGPTError("the suite asked the walked reference for batches it was not walked over")
        return itertools.islice(self._logits, len(batches))


FIDELITY_METRICS = ("perplexity_ratio", "kl_mean", "kl_p99", "top1_agreement")
SUMMARY_TOKENS = 1024  # per genre, for the record a prune keeps: a first look; `evaluate` measures more


def fidelity_record(report: EvalReport, default_calibration: bool = True) -> dict[str, Any]:
    """A suite report against a reference, as a record keeps it (``config.shortgpt["fidelity"]``):
    per genre the perplexity ratio, KL(dense ‖ pruned) mean and 99th percentile and top-1
    agreement, then their means over all genres and over the unseen ones. The unseen genres are
    those the packaged calibration never reads; ``default_calibration`` (kept) says whether the
    model was calibrated on it, for text of a user's own may be of those genres."""
    domains = {d.name: {m: round(report.get(f"fidelity:{d.name}", m), 4) for m in FIDELITY_METRICS} for d in DOMAINS}
    unseen = [d.name for d in DOMAINS if not d.calibrated]
    settings = next(r.settings for r in report.results if r.task == f"fidelity:{DOMAINS[0].name}")

    def mean(names: list[str]) -> dict[str, float]:
        return {m: round(sum(domains[n][m] for n in names) / len(names), 4) for m in FIDELITY_METRICS}

    return {
        "settings": settings,
        "domains": domains,
        "mean": mean(list(domains)),
        "unseen": unseen,
        "unseen_mean": mean(unseen),
        "default_calibration": default_calibration,
    }


def _batches(tokenizer: Any, texts: CalibrationData, options: dict[str, Any]) -> list[tuple[torch.Tensor, ...]]:
    """`perplexity_batches` of ``texts`` with the evaluation's windows."""
    keys = ("seq_len", "stride", "max_tokens", "batch_size")
    return perplexity_batches(tokenizer, texts, *(options[k] for k in keys))


def _text_results(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, ...]],
    dataset: str,
    options: dict[str, Any],
    reference: nn.Module | ReferenceLogits | None,
    task: str = "perplexity",
) -> list[EvalResult]:
    """The perplexity of one text's `_batches` and, against a ``reference`` model, its fidelity
    figures on the same windows."""
    nll, count, totals = _log_likelihood(model, batches, options["progress"], reference=reference)
    settings = PerplexitySettings(options["seq_len"], options["stride"], options["max_tokens"]).describe()
    results = [EvalResult(task, dataset, "perplexity", math.exp(nll / count), False, count, settings=settings)]
    if totals is not None:
        figures = totals.result()
        task = f"fidelity:{dataset}"
        results += [
            EvalResult(task, dataset, "kl_mean", figures.kl_mean, False, count, settings=settings),
            EvalResult(task, dataset, "kl_p99", figures.kl_p99, False, count, settings=settings),
            EvalResult(task, dataset, "top1_agreement", figures.top1_agreement, True, count, settings=settings),
            EvalResult(task, dataset, "perplexity_ratio", figures.perplexity_ratio, False, count, settings=settings),
        ]
    return results


def _multiple_choice_results(model: nn.Module, tokenizer: Any, spec: str, options: dict[str, Any]) -> list[EvalResult]:
    from .multiple_choice import PACKAGED_TASKS, load_task, multiple_choice

    names = spec.partition(":")[2]
    results = []
    for name in names.split("+") if names else PACKAGED_TASKS:
        task = load_task(name, options["mc_limit"])
        r = multiple_choice(model, tokenizer, task, batch_size=options["batch_size"], progress=options["progress"])
        for metric in ("acc", "acc_norm"):
            results.append(
                EvalResult(f"mc:{task.name}", task.source, metric, r[metric], True, r["num_questions"], r["chance"])
            )
    return results


def evaluate(
    model: nn.Module,
    tokenizer: Any = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    lm_eval_tasks: Sequence[str] | None = None,
    lm_eval_include: str | Path | None = None,
    lm_eval_limit: int | None = None,
    seq_len: int = HEADLINE.seq_len,
    stride: int | None = HEADLINE.stride,
    max_tokens: int | None = HEADLINE.max_tokens,
    mc_limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    name: str | None = None,
    reference: nn.Module | ReferenceLogits | None = None,
) -> EvalReport:
    """Evaluate a (pruned) model on ``tasks``:

    - ``"ppl"``: perplexity on the packaged held-out plays (``"ppl:FILE"``: a
      text file), windows of ``seq_len`` moved by ``stride``, the first
      ``max_tokens`` tokens (defaults: `HEADLINE`, the same as `perplexity`);
    - ``"suite"`` (default): perplexity on every genre of the held-out suite
      (`domains`: drama, encyclopedia, code, technical prose, legal text), each
      with the same windows; with a ``reference``, also the means of the
      fidelity figures over all genres and over those the default calibration
      never reads (unseen);
    - ``"mc"``: every packaged BIG-bench multiple-choice task
      (``"mc:general_knowledge+emoji_movie"`` or ``"mc:path/task.json"``),
      ``mc_limit`` questions each (seeded sample);

    with a ``reference`` model (the dense base), each ``ppl`` text also gives its
    fidelity to it (`fidelity`): KL(dense ‖ pruned) per token, mean and 99th
    percentile, top-1 agreement and the perplexity ratio, measured on the same
    windows with one batch of both models' logits at a time (a base larger than
    memory: ``reference=streaming.WalkedReference(path)``, walked layer by layer);

    and, with ``lm_eval_tasks``, lm-evaluation-harness tasks (``lm_eval_include``:
    a folder of your own task YAMLs). Works on in-memory pruned models, loaded
    recipes and accelerate-dispatched models alike.
    """
    from .reading import tokenizer_for

    check_tasks(tasks)
    manager = None
    if lm_eval_tasks:  # a missing lm-eval, folder or task is refused before minutes of other measures
        from .lm_eval_bridge import task_manager

        manager = task_manager(lm_eval_tasks, lm_eval_include)
    tokenizer = tokenizer or tokenizer_for(model)
    options = dict(
        seq_len=seq_len,
        stride=stride,
        max_tokens=max_tokens,
        mc_limit=mc_limit,
        batch_size=batch_size,
        progress=progress,
    )
    report = EvalReport(name or str(getattr(model, "name_or_path", "") or type(model).__name__))
    for spec in tasks:
        if spec == "suite":
            report.results.extend(_suite_results(model, tokenizer, options, reference))
        elif spec.startswith("ppl"):
            report.results.extend(_perplexity_results(model, tokenizer, spec, options, reference))
        else:
            report.results.extend(_multiple_choice_results(model, tokenizer, spec, options))
    if lm_eval_tasks:
        from .lm_eval_bridge import run_lm_eval

        report.results.extend(
            run_lm_eval(
                model,
                tokenizer,
                lm_eval_tasks,
                manager=manager,
                limit=lm_eval_limit,
                batch_size=batch_size,
            )
        )
    return report
