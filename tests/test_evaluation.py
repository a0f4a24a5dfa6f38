"""Evaluation: perplexity against independent computations, multiple-choice
scoring against per-request forwards and on forced questions, the packaged
BIG-bench tasks on the real model, the JSON report, and the lm-eval bridge on
a local task whose data the test writes."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli
from tiny_models import tiny_model

from shortgpt_hf import (
    EvalReport,
    ShortGPTError,
    evaluate,
    model_card,
    multiple_choice,
    perplexity,
    prune,
    save_recipe,
    score_layers,
)
from shortgpt_hf.multiple_choice import PACKAGED_TASKS, MultipleChoiceTask, Question, choice_loglikelihoods, load_task

GEN = torch.Generator().manual_seed(11)
DOCS = [torch.randint(3, 128, (n,), generator=GEN) for n in (41, 23, 9)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama").eval()


@torch.no_grad()
def token_logprob(model, context: torch.Tensor, target: int) -> float:
    """log p(target | context) from one unbatched, unpadded forward."""
    return F.log_softmax(model(input_ids=context[None]).logits[0, -1].float(), -1)[target].item()


@torch.no_grad()
def test_perplexity_single_window_equals_the_models_own_loss(tiny):
    doc = DOCS[0]
    loss = tiny(input_ids=doc[None], labels=doc[None]).loss.item()
    for stride in (1, 5, 64):
        assert perplexity(tiny, None, [doc], seq_len=64, stride=stride) == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("seq_len, stride", [(8, 8), (8, 3), (16, 5), (6, 2)])
def test_perplexity_sliding_window_matches_token_by_token_computation(tiny, seq_len, stride):
    """Each token is predicted from the window the sliding scheme assigns it
    (windows start every ``stride`` tokens; a token belongs to the first window
    that reaches it, never to a window's first position), here recomputed one
    token at a time with no batching, padding or label masking. With overlap,
    every token after a document's first is predicted exactly once."""
    nll, count = 0.0, 0
    for doc in DOCS:
        scored_until = 0
        for begin in range(0, len(doc), stride):
            end = min(begin + seq_len, len(doc))
            for t in range(max(scored_until, begin + 1), end):
                nll -= token_logprob(tiny, doc[begin:t], int(doc[t]))
                count += 1
            scored_until = end
            if end == len(doc):
                break
    if stride < seq_len:
        assert count == sum(len(d) - 1 for d in DOCS)
    expected = math.exp(nll / count)
    for batch_size in (1, 4):
        assert perplexity(tiny, None, DOCS, seq_len=seq_len, stride=stride, batch_size=batch_size) == pytest.approx(
            expected, rel=1e-5
        )


def test_perplexity_truncates_to_max_tokens_and_checks_stride(tiny):
    assert perplexity(tiny, None, DOCS, seq_len=8, max_tokens=41) == pytest.approx(
        perplexity(tiny, None, DOCS[:1], seq_len=8)
    )
    for stride in (0, 9):
        with pytest.raises(ShortGPTError, match="must be between 1 and 8"):
            perplexity(tiny, None, DOCS, seq_len=8, stride=stride)


@torch.no_grad()
def naive_choice_logprob(model, tok, context: str, choice: str) -> float:
    """Sum of log p(choice tokens), one forward per request; the context's trailing
    space moves onto the choice, as in lm-evaluation-harness."""
    stripped = context.rstrip()
    choice = context[len(stripped) :] + choice
    whole = torch.tensor(tok(stripped + choice).input_ids)
    n_context = len(tok(stripped).input_ids)
    logprobs = F.log_softmax(model(input_ids=whole[None]).logits[0].float(), -1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(n_context, len(whole)))


COPY = (
    "The old lighthouse keeper painted the door bright blue every spring. " * 2
    + "The old lighthouse keeper painted the door"
)
FORCED = [
    # The continuation the context has just shown twice, against choices of other lengths.
    Question(
        COPY + " ",
        ["bright blue every spring.", "green", "with a small brush he had bought in the village last winter"],
        [1.0, 0.0, 0.0],
    ),
    Question("1, 2, 3, 4, 5, 6, 7, 8, 9,", [" 10, 11, 12", " 4", " 71, 5, 3, 99"], [1.0, 0.0, 0.0]),
    Question(
        "Monday, Tuesday, Wednesday, Thursday,", [" Friday, Saturday, Sunday", " March", " blue whale"], [1.0, 0.0, 0.0]
    ),
]


def test_choice_loglikelihoods_equal_one_forward_per_request(smollm2):
    """Left-padded batches of multi-token choices of different lengths give the
    same numbers as unbatched forwards (position ids and ``logits_to_keep`` exact)."""
    model, tok = smollm2
    requests = [(q.context, c) for q in FORCED for c in q.choices]
    got = choice_loglikelihoods(model, tok, requests, batch_size=4)
    want = [naive_choice_logprob(model, tok, c, x) for c, x in requests]
    assert got == pytest.approx(want, abs=2e-4)
    assert len({len(tok(x).input_ids) for _, x in requests}) >= 4  # really multi-token, really different lengths


def test_multiple_choice_picks_the_forced_answers(smollm2):
    model, tok = smollm2
    result = multiple_choice(model, tok, MultipleChoiceTask("forced", FORCED, "test"))
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0 and result["num_questions"] == 3
    assert result["chance"] == pytest.approx(1 / 3)
    # The same questions with the answer key inverted score zero: the grade follows target_scores.
    flipped = [Question(q.context, q.choices, [1.0 - s for s in q.scores]) for q in FORCED]
    assert multiple_choice(model, tok, MultipleChoiceTask("flipped", flipped, "test"))["acc"] == 0.0


def test_packaged_bigbench_tasks_and_prompt_format(tmp_path):
    task = load_task("general_knowledge")
    assert set(PACKAGED_TASKS) == {"general_knowledge", "emoji_movie"} and len(task.questions) == 70
    q = task.questions[0]
    assert q.context == "\nQ: How many legs do horses have?\nA: " and q.scores[q.choices.index("four")] == 1.0
    listed = load_task("general_knowledge", list_choices=True).questions[0]
    assert (
        listed.context.startswith("\nQ: How many legs do horses have?\n  choice: ")
        and listed.context.count("\n  choice: ") == 6
    )
    assert [len(load_task(name, limit=10).questions) for name in PACKAGED_TASKS] == [10, 10]
    custom = tmp_path / "task.json"
    custom.write_text(
        json.dumps(
            {
                "name": "mine",
                "task_prefix": "Quiz.",
                "example_input_prefix": "\nQ: ",
                "examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}}],
            }
        )
    )
    assert load_task(str(custom)).questions[0].context == "Quiz.\nQ: 2+2?\nA: "
    for spec, message in [("trivia", "unknown multiple-choice task"), (str(tmp_path / "none.json"), "not found")]:
        with pytest.raises(ShortGPTError, match=message):
            load_task(spec)


@pytest.mark.slow
def test_real_model_is_above_chance_on_packaged_tasks_and_pruning_costs_accuracy(smollm2):
    """Dense SmolLM2-135M answers general_knowledge far above chance (0.41 vs 0.14
    measured); removing the first 12 of 30 layers brings it back near chance.
    Slow: 2 x 70 questions, about 30 s on 2 cores."""
    model, tok = smollm2
    dense = evaluate(model, tok, ["mc:general_knowledge"], progress=False)
    acc, chance = dense.get("mc:general_knowledge", "acc"), dense.results[0].chance
    assert acc > chance + 0.15
    prune(model, list(range(12)))
    assert evaluate(model, tok, ["mc:general_knowledge"], progress=False).get("mc:general_knowledge", "acc") < acc - 0.1


def test_report_json_round_trip_table_rows_and_card(smollm2, tmp_path):
    model, tok = smollm2
    dense = evaluate(model, tok, ["ppl"], max_tokens=512, progress=False, name="smollm2-135m")
    model.name_or_path = "smollm2-135m"
    prune(model, n_layers=4, scores=score_layers(model, tokenizer=tok, max_tokens=512, progress=False))
    report = evaluate(model, tok, ["ppl"], max_tokens=512, progress=False)
    report.baseline = dense
    r = report.results[0]
    assert (r.task, r.dataset, r.metric, r.higher_is_better) == (
        "perplexity",
        "shakespeare-heldout",
        "perplexity",
        False,
    )
    # 512 tokens in two disjoint 256-token windows: the first token of each has no context and is not scored
    assert r.num_samples == 510 and r.value > dense.results[0].value
    assert r.settings == "first 512 tokens, disjoint 256-token windows"
    assert r.value == pytest.approx(perplexity(model, tok, max_tokens=512, progress=False), rel=1e-6)
    report.to_json(tmp_path / "eval.json")
    again = EvalReport.from_json(tmp_path / "eval.json")
    assert again == report
    rows = again.card_rows()
    assert rows == [
        {
            "task": "perplexity",
            "dataset": "shakespeare-heldout",
            "metric": "perplexity",
            "pruned": r.value,
            "dense": dense.results[0].value,
            "settings": "first 512 tokens, disjoint 256-token windows",
        }
    ]
    assert (
        f"| perplexity | shakespeare-heldout | perplexity | {dense.results[0].value:.4g} | {r.value:.4g} |"
        in model_card(model, rows).text
    )
    with pytest.raises(ShortGPTError, match="unknown task 'bleu'"):
        evaluate(model, tok, ["bleu"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ShortGPTError, match="not an evaluation report"):
        EvalReport.from_json(tmp_path / "bad.json")


LOCAL_TASK = """task: tiny_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
FACTS = [
    ("The capital of France is", ["Paris", "Berlin", "a small village near the sea"], 0),
    ("Monday, Tuesday, Wednesday,", ["March", "Thursday", "blue"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "in the morning"], 0),
    ("One, two, three, four,", ["six", "five", "ten thousand"], 1),
    ("The sun rises in the", ["west", "north", "east"], 2),
]


def test_lm_eval_bridge_on_a_local_task_agrees_with_our_scorer(smollm2, tmp_path):
    """lm-eval's HFLM wraps the in-memory pruned model; its acc and acc_norm on a
    local task equal our own log-likelihood scorer's on the same questions (two
    independent implementations)."""
    pytest.importorskip("lm_eval")
    model, tok = smollm2
    prune(model, [12, 13])
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in FACTS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_facts.yaml").write_text(LOCAL_TASK.format(data=data))
    report = evaluate(model, tok, [], lm_eval_tasks=["tiny_facts"], lm_eval_include=tmp_path / "tasks", progress=False)
    ours = multiple_choice(
        model,
        tok,
        MultipleChoiceTask(
            "tiny_facts", [Question(q + " ", c, [float(i == a) for i in range(len(c))]) for q, c, a in FACTS], "test"
        ),
    )
    assert {(r.task, r.metric) for r in report.results} == {
        ("lm_eval:tiny_facts", "acc"),
        ("lm_eval:tiny_facts", "acc_norm"),
    }
    assert report.get("lm_eval:tiny_facts", "acc") == pytest.approx(ours["acc"]) and report.results[0].num_samples == 5
    assert report.get("lm_eval:tiny_facts", "acc_norm") == pytest.approx(ours["acc_norm"])
    with pytest.raises(ShortGPTError, match="lm-eval knows no task 'no_such_task'"):
        evaluate(model, tok, [], lm_eval_tasks=["no_such_task"], lm_eval_include=tmp_path / "tasks")


def test_cli_eval_of_a_recipe_beside_its_base(smollm2, tmp_path, capsys, monkeypatch):
    model, tok = smollm2
    model.name_or_path = "smollm2-135m"  # as load_builtin records it: the recipe's base is the built-in
    prune(model, [12, 13, 14, 15])
    save_recipe(model, tmp_path / "recipe", tok)
    args = [
        "eval",
        tmp_path / "recipe",
        "--tasks",
        "ppl",
        "--max-tokens",
        "512",
        "--with-base",
        "--json",
        tmp_path / "eval.json",
    ]
    code, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    report = EvalReport.from_json(tmp_path / "eval.json")
    assert report.baseline.model == "smollm2-135m" and report.model == str(tmp_path / "recipe")
    pruned, dense = report.get("perplexity", "perplexity"), report.baseline.get("perplexity", "perplexity")
    assert dense < pruned < 10 * dense
    assert f"{dense:.4g}" in stdout and f"{pruned:.4g}" in stdout
    assert pruned == pytest.approx(perplexity(model, tok, max_tokens=512, progress=False), rel=1e-5)
    assert "first 512 tokens, disjoint 256-token windows" in " ".join(stdout.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["smollm2-135m", "--tasks", "ppl,bleu"], "unknown task 'bleu'"),
        (["smollm2-135m", "--tasks", "mc:trivia"], "unknown multiple-choice task"),
        (["smollm2-135m", "--tasks", "ppl:missing.txt"], "not found"),
        (["smollm2-135m", "--lm-eval-include", "missing-dir"], "not a folder"),
        pytest.param(
            ["smollm2-135m", "--tasks", "ppl", "--with-base", "--max-tokens", "64"],
            "needs a pruned model",
            marks=pytest.mark.slow,
        ),
        (["./no-such-model"], "no such folder: ./no-such-model"),
        (["smollm2-135m", "--tasks", ""], "nothing to evaluate"),
    ],
)
def test_cli_eval_bad_input(args, message, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "eval", *args)
    assert code == 2
    assert_one_line_error(err, message)
