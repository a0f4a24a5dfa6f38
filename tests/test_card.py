"""Model cards: front matter, body, loading instructions per kind, no local paths,
and in-place updates of a card already on the Hub."""

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from shortgpt_hf import ShortGPTError, model_card, prune, score_layers
from shortgpt_hf.card import END, START, merge_into_existing

EVALS = [
    {"task": "perplexity", "dataset": "shakespeare-heldout", "metric": "perplexity", "dense": 51.76, "pruned": 150.5}
]
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def pruned_builtin(smollm2):
    model, tok = smollm2
    model.name_or_path = "smollm2-135m"  # as load_builtin records it
    prune(model, n_layers=8, scores=score_layers(model, tokenizer=tok, max_tokens=512, progress=False))
    return model


def test_full_model_card(pruned_builtin):
    card = ModelCard(str(model_card(pruned_builtin, EVALS, repo_id="me/smol-short")))
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.library_name == "transformers"
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-generation"
    assert {"shortgpt", "layer-pruning", "pruned"} <= set(data.tags)
    assert data.eval_results[0].metric_type == "perplexity" and data.eval_results[0].metric_value == 150.5
    removed = pruned_builtin.config.shortgpt["removed_layers"]
    assert f"Removed layers (original indices): `{removed}`" in card.text
    assert "| 30 | 22 |" in card.text and "134,515,008" in card.text and "106,194,240" in card.text
    assert card.text.count("| removed |") == 8 and "![bi per layer](layer_scores.png)" in card.text
    assert "| perplexity | shakespeare-heldout | perplexity | 51.76 | 150.5 |" in card.text
    assert (
        'AutoModelForCausalLM.from_pretrained("me/smol-short")' in card.text
        and "@inproceedings{men2025shortgpt" in card.text
    )


def test_recipe_and_adapter_cards(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    prune(model, layers=[0, 5])
    recipe = str(model_card(model, repo_id="me/tiny-recipe", kind="recipe"))
    assert 'PrunedForCausalLM.from_pretrained("me/tiny-recipe")' in recipe and "chosen by hand" in recipe
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = ModelCard(str(model_card(peft, repo_id="me/tiny-healed")))
    assert adapter.data.library_name == "peft" and "lora" in adapter.data.tags
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-healed")' in adapter.text
    assert "1. **lora**; adapter: LORA (PEFT); rank / alpha: 4 / 8; target modules: q_proj, v_proj" in adapter.text
    for text in (recipe, str(adapter)):
        assert str(tmp_path) not in text and "base_model:" not in text, "a local base must not leak into the card"


def test_update_in_place_keeps_user_text(pruned_builtin):
    first = str(model_card(pruned_builtin, repo_id="me/smol-short"))
    edited = first.replace(END, END + "\n\n## Notes from the author\nTested on my laptop.\n").replace(
        "license: apache-2.0", "license: apache-2.0\nlanguage: en"
    )
    second = merge_into_existing(model_card(pruned_builtin, EVALS, repo_id="me/smol-short"), edited)
    text = str(second)
    assert text.count(START) == 1 and text.count(END) == 1 and text.count("## Why these layers") == 1
    assert "Tested on my laptop." in text and "| perplexity | shakespeare-heldout |" in text
    assert second.data.language == "en" and second.data.eval_results[0].metric_value == 150.5


def test_bad_card_requests():
    with pytest.raises(ShortGPTError, match="not been pruned"):
        model_card(tiny_model("llama"))
    model = tiny_model("llama")
    prune(model, layers=[1])
    with pytest.raises(ShortGPTError, match="needs task, metric and pruned"):
        model_card(model, [{"task": "x"}])
    with pytest.raises(ShortGPTError, match="kind must be one of"):
        model_card(model, kind="zip")
