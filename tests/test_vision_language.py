"""Vision-language models: the text decoder is pruned, and every path that loads,
saves or describes the model uses the Auto class its config maps to
(``AutoModelForImageTextToText``); paths that cannot serve them refuse in one line."""

import pytest
import torch
from tiny_models import NUM_LAYERS, tiny_model
from transformers import AutoModelForImageTextToText

from shortgpt_hf import (
    PrunedForCausalLM,
    ShortGPTError,
    enable_prefill_skip,
    find_decoder_layers,
    heal,
    model_card,
    prune,
    save_pruned,
    save_recipe,
)

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))
REMOVED = [0, 3, NUM_LAYERS - 1]
EAGER = dict(attn_implementation="eager")


@pytest.fixture(scope="module", params=["llava", "qwen2_vl_deep_vision"])
def base_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "base"
    tiny_model(request.param).save_pretrained(path)
    return path


def test_recipe_and_prune_on_load_equal_in_memory_prune(base_dir, tmp_path, tensor_reads):  # noqa: F811
    model = AutoModelForImageTextToText.from_pretrained(base_dir, **EAGER).eval()
    prune(model, layers=REMOVED, verify=True)
    expected = model(input_ids=IDS).logits
    save_recipe(model, tmp_path / "recipe", verify=True)
    tensor_reads.clear()
    for loaded in (
        PrunedForCausalLM.from_pretrained(tmp_path / "recipe", **EAGER),
        PrunedForCausalLM.from_pretrained(base_dir, removed_layers=REMOVED, **EAGER),
    ):
        assert type(loaded) is type(model)
        assert len(find_decoder_layers(loaded).layers) == NUM_LAYERS - len(REMOVED)
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-6, rtol=1e-6)
    prefix = find_decoder_layers(model).path.removeprefix("model.")  # checkpoint keys drop the wrapper's "model."
    read_removed = [k for k in tensor_reads if any(f"{prefix}.{i}." in k for i in REMOVED)]
    assert tensor_reads and read_removed == []


def test_full_checkpoint_saves_verified_and_card_names_the_class(base_dir, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(base_dir, **EAGER).eval()
    prune(model, layers=REMOVED)
    out = save_pruned(model, tmp_path / "pruned")
    reloaded = AutoModelForImageTextToText.from_pretrained(out, **EAGER)
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    card = model_card(model, repo_id="me/tiny-vlm-pruned")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert 'AutoModelForImageTextToText.from_pretrained("me/tiny-vlm-pruned")' in card.text
    assert "AutoProcessor" in card.text and "AutoModelForCausalLM" not in card.text


def test_prefill_skip_and_healing_refuse_clearly():
    model = tiny_model("llava")
    with pytest.raises(ShortGPTError, match="text-only models; LLaVA .* is a vision-language model"):
        enable_prefill_skip(model, [1, 2])
    assert not hasattr(model.config, "shortgpt")
    prune(model, layers=REMOVED)
    with pytest.raises(ShortGPTError, match="healing supports text-only causal LMs"):
        heal(model, [torch.randint(3, 128, (1, 16))], steps=1)
