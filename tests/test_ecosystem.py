"""The ecosystem's own entry points on pruned models, each in a fresh process:
AutoModelForCausalLM and pipeline on a recipe, PEFT's own save_pretrained and
AutoPeftModelForCausalLM on a saved-pruned base and on a recipe base, and a
healing adapter made from a relative path reloading from another directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import removed_keys, run_python
from safetensors.torch import load_file
from tiny_models import NUM_LAYERS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, pipeline

from shortgpt_hf import PrunedForCausalLM, prune, save_pruned, save_recipe
from shortgpt_hf.recovery import heal

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(11))
TOKENS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(12))
REMOVED = [1, 4]
PROMPT = "t5 t9 t33 t70"


def recipe_with_base(tmp_path: Path) -> Path:
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    prune(model, layers=REMOVED)
    return save_recipe(model, tmp_path / "recipe", tiny_tokenizer())


def test_automodel_and_pipeline_load_a_recipe(tmp_path, tensor_reads):
    recipe = recipe_with_base(tmp_path)
    tensor_reads.clear()
    auto = AutoModelForCausalLM.from_pretrained(
        recipe, device_map="cpu", dtype=torch.float32, attn_implementation="eager"
    )
    assert tensor_reads and removed_keys(tensor_reads, REMOVED) == [], (
        "AutoModelForCausalLM must read only the kept layers too"
    )
    ours = PrunedForCausalLM.from_pretrained(recipe, device_map="cpu", dtype=torch.float32, attn_implementation="eager")
    assert type(auto) is type(ours) and auto.config.num_hidden_layers == NUM_LAYERS - len(REMOVED)
    assert auto.name_or_path == str(recipe), (
        "a recipe-loaded model names its recipe, so PEFT adapters name it as their base"
    )
    torch.testing.assert_close(auto(input_ids=IDS).logits, ours(input_ids=IDS).logits, atol=0, rtol=0)
    assert {"shortgpt", "layer-pruning", "pruned"} <= set(auto.model_tags)

    generator = pipeline(
        "text-generation", model=str(recipe), device_map="cpu", model_kwargs={"attn_implementation": "eager"}
    )
    assert type(generator.model) is type(ours) and generator.model.config.num_hidden_layers == NUM_LAYERS - len(REMOVED)
    generated = generator(PROMPT, max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt").input_ids
    expected = ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert list(generated) == expected[0].tolist() and len(generated) == ids.shape[1] + 6


@pytest.mark.slow  # a fresh interpreter
def test_automodel_loads_a_recipe_in_a_fresh_process(tmp_path):
    """In a fresh process, with nothing of ours imported but the package itself."""
    recipe = recipe_with_base(tmp_path)
    ours = PrunedForCausalLM.from_pretrained(recipe, device_map="cpu", dtype=torch.float32, attn_implementation="eager")
    code = f"""
import torch, shortgpt_hf
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(recipe)!r}, attn_implementation="eager")
print(type(m).__name__, m.config.num_hidden_layers,
      m(input_ids=torch.tensor({IDS.tolist()})).logits.flatten()[:20].tolist())
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    name, layers, logits = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (name, int(layers)) == (type(ours).__name__, NUM_LAYERS - len(REMOVED))
    assert torch.allclose(torch.tensor(eval(logits)), ours(input_ids=IDS).logits.flatten()[:20], atol=1e-6)


def test_recipes_written_before_the_marker_still_load(tmp_path):
    recipe = recipe_with_base(tmp_path)
    (recipe / "config.json").unlink()  # what save_recipe wrote before recipes carried config.json
    model = PrunedForCausalLM.from_pretrained(recipe, attn_implementation="eager")
    assert model.config.num_hidden_layers == NUM_LAYERS - len(REMOVED)


PEFT_RELOAD = f"""
import sys, torch
import shortgpt_hf  # only needed when the base is a recipe: it registers recipes with AutoModelForCausalLM
from peft import AutoPeftModelForCausalLM
m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
print(m.get_base_model().config.num_hidden_layers,
      m(input_ids=torch.tensor({IDS.tolist()})).logits.flatten()[:30].tolist())
"""


def reload_adapter(adapter: Path, cwd: Path | None = None) -> tuple[int, list[float]]:
    result = subprocess.run(
        [sys.executable, "-c", PEFT_RELOAD, str(adapter)], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    layers, logits = result.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(layers), eval(logits)


@pytest.mark.slow  # reloads the adapter in a fresh interpreter
def test_peft_save_pretrained_after_save_pruned(tmp_path):
    """prune in memory -> save_pruned -> heal -> PEFT's own save_pretrained -> AutoPeftModelForCausalLM."""
    model = tiny_model("llama")
    prune(model, layers=REMOVED)
    save_pruned(model, tmp_path / "pruned")
    assert model.name_or_path == str((tmp_path / "pruned").resolve())
    healed = heal(model, TOKENS, seq_len=32, steps=2, lr=1e-2, batch_size=4, progress=False)
    healed.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "pruned").resolve()
    )
    layers, logits = reload_adapter(tmp_path / "adapter")
    assert layers == NUM_LAYERS - len(REMOVED)
    assert torch.allclose(torch.tensor(logits), healed(input_ids=IDS).logits.flatten()[:30], atol=1e-5)


@pytest.mark.slow  # reloads the adapter in a fresh interpreter
def test_adapter_on_a_recipe_reloads_onto_the_recipe(tmp_path):
    recipe = recipe_with_base(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(recipe, attn_implementation="eager")
    healed = heal(model, TOKENS, seq_len=32, steps=2, lr=1e-2, batch_size=4, progress=False)
    healed.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        recipe
    )
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved), (
        "PEFT sees the recipe's vocabulary unchanged: no embeddings in the adapter"
    )
    layers, logits = reload_adapter(tmp_path / "adapter")
    assert layers == NUM_LAYERS - len(REMOVED)
    assert torch.allclose(torch.tensor(logits), healed(input_ids=IDS).logits.flatten()[:30], atol=1e-5)


@pytest.mark.slow  # the CLI, then a fresh interpreter elsewhere
def test_cli_heal_of_a_relative_path_reloads_from_anywhere(tmp_path):
    """`shortgpt heal smollm2-pruned --out adapter`, as the README writes it: the adapter
    stores an absolute path, so it reloads from another working directory."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    model = tiny_model("llama")
    prune(model, layers=REMOVED)
    save_pruned(model, work / "my-pruned", tiny_tokenizer())
    cli = [
        sys.executable,
        "-m",
        "shortgpt_hf.cli",
        "heal",
        "my-pruned",
        "--out",
        "adapter",
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
    ]
    result = subprocess.run(cli, capture_output=True, text=True, cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stored = json.loads((work / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert stored == str((work / "my-pruned").resolve())
    layers, _ = reload_adapter(work / "adapter", cwd=elsewhere)
    assert layers == NUM_LAYERS - len(REMOVED)


def test_recipe_loads_take_config_overrides_and_adapters(tmp_path):
    """Config arguments (output_attentions, use_cache) reach the base through both loaders, and
    transformers' own adapter loading (AutoModelForCausalLM on an adapter folder) puts the
    adapter on the recipe it names."""
    recipe = recipe_with_base(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(recipe, output_attentions=True, attn_implementation="eager")
    assert auto.config.output_attentions and len(auto(input_ids=IDS).attentions) == NUM_LAYERS - len(REMOVED)
    ours = PrunedForCausalLM.from_pretrained(recipe, use_cache=False, attn_implementation="eager")
    assert ours.config.use_cache is False

    healed = heal(ours, TOKENS, seq_len=32, steps=2, lr=1e-2, batch_size=4, progress=False)
    healed.save_pretrained(tmp_path / "adapter")
    with_adapter = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", attn_implementation="eager")
    assert with_adapter.config.num_hidden_layers == NUM_LAYERS - len(REMOVED)
    torch.testing.assert_close(with_adapter(input_ids=IDS).logits, healed(input_ids=IDS).logits, atol=1e-5, rtol=1e-4)


def test_a_recipe_saved_without_a_tokenizer_carries_its_bases(tmp_path):
    recipe_with_base(tmp_path)
    model = PrunedForCausalLM.from_pretrained(tmp_path / "recipe")
    save_recipe(model, tmp_path / "bare")
    assert (tmp_path / "bare" / "tokenizer.json").is_file(), "pipeline(model=recipe) needs the tokenizer in the recipe"
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["vocab_size"] == 128
