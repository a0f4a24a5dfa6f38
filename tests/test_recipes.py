"""PrunedForCausalLM: native checkpoints, recipes and base + removed_layers all give
the model an in-memory prune gives, while a recipe never reads removed layers."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import removed_keys
from safetensors.torch import load_file, save_file
from tiny_models import NUM_LAYERS, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortgpt_hf import (
    PrunedForCausalLM,
    ShortGPTConfig,
    ShortGPTError,
    find_decoder_layers,
    prune,
    save_pruned,
    save_recipe,
)

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
REMOVED = [0, 3, NUM_LAYERS - 1]
EAGER = dict(attn_implementation="eager")


@pytest.fixture(params=["llama", "gemma3_text"])
def base_dir(request, tmp_path):
    tiny_model(request.param).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_recipe_load_reads_only_kept_tensors(base_dir, tensor_reads):
    AutoModelForCausalLM.from_pretrained(base_dir)
    assert removed_keys(tensor_reads, REMOVED), "the spy must see a full load read every layer"
    tensor_reads.clear()
    PrunedForCausalLM.from_pretrained(base_dir, removed_layers=REMOVED)
    assert tensor_reads and removed_keys(tensor_reads, REMOVED) == []


@pytest.mark.parametrize("family, removed", [("jamba", [0, 3]), ("bamba", [0, 2, 5])])
def test_hybrid_recipes_load_only_kept_layers(family, removed, tmp_path, tensor_reads):
    """Hybrids refit their layouts (Jamba's periods, Bamba's attention indices) after a partial load."""
    tiny_model(family).save_pretrained(tmp_path / "base")
    expected = tiny_model(family)
    prune(expected, layers=removed)
    tensor_reads.clear()
    loaded = PrunedForCausalLM.from_pretrained(tmp_path / "base", removed_layers=removed, **EAGER)
    assert tensor_reads and removed_keys(tensor_reads, removed) == []
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected(input_ids=IDS).logits)


def test_impossible_recipe_is_refused_before_reading_weights(tmp_path, tensor_reads):
    tiny_model("jamba").save_pretrained(tmp_path / "base")
    tensor_reads.clear()
    with pytest.raises(
        ShortGPTError, match="expert_layer_period/expert_layer_offset"
    ):  # MoE layers 1, 3 would become 0, 1
        PrunedForCausalLM.from_pretrained(tmp_path / "base", removed_layers=[0, 2, 5])
    assert not tensor_reads


def in_memory(base_dir, removed=REMOVED):
    model = AutoModelForCausalLM.from_pretrained(base_dir, **EAGER).eval()
    prune(model, layers=removed)
    return model


def test_three_loading_forms_equal_in_memory_prune(base_dir, tmp_path):
    expected_model = in_memory(base_dir)
    expected = expected_model(input_ids=IDS).logits
    save_pruned(expected_model, tmp_path / "native", verify=False)
    save_recipe(expected_model, tmp_path / "recipe")
    assert {"config.json", "shortgpt_config.json"} <= set(os.listdir(tmp_path / "recipe"))
    assert not list((tmp_path / "recipe").glob("*.safetensors")), "a recipe holds no weights"
    for loaded in (
        PrunedForCausalLM.from_pretrained(tmp_path / "native", **EAGER),
        PrunedForCausalLM.from_pretrained(tmp_path / "recipe", **EAGER),
        PrunedForCausalLM.from_pretrained(base_dir, removed_layers=REMOVED, **EAGER),
    ):
        assert type(loaded) is type(expected_model), "must be the native class, not a subclass"
        assert ShortGPTConfig.from_model(loaded).removed_layers == REMOVED
        assert len(find_decoder_layers(loaded).layers) == NUM_LAYERS - len(REMOVED)
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-6, rtol=1e-6)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(
            loaded.generate(IDS[:, :5], **kwargs), loaded.generate(IDS[:, :5], use_cache=False, **kwargs)
        )


def test_loaded_recipe_saves_as_native_checkpoint(base_dir, tmp_path):
    loaded = PrunedForCausalLM.from_pretrained(base_dir, removed_layers=[1, 2], **EAGER)
    loaded.save_pretrained(tmp_path / "native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["architectures"] == [type(loaded).__name__] and config["num_hidden_layers"] == NUM_LAYERS - 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "native", **EAGER)
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, loaded(input_ids=IDS).logits)


def test_removed_layers_are_never_read(smollm2_path, smollm2, tmp_path, capfd):
    """The base copy has no tensors at all for the removed layers; loading the
    recipe against it must still succeed, with exact logits and no report of
    missing weights (which a load-everything-then-prune approach would print)."""
    model, tok = smollm2
    removed = [12, 13, 14, 15, 16, 17, 25, 26]
    stripped = tmp_path / "stripped"
    shutil.copytree(smollm2_path, stripped)
    weights = load_file(stripped / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not any(k.startswith(f"model.layers.{i}.") for i in removed)}
    assert len(weights) - len(kept) == 9 * len(removed)
    save_file(kept, stripped / "model.safetensors", metadata={"format": "pt"})
    prune(model, layers=removed)
    record = ShortGPTConfig.from_model(model)
    record.base_model_name_or_path = str(stripped)
    save_recipe(record, tmp_path / "recipe", tok)
    capfd.readouterr()
    loaded = PrunedForCausalLM.from_pretrained(tmp_path / "recipe", dtype=torch.float32)
    assert "MISSING" not in capfd.readouterr().err
    ids = tok(["Friends, Romans, countrymen, lend me your ears"], return_tensors="pt").input_ids
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "recipe")("hello").input_ids == tok("hello").input_ids


def test_device_map_auto_places_only_kept_layers(tmp_path, tensor_reads):
    base = tiny_model("gemma3_text")
    base.save_pretrained(tmp_path / "base")
    layer_bytes = sum(p.numel() * 4 for p in base.model.layers[0].parameters())
    budget = base.model.embed_tokens.weight.numel() * 4 + 2 * layer_bytes
    loaded = PrunedForCausalLM.from_pretrained(
        tmp_path / "base",
        removed_layers=REMOVED,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=str(tmp_path / "offload"),
        **EAGER,
    )
    placed = {k: v for k, v in loaded.hf_device_map.items() if k.startswith("model.layers.")}
    assert "disk" in placed.values() and "cpu" in loaded.hf_device_map.values(), loaded.hf_device_map
    assert sorted(int(k.split(".")[2]) for k in placed) == list(range(NUM_LAYERS - len(REMOVED)))
    assert removed_keys(tensor_reads, REMOVED) == []
    torch.testing.assert_close(
        loaded(input_ids=IDS).logits, in_memory(tmp_path / "base")(input_ids=IDS).logits, atol=1e-5, rtol=1e-5
    )


def test_real_smollm2_recipe_on_builtin_base(smollm2, tmp_path):
    model, tok = smollm2
    model.name_or_path = "smollm2-135m"  # as load_builtin records it
    prune(model, layers=[3, 12, 13, 14, 25, 26])
    record = ShortGPTConfig.from_model(model)
    assert record.base_model_name_or_path == "smollm2-135m"
    save_recipe(model, tmp_path / "recipe", tok, verify=True)
    loaded = PrunedForCausalLM.from_pretrained(tmp_path / "recipe", dtype=torch.float32)
    ids = tok(["Now is the winter of our discontent"], return_tensors="pt").input_ids
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def write_recipe(path, **changes):
    record = dict(
        ShortGPTConfig(removed_layers=[1], original_num_hidden_layers=NUM_LAYERS, model_type="llama").to_dict(),
        **changes,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "shortgpt_config.json").write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(base_model_name_or_path="{tmp}/missing"), "base model is unavailable: no such folder"),
        (
            dict(base_model_name_or_path="nobody/no-such-model"),
            "base model is unavailable: 'nobody/no-such-model' is not a local folder, and no model",
        ),
        (dict(base_model_name_or_path=None), "names no base model"),
        (dict(base_model_name_or_path="{base}", model_type="qwen3"), "for a qwen3 model but base"),
        (dict(base_model_name_or_path="{base}", original_num_hidden_layers=8), "expects 8 layers but base"),
        (dict(base_model_name_or_path="{pruned}"), "itself a pruned model"),
    ],
)
def test_recipe_checked_against_base(tmp_path, changes, message):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    in_memory(tmp_path / "base", [0]).save_pretrained(tmp_path / "pruned")
    changes = {
        k: v.format(tmp=tmp_path, base=tmp_path / "base", pruned=tmp_path / "pruned") if isinstance(v, str) else v
        for k, v in changes.items()
    }
    with pytest.raises(ShortGPTError, match=message):
        PrunedForCausalLM.from_pretrained(write_recipe(tmp_path / "recipe", **changes))


def test_bad_recipe_files(tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "shortgpt_config.json").write_text("{not json")
    with pytest.raises(ShortGPTError, match="not valid JSON"):
        PrunedForCausalLM.from_pretrained(tmp_path / "corrupt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShortGPTError, match="is a folder, but not a model, recipe or PEFT adapter"):
        PrunedForCausalLM.from_pretrained(tmp_path / "empty")
    with pytest.raises(ShortGPTError, match="no such folder"):
        PrunedForCausalLM.from_pretrained(tmp_path / "nowhere")
    tiny_model("llama").save_pretrained(tmp_path / "unpruned")
    with pytest.raises(ShortGPTError, match="dense model folder .* has no layers removed"):
        PrunedForCausalLM.from_pretrained(tmp_path / "unpruned")
    with pytest.raises(ShortGPTError, match="not been pruned"):
        save_recipe(tiny_model("llama"), tmp_path / "r")
    write_recipe(tmp_path / "occupied")
    with pytest.raises(ShortGPTError, match="not empty"):
        save_recipe(
            ShortGPTConfig(removed_layers=[1], original_num_hidden_layers=4, base_model_name_or_path="x"),
            tmp_path / "occupied",
        )


HUB_SCRIPT = r"""
import json, sys, warnings, torch
from shortgpt_hf import PrunedForCausalLM, ShortGPTError
root, good, missing = sys.argv[1], sys.argv[2], sys.argv[3]
ids = torch.arange(3, 15).reshape(2, 6)
out = {}
out["by_id"] = PrunedForCausalLM.from_pretrained(
    "tiny-org/tiny-recipe", attn_implementation="eager")(input_ids=ids).logits.tolist()
out["local"] = PrunedForCausalLM.from_pretrained(
    root + "/pinned", attn_implementation="eager")(input_ids=ids).logits.tolist()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    PrunedForCausalLM.from_pretrained(root + "/stale", attn_implementation="eager")
out["stale_warning"] = [str(w.message) for w in caught if missing in str(w.message)]
out["base_revision"] = PrunedForCausalLM.from_pretrained(
    "tiny-org/tiny-base", removed_layers=[1]).config.shortgpt["base_revision"]
from shortgpt_hf.streaming import WalkedReference  # a reference walked at the revision a record names
out["walked_revision"] = WalkedReference("tiny-org/tiny-base", revision=good).source.revision
try:
    WalkedReference("tiny-org/tiny-base", revision=missing)
    out["walked_missing"] = None
except ShortGPTError as e:
    out["walked_missing"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh interpreter, for HF_HUB_CACHE and HF_HUB_OFFLINE to be read at import
def test_hub_ids_resolve_through_the_cache_offline(tmp_path):
    """Base and recipe named by Hub id, served from a huggingface_hub cache the test
    fills (refs/main -> snapshots/<commit>), with HF_HUB_OFFLINE=1."""
    good, missing = "a" * 40, "b" * 40
    hub = tmp_path / "hub"

    def cached_repo(repo_id, commit):
        repo = hub / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    base = tiny_model("llama")
    base.save_pretrained(cached_repo("tiny-org/tiny-base", good))
    record = ShortGPTConfig(
        removed_layers=[0, 4],
        original_num_hidden_layers=NUM_LAYERS,
        model_type="llama",
        base_model_name_or_path="tiny-org/tiny-base",
        base_revision=good,
    )
    record.save_pretrained(cached_repo("tiny-org/tiny-recipe", "c" * 40))
    record.save_pretrained(tmp_path / "pinned")
    stale = ShortGPTConfig(**{**record.to_dict(), "base_revision": missing})
    stale.save_pretrained(tmp_path / "stale")

    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(tmp_path), good, missing], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    prune(base, layers=[0, 4])
    expected = base(input_ids=torch.arange(3, 15).reshape(2, 6)).logits
    torch.testing.assert_close(torch.tensor(out["by_id"]), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(out["local"]), expected, atol=1e-5, rtol=1e-5)
    assert out["stale_warning"] and good in out["stale_warning"][0]
    assert out["base_revision"] == good
    assert out["walked_revision"] == good and missing in out["walked_missing"]
