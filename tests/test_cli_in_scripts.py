"""What a script or a pipeline relies on: output that reaches a file unaltered,
usage mistakes in one line, help without boxes or cut words, a version, and
mistakes refused before a model is loaded."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli
from tiny_models import tiny_model, tiny_tokenizer

import shortgpt_hf.cli
from shortgpt_hf import EvalReport, EvalResult, ShortGPTError, prune, save_pruned
from shortgpt_hf.cli import app

COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands]
LONG = "x" * 90  # longer than the 80 columns rich assumes when stdout is not a terminal


@pytest.fixture(scope="module")
def pruned_dir(dense_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scripts") / "pruned"
    model = tiny_model("llama")
    model.name_or_path = str(dense_dir)
    prune(model, layers=[1])
    save_pruned(model, folder, tiny_tokenizer())
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was refused")

    monkeypatch.setattr(shortgpt_hf.cli, "_load", load)


def test_piped_output_keeps_long_lines_and_generated_text_whole(dense_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / LONG
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", dense_dir, "--layers", "1", "--out", out)
    assert code in (0, None), err
    assert f"checkpoint saved to {out.resolve()} (verified: cache parity and reload logits)" in stdout.splitlines()

    prompt = "t5 t6\tt7 " + " ".join(f"t{3 + i % 100}" for i in range(40))  # a tab and a 200-character line
    code, stdout, err = run_cli(capsys, monkeypatch, "generate", dense_dir, "--prompt", prompt, "--max-new-tokens", "2")
    assert code in (0, None), err
    assert stdout.splitlines()[0].startswith(prompt), "the generated text is printed as it is"

    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"t{3 + (7 * i) % 120}" for i in range(400)))
    code, stdout, err = run_cli(capsys, monkeypatch, "score", dense_dir, "--calibration", text, "--seq-len", "24")
    assert code in (0, None), err
    assert "calibration: 400 tokens of file:calibration.txt" in stdout.splitlines()
    assert stdout.splitlines()[0] == "bi per layer", "the title is a line of its own, not wrapped to the table"


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--ratoi", "0.3"], "No such option: --ratoi (Possible options: --calibration, --ratio)"),
        (["prune", "--ratio", "abc"], "Invalid value for '--ratio'"),
        (["prune", "--ratio"], "Option '--ratio' requires an argument"),
        (["prunne"], "No such command 'prunne'"),
        (["materialize"], "Missing argument 'MODEL'"),
    ],
)
def test_a_usage_mistake_is_one_line(args, message, capsys, monkeypatch):
    code, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2 and stdout == ""
    assert_one_line_error(err, message)
    assert "--help" in err and "─" not in err and "╭" not in err


def test_version(capsys, monkeypatch):
    import importlib.metadata

    code, stdout, _ = run_cli(capsys, monkeypatch, "--version")
    assert code == 0 and stdout == f"shortgpt_hf {importlib.metadata.version('shortgpt_hf')}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_and_nothing_is_cut(command, capsys, monkeypatch):
    code, stdout, _ = run_cli(capsys, monkeypatch, command, "--help")
    assert code == 0
    usage = stdout.splitlines()[0]
    assert usage.startswith(f"Usage: shortgpt {command} [OPTIONS]") and "{" not in usage
    assert "…" not in stdout and "╭" not in stdout, "help is wrapped at word boundaries, never cut"
    assert max(map(len, stdout.splitlines())) <= 80


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "1.5"], "ratio must be between 0 and 1, got 1.5"),
        (["--ratio", "0"], "ratio must be between 0 and 1, got 0.0"),
        (["--ratio", "-0.1"], "ratio must be between 0 and 1, got -0.1"),
        (["--n-layers", "6"], "between 1 and 5 (of 6), got 6"),
        (["--layers", ""], "no layers to remove"),
        (["--layers", "2,2"], "duplicate layer indices in [2, 2]"),
        (["--layers", "9"], "out of range 0..5"),
        (["--calibration", "{binary}"], "is not UTF-8 text"),
        (["--calibration", "{empty}"], "empty.txt is empty"),
    ],
)
def test_mistakes_are_refused_before_the_model_loads(
    dense_dir, tmp_path, capsys, monkeypatch, no_loading, args, message
):
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.format(binary=tmp_path / "binary.bin", empty=tmp_path / "empty.txt") for a in args]
    code, _, err = run_cli(capsys, monkeypatch, "prune", dense_dir, *args, "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, message)
    assert not (tmp_path / "out").exists()


def test_an_empty_training_file_is_named_before_the_model_loads(pruned_dir, tmp_path, capsys, monkeypatch, no_loading):
    data = tmp_path / "train.txt"
    data.write_text("")
    code, _, err = run_cli(capsys, monkeypatch, "heal", pruned_dir, "--out", tmp_path / "out", "--data", data)
    assert code == 2
    assert_one_line_error(err, f"{data} is empty")


def test_a_missing_lm_eval_folder_is_refused_before_other_measures(monkeypatch, tmp_path):
    import shortgpt_hf.evaluation
    from shortgpt_hf import evaluate

    def measured(*args, **kwargs):
        raise AssertionError("perplexity ran before the lm-eval folder was checked")

    monkeypatch.setattr(shortgpt_hf.evaluation, "_perplexity_results", measured)
    with pytest.raises(ShortGPTError, match="lm-eval include path is not a folder"):
        evaluate(tiny_model("llama"), tiny_tokenizer(), lm_eval_tasks=["my_task"], lm_eval_include=tmp_path / "nope")


def _report(model: str, value: float) -> dict:
    result = EvalResult("perplexity", "shakespeare-heldout", "perplexity", value, False, settings="s")
    return EvalReport(model, [result]).to_dict()


def test_push_reads_what_a_several_model_eval_writes(dense_dir, pruned_dir, tmp_path, capsys, monkeypatch):
    listing = tmp_path / "eval.json"
    listing.write_text(json.dumps([_report(str(dense_dir), 50.0), _report(str(pruned_dir), 80.0)]))
    report = EvalReport.from_json(listing, model=str(pruned_dir))
    assert report.model == str(pruned_dir) and report.baseline.model == str(dense_dir)
    assert report.card_rows()[0] == {
        "task": "perplexity",
        "dataset": "shakespeare-heldout",
        "metric": "perplexity",
        "pruned": 80.0,
        "dense": 50.0,
        "settings": "s",
    }
    with pytest.raises(ShortGPTError, match="none of them is elsewhere"):
        EvalReport.from_json(listing, model="elsewhere")
    # The command gets past the file to the Hub, which is offline here.
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    code, _, err = run_cli(capsys, monkeypatch, "push", pruned_dir, "me/pruned", "--eval", listing)
    assert code == 2
    assert "list" not in err and "AttributeError" not in err
    assert_one_line_error(err, "HF_HUB_OFFLINE")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_ctrl_c_from_the_first_instant_is_one_line(delay, tmp_path):
    """The console script, interrupted while it still imports torch and transformers."""
    script = Path(sys.executable).parent / "shortgpt"
    process = subprocess.Popen(
        [str(script), "prune", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert_one_line_error(err, "interrupted")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ctrl_c_while_a_command_works_is_one_line(tmp_path):
    """Interrupted once the built-in model is loading: the command's own handler answers, and
    the ablation's output folder is never created."""
    script = Path(sys.executable).parent / "shortgpt"
    process = subprocess.Popen(
        [str(script), "ablate", "--ratios", "0.2", "--metrics", "bi", "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    while "Loading weights" not in seen and process.poll() is None:
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGINT)
    err = seen + process.communicate(timeout=120)[1]
    assert process.returncode == 2, err
    assert_one_line_error(err, "interrupted")
    assert not list(tmp_path.iterdir())
