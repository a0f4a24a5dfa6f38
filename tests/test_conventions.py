"""What a careful transformers user expects of the small things: help in the
Unix style, one rounding rule for ratios, checkpoints kept in their dtype,
plain English in messages, and every perplexity shown with its settings."""

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from tiny_models import tiny_model, tiny_tokenizer

from shortgpt_hf import PerplexitySettings, evaluate, model_card, prune, save_pruned
from shortgpt_hf.cli import app
from shortgpt_hf.selection import removal_count

COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_type_tags(command, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, command, "--help")
    assert code == 0
    for tag in ("<bool>", "<str>", "<int>", "<float>", "<path>"):
        assert tag not in out, f"shortgpt {command} --help shows {tag}"


def test_help_names_values_the_unix_way(capsys, monkeypatch):
    _, out, _ = run_cli(capsys, monkeypatch, "prune", "--help")
    line = next(row for row in out.splitlines() if "--out" in row)
    assert " DIR " in line
    assert "[MODEL]" in out


@pytest.mark.parametrize(
    "layers, ratio, count",
    [(18, 0.25, 5), (30, 0.25, 8), (30, 0.35, 11), (10, 0.05, 1), (32, 0.27, 9), (30, 0.1, 3), (22, 0.25, 6)],
)
def test_ratio_rounds_to_the_nearest_layer_halves_up(layers, ratio, count):
    assert removal_count(layers, ratio=ratio) == count


@pytest.fixture
def bf16_dir(tmp_path):
    folder = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_pruned_checkpoint_keeps_its_base_dtype(bf16_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", bf16_dir, "--layers", "1,2", "--out", out)
    assert code in (0, None), err
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    code, stdout, _ = run_cli(capsys, monkeypatch, "load", out)
    assert "torch.bfloat16" in stdout


def test_heal_says_step_in_the_singular_and_how_fidelity_was_measured(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from shortgpt_hf.evaluation import SUMMARY_TOKENS

    tiny_model("llama").save_pretrained(tmp_path / "dense")  # a base the pruned model records, to distil from
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    prune(model, layers=[1, 2])
    save_pruned(model, tmp_path / "pruned", tiny_tokenizer())
    data = tmp_path / "train.txt"
    data.write_text(" ".join(f"t{3 + i % 120}" for i in range(600)))
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "heal",
        tmp_path / "pruned",
        "--out",
        tmp_path / "healed",
        "--data",
        data,
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
    )
    assert code in (0, None), err
    text = " ".join(stdout.split())
    assert "healed: 1 step (" in text and "1 steps" not in text
    settings = PerplexitySettings(seq_len=32, max_tokens=SUMMARY_TOKENS).describe()
    assert f"against the dense model, on the held-out suite ({settings} of each genre)" in text
    assert "(this model was calibrated or healed on other text, which may be of those genres)" in text  # --data


def test_every_perplexity_carries_its_settings_to_the_report_and_the_card():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    report = evaluate(model, tok, ["ppl"], progress=False)
    assert (
        report.results[0].settings
        == PerplexitySettings().describe()
        == "first 4,096 tokens, disjoint 256-token windows"
    )
    other = evaluate(model, tok, ["ppl"], seq_len=64, stride=32, max_tokens=None, progress=False)
    assert other.results[0].settings == "all tokens, 64-token windows moved by 32"
    assert other.results[0].value != report.results[0].value
    prune(model, layers=[1])
    card = model_card(model, evaluate(model, tok, ["ppl"], progress=False).card_rows()).text
    assert "perplexity on shakespeare-heldout: first 4,096 tokens, disjoint 256-token windows" in card


def test_one_perplexity_from_every_entry_point(tmp_path, capsys, monkeypatch):
    """perplexity(), evaluate(), ablate's dense row and `shortgpt eval` give the same
    number for the same model: one definition, one set of defaults."""
    from shortgpt_hf import EvalReport, ablate, perplexity

    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    values = {
        "perplexity": perplexity(model, tok, progress=False),
        "evaluate": evaluate(model, tok, ["ppl"], progress=False).get("perplexity", "perplexity"),
        "ablate": ablate(model, tok, ratios=[0.5], metrics=["sequential"], tasks=["ppl"], progress=False)
        .dense[0]
        .value,
    }
    json_out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, monkeypatch, "eval", tmp_path / "dense", "--tasks", "ppl", "--json", json_out)
    assert code in (0, None), err
    values["shortgpt eval"] = EvalReport.from_json(json_out).get("perplexity", "perplexity")
    assert max(values.values()) == pytest.approx(min(values.values()), rel=1e-6), values


def test_pushing_a_folder_reads_none_of_its_weights(tmp_path, tensor_reads, monkeypatch):
    """The card needs the architecture and the parameter count, not the tensors: a
    local checkpoint is uploaded as its files, and built on the meta device for the card."""
    from huggingface_hub import HfApi

    import shortgpt_hf.push
    from shortgpt_hf import push_to_hub

    model = tiny_model("llama")
    prune(model, layers=[1])
    save_pruned(model, tmp_path / "pruned", tiny_tokenizer())
    tensor_reads.clear()

    class Uploading(Exception):
        pass

    def upload(self, *args, **kwargs):
        raise Uploading

    monkeypatch.setattr(shortgpt_hf.push, "hub_reachable", lambda: True)
    monkeypatch.setattr(shortgpt_hf.push, "_existing_card", lambda *args: None)
    monkeypatch.setattr(HfApi, "create_repo", upload)
    with pytest.raises(Uploading):
        push_to_hub(tmp_path / "pruned", "me/pruned", token="hf_x")
    assert not tensor_reads, f"push read {sorted(tensor_reads)[:3]}..."
