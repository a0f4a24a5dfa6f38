"""Scoring and pruning a model dispatched by accelerate (here: CPU plus disk offload,
the placement a GPU box uses when a model does not fit; the hooks are the same)."""

import pytest
import torch
from tiny_models import NUM_LAYERS, tiny_model
from transformers import AutoModelForCausalLM

from shortgpt_hf import find_decoder_layers, prune, score_layers

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def dispatched(tmp_path):
    model = tiny_model("gemma3_text")
    model.save_pretrained(tmp_path / "base")
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    embed_bytes = model.model.embed_tokens.weight.numel() * 4
    budget = embed_bytes + 3 * layer_bytes  # room for about three layers: the rest goes to disk
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base",
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=str(tmp_path / "offload"),
        attn_implementation="eager",
    ).eval()
    assert "disk" in set(loaded.hf_device_map.values()), loaded.hf_device_map
    return model, loaded


def test_scores_on_dispatched_model_equal_plain(dispatched):
    plain, loaded = dispatched
    expected = score_layers(plain, IDS, seq_len=12, progress=False).scores
    assert score_layers(loaded, IDS, seq_len=12, progress=False).scores == pytest.approx(expected, abs=1e-6)


def test_prune_dispatched_model_renames_device_map(dispatched):
    plain, loaded = dispatched
    original_map = dict(loaded.hf_device_map)
    prune(plain, layers=[0, 4])
    prune(loaded, layers=[0, 4], verify=True)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, plain(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)
    layer_keys = [k for k in loaded.hf_device_map if k.startswith("model.layers.")]
    assert sorted(int(k.split(".")[2]) for k in layer_keys) == list(range(NUM_LAYERS - 2))
    for new, old in enumerate([1, 2, 3, 5]):
        assert loaded.hf_device_map[f"model.layers.{new}"] == original_map[f"model.layers.{old}"]
    assert len(find_decoder_layers(loaded).layers) == NUM_LAYERS - 2
