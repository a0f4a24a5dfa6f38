"""Models larger than memory: scoring one layer at a time from safetensors shards
gives the in-memory scores, and materialize writes what save_pruned writes,
reading each kept tensor once and removed layers never."""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors import safe_open
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from shortgpt_hf import ShortGPTError, prune, save_pruned, save_recipe, score_layers
from shortgpt_hf.sources import resolve
from shortgpt_hf.streaming import Checkpoint, materialize, score_layers_sequentially

# Sliding and full layer_types (gemma3_text), two MoE layouts stored expert by expert (mixtral, qwen2_moe).
FAMILIES = ["llama", "gemma3_text", "mixtral", "qwen2_moe"]
CALIBRATION = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
IDS = torch.arange(3, 15).reshape(2, 6)


def sharded(tmp_path: Path, family: str) -> Path:
    folder = tmp_path / family
    tiny_model(family).save_pretrained(folder, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 3, "the test model must be in several shards"
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            found |= {k: f.get_tensor(k) for k in f.keys()}
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_scores_equal_in_memory_scores(family, tmp_path):
    folder = sharded(tmp_path, family)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    metrics = ("bi", "angular", "relative_magnitude") if family == "llama" else ("bi",)
    for metric in metrics:
        expected = score_layers(model, CALIBRATION, metric, seq_len=16, batch_size=4, progress=False)
        checkpoint = Checkpoint.open(resolve(str(folder)))
        got = score_layers_sequentially(
            folder, CALIBRATION, metric, seq_len=16, batch_size=4, device="cpu", progress=False, _checkpoint=checkpoint
        )
        assert got.num_layers == expected.num_layers and got.num_tokens == expected.num_tokens
        assert max(abs(a - b) for a, b in zip(got.scores, expected.scores, strict=True)) < 1e-5, (metric, got, expected)
        assert len(checkpoint.reads) == len(set(checkpoint.reads)), "each tensor is read once"
        assert not [k for k in checkpoint.reads if k.startswith("lm_head")], "the head is not needed to score"
        layer_order = [int(k.split(".")[2]) for k in checkpoint.reads if k.startswith("model.layers.")]
        assert layer_order == sorted(layer_order), "layers are read one after another"


@pytest.mark.parametrize("family", FAMILIES)
def test_materialize_writes_what_save_pruned_writes(family, tmp_path):
    folder = sharded(tmp_path, family)
    removed = [1, 3]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    prune(model, removed, verify=False)
    save_pruned(model, tmp_path / "in-memory", tiny_tokenizer(), verify=False)
    checkpoint = Checkpoint.open(resolve(str(folder)))
    materialize(
        folder,
        tmp_path / "streamed",
        removed_layers=removed,
        max_shard_size="20KB",
        progress=False,
        _checkpoint=checkpoint,
    )

    expected, got = tensors(tmp_path / "in-memory"), tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].dtype == got[key].dtype and torch.equal(expected[key], got[key]), key
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "in-memory" / "config.json").read_text())
    assert not [k for k in checkpoint.reads if any(k.startswith(f"model.layers.{i}.") for i in removed)]
    assert len(checkpoint.reads) == len(set(checkpoint.reads)) == len(got)
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_materialize_a_recipe_and_the_cli(tmp_path, capsys, monkeypatch):
    folder = sharded(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    prune(model, [2, 4], scores=score_layers(model, CALIBRATION, seq_len=16, progress=False), verify=False)
    save_recipe(model, tmp_path / "recipe", tiny_tokenizer())
    code, stdout, err = run_cli(capsys, monkeypatch, "materialize", tmp_path / "recipe", "--out", tmp_path / "out")
    assert code in (0, None), err
    record = json.loads((tmp_path / "out" / "config.json").read_text())["shortgpt"]
    assert record["removed_layers"] == [2, 4] and record["metric"] == "bi" and len(record["layer_scores"]) == 6
    assert torch.equal(
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=IDS).logits, model(input_ids=IDS).logits
    )
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "prune",
        folder,
        "--load",
        "layer-by-layer",
        "--n-layers",
        "2",
        "--calibration",
        __file__,
        "--seq-len",
        "16",
        "--out",
        tmp_path / "lbl",
    )
    assert code in (0, None), err
    assert "path: layer by layer" in stdout and "removed layers (original indices)" in stdout
    assert json.loads((tmp_path / "lbl" / "config.json").read_text())["num_hidden_layers"] == 4


def test_auto_path_follows_the_size_against_free_memory(tmp_path, capsys, monkeypatch):
    import shortgpt_hf.streaming

    folder = sharded(tmp_path, "llama")
    monkeypatch.setattr(shortgpt_hf.streaming, "available_memory", lambda device="cpu": 10_000)  # 10 kB free
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", folder, "--layers", "1", "--out", tmp_path / "a")
    assert code in (0, None), err
    said = " ".join(stdout.split())
    assert "path: layer by layer, from the safetensors shards (" in said and "of weights, 10 KiB free on cpu)" in said
    monkeypatch.setattr(shortgpt_hf.streaming, "available_memory", lambda device="cpu": 2**40)
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", folder, "--layers", "1", "--out", tmp_path / "b")
    assert code in (0, None), err
    assert "path: in memory" in stdout and "verified" in stdout


def test_unreadable_checkpoints_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    folder = sharded(tmp_path, "llama")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ShortGPTError, match=f"missing shard {shard.name}"):
        Checkpoint.open(resolve(str(folder)))
    (tmp_path / "elsewhere.safetensors").rename(shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = (
        shard.name if index["weight_map"][first] != shard.name else sorted(folder.glob("*.safetensors"))[0].name
    )
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ShortGPTError, match="does not match its files"):
        Checkpoint.open(resolve(str(folder)))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    tiny_model("llama").config.save_pretrained(pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    code, _, err = run_cli(capsys, monkeypatch, "materialize", pickled, "--layers", "1", "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, "holds only pickle weights (.bin/.pt); shortgpt_hf reads safetensors only")
    assert not (tmp_path / "out").exists()


def test_an_interrupted_materialize_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the third shard: shards are already on disk, none survives."""
    folder = sharded(tmp_path, "llama")
    read, reads = Checkpoint.read, []

    def interrupted(self, keys):
        for item in read(self, keys):
            reads.append(item[0])
            if len(reads) == 12:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(Checkpoint, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        materialize(folder, tmp_path / "out", removed_layers=[1], max_shard_size="20KB", progress=False)
    assert len(reads) == 12
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_bad_shard_size_is_one_line(tmp_path, capsys, monkeypatch):
    folder = sharded(tmp_path, "llama")
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "materialize",
        folder,
        "--layers",
        "1",
        "--out",
        tmp_path / "out",
        "--max-shard-size",
        "5 bananas",
    )
    assert code == 2
    assert_one_line_error(err, "max shard size '5 bananas' is not a size like 5GB or 500MB")
    assert not (tmp_path / "out").exists()
