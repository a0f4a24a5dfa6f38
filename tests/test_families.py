"""Correct layer removal across 15 families (DESIGN.md §2), on tiny random models.

For each family we remove the first, a middle and the last layer and check
(a) an uncached forward equals the unpruned model with those layers made
identity, (b) cached greedy generation equals uncached generation, and (c) a
saved checkpoint reloads in a fresh process that never imports shortgpt_hf,
through plain AutoModelForCausalLM, with identical logits.
"""

import json

import pytest
import torch
from conftest import run_python
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, NUM_LAYERS, tiny_config, tiny_model

import shortgpt_hf.pruning
from shortgpt_hf import ShortGPTConfig, ShortGPTError, find_decoder_layers, prune, verify_pruned
from shortgpt_hf.layers import layers_as_identity

REMOVE = [0, 2, NUM_LAYERS - 1]
IDS = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_removal_matches_identity_and_cache_parity(family):
    model = tiny_model(family)
    with layers_as_identity(model, REMOVE):
        reference = model(input_ids=IDS, use_cache=False).logits
    untouched = model(input_ids=IDS, use_cache=False).logits
    assert not torch.allclose(reference, untouched, atol=1e-3), "identity reference must differ from the full model"

    prune(model, layers=REMOVE, verify=True)
    assert len(find_decoder_layers(model).layers) == NUM_LAYERS - len(REMOVE)
    assert model.config.get_text_config(decoder=True).num_hidden_layers == NUM_LAYERS - len(REMOVE)
    torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, reference, atol=1e-5, rtol=1e-5)

    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(IDS[:, :6], use_cache=True, **kwargs)
    uncached = model.generate(IDS[:, :6], use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory):
    """Prune and save every family, then reload ALL of them in one fresh process."""
    root = tmp_path_factory.mktemp("families")
    expected = {}
    for family in FAMILIES:
        model = tiny_model(family)
        prune(model, layers=REMOVE)
        model.save_pretrained(root / family)
        expected[family] = model(input_ids=IDS, use_cache=False).logits
    save_file({"ids": IDS}, root / "ids.safetensors")
    code = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
root = Path(sys.argv[1]); ids = load_file(root / "ids.safetensors")["ids"]; out = {}
for family in json.loads(sys.argv[2]):
    model = AutoModelForCausalLM.from_pretrained(root / family, dtype=torch.float32, attn_implementation="eager").eval()
    out[family] = model(input_ids=ids, use_cache=False).logits.contiguous()
assert "shortgpt_hf" not in sys.modules
save_file(out, root / "reloaded.safetensors")
"""
    result = run_python(code, str(root), json.dumps(list(FAMILIES)))
    assert result.returncode == 0, result.stderr[-3000:]
    return root, expected, load_file(root / "reloaded.safetensors")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_checkpoint_reloads_natively(saved_families, family):
    root, expected, reloaded = saved_families
    torch.testing.assert_close(reloaded[family], expected[family], atol=1e-5, rtol=1e-5)
    config = json.loads((root / family / "config.json").read_text())
    record = ShortGPTConfig.from_dict(config["shortgpt"])
    assert record.removed_layers == REMOVE and record.original_num_hidden_layers == NUM_LAYERS
    assert "trust_remote_code" not in json.dumps(config) and "auto_map" not in config


def test_per_layer_config_follows_kept_layers():
    gemma = tiny_model("gemma3_text")
    types = list(gemma.config.layer_types)
    prune(gemma, layers=REMOVE)
    assert gemma.config.layer_types == [t for i, t in enumerate(types) if i not in REMOVE]

    qwen2 = tiny_model("qwen2")  # layers >= max_window_layers (3) slide
    prune(qwen2, layers=REMOVE)
    assert qwen2.config.max_window_layers == 1  # only original layer 1 is left below 3

    moe = tiny_model("qwen2_moe")  # sparse iff (i+1) % 2 == 0 and i != 4: originals 1, 3, 5
    kinds = [type(layer.mlp).__name__ for layer in find_decoder_layers(moe).layers]
    prune(moe, layers=[0, 3])
    kept = [kinds[i] for i in range(NUM_LAYERS) if i not in (0, 3)]
    assert [type(layer.mlp).__name__ for layer in find_decoder_layers(moe).layers] == kept
    assert moe.config.decoder_sparse_step == 1 and moe.config.mlp_only_layers == [1, 2]


def test_pruning_twice_composes_in_original_indices():
    once, twice = tiny_model("gemma3_text"), tiny_model("gemma3_text")
    prune(once, layers=[1, 2, 4])
    prune(twice, layers=[2])
    prune(twice, layers=[1, 3], verify=True)  # current 1, 3 are original 1, 4
    assert ShortGPTConfig.from_model(twice).removed_layers == [1, 2, 4]
    torch.testing.assert_close(twice(input_ids=IDS).logits, once(input_ids=IDS).logits)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_naive_removal_is_caught(family):
    """Replacing the ModuleList alone (what most tools do) must fail verification."""
    model = tiny_model(family)
    with layers_as_identity(model, [0]):
        reference = model(input_ids=IDS[:, :12], use_cache=False).logits
    layers = find_decoder_layers(model).layers
    model.model.layers = torch.nn.ModuleList(list(layers)[1:])
    model.config.num_hidden_layers -= 1
    with pytest.raises(ShortGPTError, match="verification failed"):
        verify_pruned(model, reference)


def test_failed_verification_restores_the_model(monkeypatch):
    model = tiny_model("llama")
    before = model(input_ids=IDS).logits
    monkeypatch.setattr(shortgpt_hf.pruning, "_renumber", lambda layers: None)
    with pytest.raises(ShortGPTError, match="verification failed"):
        prune(model, layers=[0, 3], verify=True)
    assert len(find_decoder_layers(model).layers) == NUM_LAYERS
    assert model.config.num_hidden_layers == NUM_LAYERS and not hasattr(model.config, "shortgpt")
    torch.testing.assert_close(model(input_ids=IDS).logits, before)


def test_unsupported_configurations_are_refused():
    from transformers import AutoModelForCausalLM, BertConfig, BertModel

    config = tiny_config("gpt2")
    config.scale_attn_by_inverse_layer_idx = True
    gpt2 = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ShortGPTError, match="scale_attn_by_inverse_layer_idx"):
        prune(gpt2, layers=[1])
    assert len(gpt2.transformer.h) == NUM_LAYERS
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32))
    with pytest.raises(ShortGPTError, match="no decoder layer list"):
        prune(bert, layers=[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[0, 0]), "duplicate"),
        (dict(layers=[-1]), "out of range"),
        (dict(layers=[NUM_LAYERS]), "out of range"),
        (dict(layers=list(range(NUM_LAYERS))), "all"),
        (dict(layers=[]), "no layers"),
        (dict(layers=[1], n_layers=1), "exactly one"),
        (dict(n_layers=2), "need scores"),
    ],
)
def test_bad_prune_requests(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ShortGPTError, match=message):
        prune(model, **kwargs)
    assert len(find_decoder_layers(model).layers) == NUM_LAYERS
