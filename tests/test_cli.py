"""The shortgpt command line: the main job end to end, and every bad input as a
one-line error with a non-zero exit and no output folder."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli, run_python
from tiny_models import tiny_auto, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortgpt_hf import ShortGPTConfig
from shortgpt_hf.domains import DOMAINS


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm2_path):
    """Tiny checkpoints on disk (with a real tokenizer, so text calibration works)."""
    root = tmp_path_factory.mktemp("cli_models")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    config = tiny_config("llama")
    config.vocab_size = len(tok)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    config = tiny_config("gpt2")
    config.scale_attn_by_inverse_layer_idx = True
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "gpt2_scaled")
    tok.save_pretrained(root / "gpt2_scaled")
    for family in ("llava", "jamba"):
        config = tiny_config(family)
        config.get_text_config(decoder=True).vocab_size = len(tok)
        tiny_auto(config).from_config(config).save_pretrained(root / family)
        tok.save_pretrained(root / family)
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)
    ).save_pretrained(root / "bert")
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("Too short.")
    return root


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "0.01"], "removes zero"),
        (["--n-layers", "6"], "between 1 and 5"),
        (
            ["--n-layers", "0"],
            "n_layers, the number of layers to remove, must be at least 1, got 0",
        ),  # before the model
        (["--layers", "1,1"], "duplicate"),
        (["--layers", "-1"], "out of range"),
        (["--layers", "9"], "out of range"),
        (["--layers", "a,b"], "comma-separated"),
        (["--n-layers", "2", "--ratio", "0.3"], "only one of"),
        (["--calibration", "{root}/empty.txt", "--n-layers", "2"], "empty"),
        (["--calibration", "{root}/short.txt", "--n-layers", "2"], "fewer than one window"),
        (["--calibration", "{root}/missing.txt", "--n-layers", "2"], "not found"),
        (["--metric", "magic", "--n-layers", "2"], "unknown metric"),
    ],
)
def test_bad_prune_input(tiny_dirs, tmp_path, capsys, monkeypatch, args, message):
    out = tmp_path / "out"
    args = [a.replace("{root}", str(tiny_dirs)) for a in args]
    code, _, err = run_cli(capsys, monkeypatch, "prune", tiny_dirs / "llama", *args, "--out", out, "--seq-len", "16")
    assert code == 2
    assert_one_line_error(err, message)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "model, message",
    [
        ("{root}/nope", "no such folder"),
        ("{root}/bert", "no decoder layer list"),
        ("{root}/gpt2_scaled", "scale_attn_by_inverse_layer_idx"),
        ("{root}/empty.txt", "is a file; a model, recipe or adapter is a folder"),
    ],
)
def test_bad_models(tiny_dirs, tmp_path, capsys, monkeypatch, model, message):
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, monkeypatch, "prune", model.replace("{root}", str(tiny_dirs)), "--layers", "1", "--out", out
    )
    assert code == 2
    assert_one_line_error(err, message)
    assert not out.exists()


def test_vision_language_model_prunes_and_refuses_prefill_skip(tiny_dirs, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", tiny_dirs / "llava", "--layers", "1,2", "--out", out)
    assert code in (0, None), err
    assert "verified" in stdout
    assert AutoModelForImageTextToText.from_pretrained(out).config.text_config.num_hidden_layers == 4
    code, _, err = run_cli(
        capsys, monkeypatch, "generate", tiny_dirs / "llava", "--prompt", "hi", "--prefill-skip", "2"
    )
    assert code == 2
    assert_one_line_error(err, "prefill skipping supports text-only models; LLaVA")
    assert "scoring" not in err  # refused before spending time on scores


def test_impossible_hybrid_removal_is_one_line(tiny_dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, monkeypatch, "prune", tiny_dirs / "jamba", "--layers", "0,2,5", "--out", out)
    assert code == 2
    assert_one_line_error(err, "expert_layer_period/expert_layer_offset")
    assert not out.exists()


def test_existing_output_needs_overwrite(tiny_dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, monkeypatch, "prune", tiny_dirs / "llama", "--layers", "1", "--out", out)
    assert code == 2 and "not empty" in err and (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = run_cli(
        capsys, monkeypatch, "prune", tiny_dirs / "llama", "--layers", "1", "--out", out, "--overwrite"
    )
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders must not be left behind"


@pytest.mark.slow  # the installed console script, in its own process
def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run(
        ["shortgpt", "prune", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"shortgpt: error: no such folder: {tmp_path / 'missing'}"]


def test_score_command_writes_json_and_plot(smollm2_path, tmp_path, capsys, monkeypatch):
    code, stdout, _ = run_cli(
        capsys,
        monkeypatch,
        "score",
        smollm2_path,
        "--max-tokens",
        "1024",
        "--json",
        tmp_path / "s.json",
        "--plot",
        tmp_path / "s.png",
        "--lowest",
        "8",
    )
    assert code == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["metric"] == "bi" and len(data["scores"]) == 30 and data["num_tokens"] == 1024
    assert stdout.count("<- lowest") == 8
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_main_job_on_builtin_model_reloads_natively(tmp_path, capsys, monkeypatch):
    """`shortgpt prune` with only --out (a folder here) on the default built-in model:
    25% of layers go, and the folder reloads with plain transformers in a process
    that never imports shortgpt_hf, giving the same logits as before saving."""
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", "--out", out, "--max-tokens", "2048")
    assert code == 0, err
    assert "layers: 30 -> 22" in stdout and "parameters: 134,515,008 -> 106,194,240" in stdout
    record = ShortGPTConfig.from_dict(json.loads((out / "config.json").read_text())["shortgpt"])
    assert len(record.removed_layers) == 8 and record.metric == "bi" and record.calibration["num_tokens"] == 2048
    # the drift from dense, genre by genre, printed as the README's first screen shows it (the same 8 layers)
    assert sorted(record.fidelity["domains"]) == sorted(d.name for d in DOMAINS)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    shown = readme[readme.index("against the dense model, on the held-out suite") :].split("```")[0].splitlines()
    assert len(shown) == 9 and all(line in stdout.splitlines() for line in shown)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 2476]])
    expected = model(input_ids=ids).logits[0, -1, :5].tolist()
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
assert m.config.num_hidden_layers == 22 and len(m.model.layers) == 22
print(m(input_ids=torch.tensor({ids.tolist()})).logits[0, -1, :5].tolist())
assert "shortgpt_hf" not in sys.modules
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert eval(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)


def test_recipe_and_load_commands(tiny_dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "recipe"
    code, stdout, err = run_cli(
        capsys, monkeypatch, "prune", tiny_dirs / "llama", "--layers", "0,5", "--recipe", "--out", out
    )
    assert code == 0, err
    assert (
        "recipe saved to" in stdout and (out / "shortgpt_config.json").is_file() and (out / "tokenizer.json").is_file()
    )
    assert not list(out.glob("*.safetensors")) and (out / "shortgpt_config.json").stat().st_size < 10_000
    code, stdout, err = run_cli(capsys, monkeypatch, "load", out)
    assert code == 0, err
    assert "LlamaForCausalLM: 4 of 6 layers" in stdout and "removed layers (original indices): [0, 5]" in stdout
    assert f"base: {tiny_dirs / 'llama'}" in stdout
    code, _, err = run_cli(capsys, monkeypatch, "load", tiny_dirs / "llama")
    assert code == 2
    assert_one_line_error(err, "has no layers removed: prune it first")


def test_generate_command(tiny_dirs, capsys, monkeypatch):
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "generate",
        tiny_dirs / "llama",
        "--layers",
        "1,2",
        "--max-new-tokens",
        "4",
        "--prompt",
        "To be",
    )
    assert code == 0, err
    assert (
        "skipping layers [1, 2] during prefill" in stdout
        and "time to first token:" in stdout
        and "4 tokens in" in stdout
    )
    code, _, err = run_cli(capsys, monkeypatch, "generate", tiny_dirs / "llama", "--layers", "0,1,2,3,4,5")
    assert code == 2
    assert_one_line_error(err, "cannot skip every layer")


def test_heal_command_merges_into_native_checkpoint(tiny_dirs, tmp_path, capsys, monkeypatch):
    pruned, healed = tmp_path / "pruned", tmp_path / "healed"
    assert run_cli(capsys, monkeypatch, "prune", tiny_dirs / "llama", "--layers", "2", "--out", pruned)[0] == 0
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "heal",
        pruned,
        "--out",
        healed,
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--merge",
        "--layers",
        "adjacent",
    )
    assert code == 0, err
    assert f"healed: 2 steps (128 tokens, distilled from {tiny_dirs / 'llama'})" in stdout  # the recorded base
    assert "against the dense model, on the held-out suite" in stdout and "merged checkpoint saved to" in stdout
    record = ShortGPTConfig.from_dict(json.loads((healed / "config.json").read_text())["shortgpt"])
    assert (
        record.removed_layers == [2]
        and record.recovery[-1]["steps"] == 2
        and record.recovery[-1]["layers"] == "adjacent"
        and record.recovery[-1]["kd_weight"] == 1.0
    )
    assert record.fidelity["domains"] and record.fidelity["default_calibration"] is True  # measured after healing
    assert AutoModelForCausalLM.from_pretrained(healed).config.num_hidden_layers == 5
    args = ["--steps", "1", "--seq-len", "32", "--batch-size", "2", "--merge", "--kd-weight", "0", "--no-measure"]
    code, stdout, err = run_cli(capsys, monkeypatch, "heal", pruned, "--out", tmp_path / "ce", *args)
    assert code == 0, err
    assert "healed: 1 step (64 tokens, on cross-entropy)" in stdout and "against the dense model" not in stdout
    record = json.loads((tmp_path / "ce" / "config.json").read_text())["shortgpt"]
    assert record["recovery"][-1]["teacher"] is None and record["fidelity"] is None
    code, _, err = run_cli(capsys, monkeypatch, "heal", pruned, "--out", healed, "--steps", "1")
    assert code == 2
    assert_one_line_error(err, "not empty")


def test_every_command_takes_a_recipe(tiny_dirs, tmp_path, capsys, monkeypatch):
    """score, prune, load, generate, eval and heal on a recipe folder (push: tests/test_push.py);
    a form a command cannot use is named, with what to do."""
    recipe = tmp_path / "recipe"
    assert (
        run_cli(capsys, monkeypatch, "prune", tiny_dirs / "llama", "--layers", "0,5", "--recipe", "--out", recipe)[0]
        == 0
    )
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["To be, or not to be, that is the question."] * 60))
    runs = {
        "score": ["score", recipe, "--calibration", text, "--seq-len", "32", "--max-tokens", "256", "--lowest", "1"],
        "prune": [
            "prune",
            recipe,
            "--layers",
            "1",
            "--out",
            tmp_path / "again",
            "--calibration",
            text,
            "--seq-len",
            "32",
        ],
        "load": ["load", recipe],
        "generate": ["generate", recipe, "--max-new-tokens", "3", "--prompt", "To be"],
        "eval": ["eval", recipe, "--tasks", f"ppl:{text}", "--max-tokens", "256", "--seq-len", "32", "--stride", "32"],
        "heal": [
            "heal",
            recipe,
            "--out",
            tmp_path / "adapter",
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--data",
            text,
        ],
    }
    for name, args in runs.items():
        code, stdout, err = run_cli(capsys, monkeypatch, *args)
        assert code in (0, None), f"{name}: {err[-2000:]}"
    assert ShortGPTConfig.from_dict(
        json.loads((tmp_path / "again" / "config.json").read_text())["shortgpt"]
    ).removed_layers == [0, 2, 5]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(recipe.resolve()), "the adapter's base is the recipe"

    for args, message in (
        (["heal", tiny_dirs / "llama", "--out", tmp_path / "x"], "dense model folder"),
        (["prune", tmp_path / "adapter", "--layers", "1", "--out", tmp_path / "y"], "is a PEFT adapter, not a model"),
        (["load", tiny_dirs / "llama"], "has no layers removed"),
    ):
        code, _, err = run_cli(capsys, monkeypatch, *args)
        assert code == 2
        assert_one_line_error(err, message)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
