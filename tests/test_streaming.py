"""Models larger than memory: scoring and linear repair one layer at a time from
safetensors shards give the in-memory scores and maps, and materialize writes
what save_pruned writes, reading each kept tensor once and removed layers never."""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli, stray_weight_files
from safetensors import safe_open
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from shortgpt_hf import (
    PrunedForCausalLM,
    ShortGPTConfig,
    ShortGPTError,
    perplexity,
    prune,
    save_pruned,
    save_recipe,
    score_layers,
)
from shortgpt_hf.sources import resolve
from shortgpt_hf.streaming import (
    Checkpoint,
    fit_linear_sequentially,
    materialize,
    perplexity_sequentially,
    score_layers_sequentially,
)
from shortgpt_hf.texts import heldout_texts

# Sliding and full layer_types (gemma3_text), two MoE layouts stored expert by expert (mixtral, qwen2_moe).
FAMILIES = ["llama", "gemma3_text", "mixtral", "qwen2_moe"]
CALIBRATION = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
IDS = torch.arange(3, 15).reshape(2, 6)
HELDOUT = [" ".join(f"t{3 + (11 * i) % 120}" for i in range(150)), " ".join(f"t{3 + (5 * i) % 120}" for i in range(90))]
REPAIR_TOKENS = torch.randint(3, 128, (16, 24), generator=torch.Generator().manual_seed(5))  # 384 tokens, hidden 32


def sharded(tmp_path: Path, family: str) -> Path:
    folder = tmp_path / family
    tiny_model(family).save_pretrained(folder, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 3, "the test model must be in several shards"
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor the folder holds: the weights, and the repair maps in ``shortgpt/``."""
    found = {}
    for file in folder.rglob("*.safetensors"):
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
        verify=False,  # verification reads the base once more; the spy counts the write's own reads
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


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_layer_by_layer_equals_perplexity(family, tmp_path):
    """Whole, with layers skipped (what removing them gives), and on a materialized checkpoint."""
    folder = sharded(tmp_path, family)
    options = dict(seq_len=16, max_tokens=200, batch_size=4, progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    checkpoint = Checkpoint.open(resolve(str(folder)))
    got = perplexity_sequentially(folder, HELDOUT, device="cpu", _checkpoint=checkpoint, **options)
    assert got == pytest.approx(perplexity(model, tiny_tokenizer(), HELDOUT, **options), rel=1e-5)
    layer_reads = [k for k in checkpoint.reads if k.startswith("model.layers.")]
    assert len(layer_reads) == len(set(layer_reads)), "each layer is read once"
    skipped = perplexity_sequentially(folder, HELDOUT, skip=[1, 3], device="cpu", **options)
    prune(model, [1, 3], verify=False)
    expected = perplexity(model, tiny_tokenizer(), HELDOUT, **options)
    assert skipped == pytest.approx(expected, rel=1e-5) and abs(skipped - got) > 1e-3 * got
    materialize(folder, tmp_path / "pruned", removed_layers=[1, 3], progress=False)
    assert perplexity_sequentially(tmp_path / "pruned", HELDOUT, **options) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ShortGPTError, match="skip must name some but not all of the 6 layers"):
        perplexity_sequentially(folder, HELDOUT, skip=range(6), **options)


def config_record(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["shortgpt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_repair_layer_by_layer_writes_what_in_memory_repair_writes(family, tmp_path):
    """A gap at the embeddings (left unrepaired where they are tied) and a two-layer gap; layers
    after the deepest gap are never read for the fit, and the repaired tensors are bit for bit
    what prune(..., recovery="linear") and save_pruned write, maps file and record included."""
    folder = sharded(tmp_path, family)
    removed = [0, 2, 3]
    options = dict(seq_len=24, batch_size=4, progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    prune(model, removed, recovery="linear", recovery_data=REPAIR_TOKENS, recovery_options=options, verify=False)
    save_pruned(model, tmp_path / "in-memory", tiny_tokenizer(), verify=False)

    fitting = Checkpoint.open(resolve(str(folder)))
    repair = fit_linear_sequentially(folder, removed, REPAIR_TOKENS, device="cpu", _checkpoint=fitting, **options)
    assert len(fitting.reads) == len(set(fitting.reads)), "each tensor is read once"
    read_layers = {int(k.split(".")[2]) for k in fitting.reads if k.startswith("model.layers.")}
    assert read_layers == {0, 1, 2, 3}, "the walk stops at the deepest gap"
    assert not [k for k in fitting.reads if k.startswith("lm_head")]

    writing = Checkpoint.open(resolve(str(folder)))
    materialize(
        folder,
        tmp_path / "streamed",
        removed_layers=removed,
        repair=repair,
        verify=False,  # the spy counts the write's own reads
        progress=False,
        _checkpoint=writing,
    )
    assert len(writing.reads) == len(set(writing.reads)), "a tensor the repair changes is read once, too"
    assert not {int(k.split(".")[2]) for k in writing.reads if k.startswith("model.layers.")} & set(removed)

    expected, got = tensors(tmp_path / "in-memory"), tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys() and "recovery.0.gap.2" in got
    for key in expected:
        assert expected[key].dtype == got[key].dtype and torch.equal(expected[key], got[key]), key
    # the same removal and repair; only the request (asked with other options) differs
    assert config_record(tmp_path / "streamed") | {"request": None} == config_record(tmp_path / "in-memory") | {
        "request": None
    }
    base = tensors(folder)
    changed = [
        k
        for k in got
        if k in base and k.startswith("model.layers.0.") and not torch.equal(got[k], base[k].to(got[k].dtype))
    ]
    assert changed, "the map of the gap at layers 2-3 went into the kept layer 1 (now 0)"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_materialize_verifies_layer_by_layer_and_a_wrong_checkpoint_is_not_written(family, tmp_path, monkeypatch):
    import shortgpt_hf.streaming.writing

    folder = sharded(tmp_path, family)
    removed = [0, 2, 3]
    repair = fit_linear_sequentially(folder, removed, REPAIR_TOKENS, seq_len=24, batch_size=4, progress=False)
    for name, fix in (("plain", None), ("repaired", repair)):
        materialize(folder, tmp_path / name, removed_layers=removed, repair=fix, progress=False)  # verify: default
    monkeypatch.setattr(shortgpt_hf.streaming.writing, "_fold_repair", lambda *args: {})  # the maps are lost on the way
    with pytest.raises(ShortGPTError, match="verification failed: the materialized checkpoint's logits differ"):
        materialize(folder, tmp_path / "wrong", removed_layers=removed, repair=repair, verify=True, progress=False)
    assert not (tmp_path / "wrong").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_repaired_recipe_materializes_and_the_cli_repairs_layer_by_layer(tmp_path, capsys, monkeypatch):
    folder = sharded(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    options = dict(seq_len=24, batch_size=4, progress=False)
    prune(model, [2, 3], recovery="linear", recovery_data=REPAIR_TOKENS, recovery_options=options, verify=False)
    save_recipe(model, tmp_path / "recipe", tiny_tokenizer())
    save_pruned(model, tmp_path / "in-memory", tiny_tokenizer(), verify=False)
    materialize(tmp_path / "recipe", tmp_path / "from-recipe", progress=False)
    expected, got = tensors(tmp_path / "in-memory"), tensors(tmp_path / "from-recipe")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert config_record(tmp_path / "from-recipe") == config_record(tmp_path / "in-memory")

    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"t{3 + (7 * i) % 120}" for i in range(600)))
    common = ("--load", "layer-by-layer", "--calibration", text, "--seq-len", "24", "--recovery", "linear")
    code, stdout, err = run_cli(
        capsys, monkeypatch, "prune", folder, "--layers", "2,3", *common, "--out", tmp_path / "a"
    )
    assert code in (0, None), err
    said = " ".join(stdout.split())
    assert "path: layer by layer" in said and "linear repair on 600 tokens: [2, 3] -> layer 1" in said
    assert "(verified: its logits, layer by layer, equal the base's with those layers removed and the maps" in said
    [step] = config_record(tmp_path / "a")["recovery"]
    assert (
        step["method"] == "linear"
        and step["gaps"][0]["relative_error_repaired"] < step["gaps"][0]["relative_error_plain"]
    )
    assert f"held-out perplexity {step['perplexity_before']:.2f} (plain removal) -> " in said
    assert step["perplexity_settings"] == "first 4,096 tokens, disjoint 24-token windows"
    repaired = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    for written in ("a", "in-memory", "from-recipe"):
        assert stray_weight_files(tmp_path / written) == [], f"{written}: a file vLLM would load as weights"
    assert step["perplexity_after"] == pytest.approx(
        perplexity(repaired, tiny_tokenizer(), heldout_texts()[:1], seq_len=24, progress=False), abs=1e-3
    ), "the recorded perplexity is the written checkpoint's"
    code, stdout, err = run_cli(
        capsys, monkeypatch, "prune", folder, "--layers", "2,3", *common, "--recipe", "--out", tmp_path / "r"
    )
    assert code in (0, None), err
    assert "held-out perplexity not measured: a recipe written layer by layer is never built" in " ".join(
        stdout.split()
    )
    assert (tmp_path / "r" / "shortgpt" / "linear_maps.safetensors").is_file()
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    rebuilt = PrunedForCausalLM.from_pretrained(tmp_path / "r")
    assert torch.equal(rebuilt(input_ids=IDS).logits, native(input_ids=IDS).logits)

    code, _, err = run_cli(
        capsys, monkeypatch, "prune", folder, "--n-layers", "2", *common, "--ridge", "-1", "--out", tmp_path / "bad"
    )
    assert code == 2
    assert_one_line_error(err, "ridge must be a non-negative number, got -1.0")
    assert not (tmp_path / "bad").exists()


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
    import shortgpt_hf.pipeline

    folder = sharded(tmp_path, "llama")
    monkeypatch.setattr(shortgpt_hf.pipeline, "available_memory", lambda device="cpu": 10_000)  # 10 kB free
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", folder, "--layers", "1", "--out", tmp_path / "a")
    assert code in (0, None), err
    said = " ".join(stdout.split())
    assert "path: layer by layer, from the safetensors shards (" in said and "of weights, 10 KiB free on cpu)" in said
    monkeypatch.setattr(shortgpt_hf.pipeline, "available_memory", lambda device="cpu": 2**40)
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", folder, "--layers", "1", "--out", tmp_path / "b")
    assert code in (0, None), err
    assert "path: in memory" in stdout and "verified" in stdout
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "prune",
        folder,
        "--load",
        "layer-by-layer",
        "--device-map",
        "auto",
        "--out",
        tmp_path / "c",
    )
    assert code == 2 and not (tmp_path / "c").exists()
    assert_one_line_error(err, "--load layer-by-layer places one layer at a time itself; give no --device-map")


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

    tiny_model("llava").save_pretrained(tmp_path / "llava")  # stored as language_model.model.layers...
    code, _, err = run_cli(
        capsys, monkeypatch, "materialize", tmp_path / "llava", "--layers", "1", "--out", tmp_path / "out"
    )
    assert code == 2 and not (tmp_path / "out").exists()
    assert_one_line_error(err, "stores its decoder layers under other names than model.language_model.layers.N.")


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
        materialize(folder, tmp_path / "out", removed_layers=[1], max_shard_size="20KB", verify=False, progress=False)
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


def test_real_smollm2_layer_by_layer_prune_with_repair_is_the_in_memory_one(
    smollm2_path, tmp_path, capsys, monkeypatch
):
    """The real SmolLM2-135M at 25% with the linear repair, once in memory and once layer by
    layer: the same layers, the same tensors to float32 rounding, and the same held-out
    perplexities before and after; the repair takes perplexity under 0.75x plain removal's.
    ``PrunedForCausalLM.from_pretrained`` with the same request, layer by layer, builds that model."""
    common = ("--ratio", "0.25", "--recovery", "linear", "--recovery-tokens", "4096", "--max-tokens", "4096")
    runs = {}
    for load in ("full", "layer-by-layer"):
        out = tmp_path / load
        code, stdout, err = run_cli(capsys, monkeypatch, "prune", smollm2_path, *common, "--load", load, "--out", out)
        assert code in (0, None), err
        assert "verified" in stdout and "not verified" not in stdout
        runs[load] = (config_record(out), tensors(out))
    (memory, memory_tensors), (streamed, streamed_tensors) = runs["full"], runs["layer-by-layer"]
    assert streamed["removed_layers"] == memory["removed_layers"] and len(memory["removed_layers"]) == 8
    assert max(abs(a - b) for a, b in zip(streamed["layer_scores"], memory["layer_scores"], strict=True)) < 1e-5
    assert streamed_tensors.keys() == memory_tensors.keys()
    for key, tensor in memory_tensors.items():
        torch.testing.assert_close(streamed_tensors[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    [before_memory], [before_streamed] = memory["recovery"], streamed["recovery"]
    for field in ("perplexity_before", "perplexity_after"):
        assert before_streamed[field] == pytest.approx(before_memory[field], rel=1e-4), field
    assert before_streamed["perplexity_settings"] == before_memory["perplexity_settings"]
    assert before_memory["perplexity_after"] < 0.75 * before_memory["perplexity_before"]

    # The front door, layer by layer, builds the model the command wrote: same layers and maps, same logits
    # (measured above already: not again).
    request = ShortGPTConfig(
        ratio=0.25, recovery="linear", recovery_tokens=4096, calibration_tokens=4096, measure=False
    )
    model = PrunedForCausalLM.from_pretrained(smollm2_path, shortgpt_config=request, layer_by_layer=True)
    record = model.config.shortgpt
    assert record["removed_layers"] == memory["removed_layers"] and record["fidelity"] is None
    assert record["request"] == {**memory["request"], "measure": False}
    assert [g["folded_into"] for g in record["recovery"][0]["gaps"]] == [
        g["folded_into"] for g in before_memory["gaps"]
    ]
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    ids = torch.tensor([[1, 504, 3303, 28, 1052, 30, 253, 2215, 282, 2116]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, written(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
