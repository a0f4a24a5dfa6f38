"""The family matrix: every family in the table removes layers exactly, or is refused clearly.

For each tiny random model we remove layers (the first, a middle and the last
unless the family's layout needs another choice) and check three things:
(a) an uncached forward, padded or not, equals the unpruned model with those
layers made identity; (b) cached greedy generation equals uncached
generation; (c) a saved checkpoint reloads through the Auto class its config
maps to, with identical logits, here and (slow tier) in a fresh process that
never imports shortgpt_hf. Refused configurations must fail before the model
changes.
"""

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import run_python
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES as TINY
from tiny_models import MODEL_TYPES, NUM_LAYERS, REMOVE, removal, tiny_auto, tiny_config, tiny_model
from transformers import AutoConfig

import shortgpt_hf.surgery
from shortgpt_hf import (
    PrunedForCausalLM,
    ShortGPTConfig,
    ShortGPTError,
    find_decoder_layers,
    prune,
    save_pruned,
    verify_pruned,
)
from shortgpt_hf.families import FAMILIES, VISION_LANGUAGE, Family
from shortgpt_hf.layers import layers_as_identity

REFUSED_ONLY = {"gemma3n_text"}  # in the table only to be refused (always has shared KV layers); tested below
IDS = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[0, :3] = 0  # row 0 is left-padded


def text_model_type(family):
    return tiny_config(family).get_text_config(decoder=True).model_type


@pytest.fixture(scope="module")
def pruned_models():
    """Each family pruned once (with verify=True), beside its identity references; shared by the tests below."""
    out = {}
    for family in TINY:
        model = tiny_model(family)
        with layers_as_identity(model, removal(family)):
            reference = model(input_ids=IDS, use_cache=False).logits
            padded = model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits
        untouched = model(input_ids=IDS, use_cache=False).logits
        before = {k: v for k, v in vars(model.config.get_text_config(decoder=True)).items() if not k.startswith("_")}
        prune(model, layers=removal(family), verify=True)
        out[family] = dict(model=model, reference=reference, padded=padded, untouched=untouched, before=before)
    return out


@pytest.mark.parametrize("family", list(TINY))
def test_removal_matches_identity_and_cache_parity(pruned_models, family):
    case = pruned_models[family]
    model = case["model"]
    assert not torch.allclose(case["reference"], case["untouched"], atol=1e-3), (
        "identity reference must differ from the full model"
    )
    kept = NUM_LAYERS - len(removal(family))
    assert len(find_decoder_layers(model).layers) == kept
    assert model.config.get_text_config(decoder=True).num_hidden_layers == kept
    torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, case["reference"], atol=1e-5, rtol=1e-5)
    padded = model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits
    real = MASK.bool()
    torch.testing.assert_close(padded[real], case["padded"][real], atol=1e-5, rtol=1e-5)

    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(IDS[:, :6], use_cache=True, **kwargs)
    uncached = model.generate(IDS[:, :6], use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", list(TINY))
def test_no_per_layer_config_is_left_stale(pruned_models, family):
    """Every config list that had one entry per layer now has one per kept layer (the table is complete)."""
    case = pruned_models[family]
    cfg = case["model"].config.get_text_config(decoder=True)
    kept = NUM_LAYERS - len(removal(family))
    for key, value in case["before"].items():
        if (
            isinstance(value, (list, tuple))
            and len(value) == NUM_LAYERS
            and key not in ("eos_token_id", "architectures")
        ):
            assert len(getattr(cfg, key)) == kept, f"{family}: config.{key} still describes the unpruned model"


@pytest.fixture(scope="module")
def saved_families(pruned_models, tmp_path_factory):
    """Every pruned family saved, beside its logits before saving."""
    root = tmp_path_factory.mktemp("families")
    expected = {}
    for family, case in pruned_models.items():
        case["model"].save_pretrained(root / family)
        expected[family] = case["model"](input_ids=IDS, use_cache=False).logits
    return root, expected


@pytest.mark.parametrize("family", list(TINY))
def test_saved_checkpoint_reloads_through_its_auto_class(saved_families, family):
    root, expected = saved_families
    config = AutoConfig.from_pretrained(root / family)
    model = tiny_auto(config).from_pretrained(root / family, dtype=torch.float32, attn_implementation="eager").eval()
    torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, expected[family], atol=1e-5, rtol=1e-5)
    config = json.loads((root / family / "config.json").read_text())
    record = ShortGPTConfig.from_dict(config["shortgpt"])
    assert record.removed_layers == removal(family) and record.original_num_hidden_layers == NUM_LAYERS
    assert "trust_remote_code" not in json.dumps(config) and "auto_map" not in config


@pytest.fixture(scope="module")
def reloaded_in_a_fresh_process(saved_families):
    """ALL the saved families reloaded in one fresh process that never imports shortgpt_hf."""
    root, _ = saved_families
    save_file({"ids": IDS}, root / "ids.safetensors")
    code = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
root = Path(sys.argv[1]); ids = load_file(root / "ids.safetensors")["ids"]; out = {}
for family in json.loads(sys.argv[2]):
    config = AutoConfig.from_pretrained(root / family)
    auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForImageTextToText
    model = auto.from_pretrained(root / family, dtype=torch.float32, attn_implementation="eager").eval()
    out[family] = model(input_ids=ids, use_cache=False).logits.contiguous()
assert "shortgpt_hf" not in sys.modules
save_file(out, root / "reloaded.safetensors")
"""
    result = run_python(code, str(root), json.dumps(list(TINY)))
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(root / "reloaded.safetensors")


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.parametrize("family", list(TINY))
def test_saved_checkpoint_reloads_natively(saved_families, reloaded_in_a_fresh_process, family):
    _, expected = saved_families
    torch.testing.assert_close(reloaded_in_a_fresh_process[family], expected[family], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    for family in TINY:
        tiny_model(family).save_pretrained(root / family)
    return root


@pytest.mark.parametrize("family", list(TINY))
def test_prune_on_load_equals_in_memory_prune(pruned_models, saved_bases, family):
    """A recipe's path: the base loaded without its removed layers (or whole, where the family needs it)."""
    loaded = PrunedForCausalLM.from_pretrained(
        saved_bases / family, removed_layers=removal(family), attn_implementation="eager"
    )
    model = pruned_models[family]["model"]
    assert type(loaded) is type(model)
    torch.testing.assert_close(
        loaded(input_ids=IDS, use_cache=False).logits, model(input_ids=IDS, use_cache=False).logits
    )


@pytest.mark.parametrize("removed", [[1], [5], [1, 3], [0, 1, 2, 4]])
def test_zamba2_shared_blocks_follow_any_removal(removed, tmp_path):
    """Every way of dropping hybrid layers (with their tied blocks and adapter slots) stays exact and savable."""
    model = tiny_model("zamba2")
    with layers_as_identity(model, removed):
        reference = model(input_ids=IDS, use_cache=False).logits
    prune(model, layers=removed, verify=True)
    torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, reference, atol=1e-5, rtol=1e-5)
    save_pruned(model, tmp_path / "out")  # reloads with AutoModelForCausalLM and compares logits


def test_every_family_in_the_table_is_in_the_matrix():
    tested = {text_model_type(f) for f in TINY} | {MODEL_TYPES.get(f, f) for f in TINY}
    assert set(FAMILIES) - REFUSED_ONLY <= tested
    assert set(VISION_LANGUAGE) <= tested


def test_readme_lists_the_table():
    """The README's family lists are the table's, so neither can drift."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("<!-- families:start -->")[1].split("<!-- families:end -->")[0]

    def listed(heading):
        return set(re.findall(rf"^\*\*{heading}[^*]*\*\*:? (.*)$", section, re.M)[0].rstrip(".").split(", "))

    assert listed("Supported") == {f.name for k, f in FAMILIES.items() if k not in REFUSED_ONLY}
    assert listed("Vision-language") == set(VISION_LANGUAGE.values())
    hybrids = re.search(r"^- Hybrids \(([^)]*)\)", section, re.M).group(1)
    assert set(hybrids.split(", ")) == {f.name for f in FAMILIES.values() if f.attention_layers}
    fields = {r.field for f in FAMILIES.values() for r in f.refusals} | {
        p.period for f in FAMILIES.values() for p in f.periodic if p.excluded is None
    }
    for field in fields:
        assert f"`{field}`" in section, field


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

    bamba = tiny_model("bamba")  # attention at 1 and 4
    prune(bamba, layers=[0, 2])
    assert bamba.config.attn_layer_indices == [0, 2]

    jamba = tiny_model("jamba")
    prune(jamba, layers=[0, 3])
    assert jamba.config.layers_block_type == ["attention", "mamba", "attention", "mamba"]
    assert (jamba.config.attn_layer_period, jamba.config.attn_layer_offset) == (2, 0)
    assert jamba.config.layers_num_experts == [4, 1, 1, 4]


def test_pruning_twice_composes_in_original_indices():
    once, twice = tiny_model("gemma3_text"), tiny_model("gemma3_text")
    prune(once, layers=[1, 2, 4])
    prune(twice, layers=[2])
    prune(twice, layers=[1, 3], verify=True)  # current 1, 3 are original 1, 4
    assert ShortGPTConfig.from_model(twice).removed_layers == [1, 2, 4]
    torch.testing.assert_close(twice(input_ids=IDS).logits, once(input_ids=IDS).logits)


def test_vision_tower_with_as_many_blocks_is_not_mistaken_for_the_decoder():
    model = tiny_model("qwen2_vl_deep_vision")
    assert len(model.model.visual.blocks) == NUM_LAYERS
    assert find_decoder_layers(model).path == "model.language_model.layers"
    prune(model, layers=[1])
    assert len(model.model.visual.blocks) == NUM_LAYERS


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_language_save_verifies_with_its_auto_class(family, tmp_path):
    model = tiny_model(family)
    prune(model, layers=REMOVE)
    out = save_pruned(model, tmp_path / "pruned")  # verify=True reloads with AutoModelForImageTextToText
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == NUM_LAYERS - len(REMOVE)


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


def assert_untouched(model, before):
    cfg = model.config.get_text_config(decoder=True)
    assert len(find_decoder_layers(model).layers) == NUM_LAYERS and cfg.num_hidden_layers == NUM_LAYERS
    assert not hasattr(model.config, "shortgpt")
    torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, before)
    cached = model.generate(IDS[:, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(
        cached, model.generate(IDS[:, :6], max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    )


def test_failed_verification_restores_the_model(monkeypatch):
    model = tiny_model("llama")
    before = model(input_ids=IDS, use_cache=False).logits
    monkeypatch.setattr(shortgpt_hf.surgery, "_renumber", lambda layers: None)  # stale cache slots
    with pytest.raises(ShortGPTError, match=r"Llama \(LlamaForCausalLM\): .*cached decoding.* failed"):
        prune(model, layers=[0, 3], verify=True)
    monkeypatch.undo()
    assert_untouched(model, before)


@pytest.mark.parametrize("family", ["zamba2", "jamba", "qwen2_vl"])
@pytest.mark.parametrize("stage", ["removing layers", "verification"])
@pytest.mark.parametrize("error", [AttributeError("no attribute 'update'"), KeyboardInterrupt()])
def test_any_failure_restores_the_model_and_names_the_family(monkeypatch, tmp_path, family, stage, error):
    """An unexpected exception in the middle of the surgery or after it (Zamba2's shared blocks are then
    already rebuilt), or Ctrl-C, leaves the model exactly as it was, still savable."""
    model = tiny_model(family)
    before = model(input_ids=IDS, use_cache=False).logits

    def half_done(cfg, fam, kept):  # the config is half rewritten when it breaks
        cfg.num_hidden_layers = len(kept)
        raise error

    def failing_check(model, reference):
        raise error

    if stage == "removing layers":
        monkeypatch.setattr(shortgpt_hf.surgery, "fix_config", half_done)
    else:
        monkeypatch.setattr(shortgpt_hf.pruning, "verify_pruned", failing_check)
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else ShortGPTError
    with pytest.raises(expected) as info:
        prune(model, layers=removal(family), verify=True)
    if expected is ShortGPTError:
        message = str(info.value)
        assert "\n" not in message and f"{stage} failed" in message and type(error).__name__ in message
        assert (
            VISION_LANGUAGE.get(MODEL_TYPES.get(family, family)) or FAMILIES[text_model_type(family)].name
        ) in message
    monkeypatch.undo()
    assert_untouched(model, before)
    model.save_pretrained(tmp_path / "restored")  # weight ties and tables are consistent again
    prune(model, layers=removal(family), verify=True)  # and it still prunes afterwards


def test_refused_periodic_layout_names_the_field_and_touches_nothing():
    model = tiny_model("jamba")
    before = model(input_ids=IDS, use_cache=False).logits
    with pytest.raises(ShortGPTError, match=r"expert_layer_period/expert_layer_offset") as info:
        prune(model, layers=REMOVE)  # MoE layers 1, 3 would become 0, 1
    assert "\n" not in str(info.value)
    assert_untouched(model, before)


def meta_model(family, **overrides):
    """Refusals happen before any computation, so a model on the meta device is enough."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: meta_model("gpt2", scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (lambda: meta_model("deepseek_v2", moe_layer_freq=2), "moe_layer_freq"),
        (lambda: gemma3n(), "num_kv_shared_layers"),
    ],
)
def test_unsupported_configurations_are_refused(build, field):
    model = build()
    with pytest.raises(ShortGPTError, match=field):
        prune(model, layers=[1])
    assert len(find_decoder_layers(model).layers) == NUM_LAYERS


def gemma3n():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3n_text",
        vocab_size=128,
        vocab_size_per_layer_input=128,
        hidden_size=32,
        hidden_size_per_layer_input=8,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_hidden_layers=NUM_LAYERS,
        num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 3,
        activation_sparsity_pattern=[0.0] * NUM_LAYERS,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_non_causal_models_are_refused():
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)
    )
    with pytest.raises(ShortGPTError, match="no decoder layer list"):
        prune(bert, layers=[0])


@pytest.mark.parametrize("family", ["cohere2", "qwen2_moe"])
def test_unknown_family_falls_back_with_a_warning(monkeypatch, caplog, tmp_path, family):
    """Without its entry, a family is pruned by the rules the table knows by field name (sliced
    layer_types; Qwen-MoE's sparse step, known from Qwen3-MoE), with a warning, and still reloads exactly."""
    model_type = text_model_type(family)
    monkeypatch.setattr(FAMILIES, "_entries", {k: v for k, v in FAMILIES.items() if k != model_type})
    monkeypatch.setattr("shortgpt_hf.families._warned", set())
    model = tiny_model(family)
    with layers_as_identity(model, removal(family)):
        reference = model(input_ids=IDS, use_cache=False).logits
    with caplog.at_level(logging.WARNING, logger="shortgpt_hf"):
        prune(model, layers=removal(family), verify=True)
    assert f"no entry for model_type '{model_type}'" in caplog.text
    torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, reference, atol=1e-5, rtol=1e-5)
    save_pruned(model, tmp_path / "out")


@pytest.mark.parametrize(
    "family, entry", [("qwen2_moe", Family("Qwen2-MoE", per_layer=("layer_types",))), ("jamba", Family("Jamba"))]
)
def test_stale_construction_time_config_is_caught(monkeypatch, family, entry):
    """Without its layout rules, a family that picks layer kinds at construction (dense or MoE, attention
    or Mamba) may still run in memory, but its config would rebuild other layers: verification says so."""
    monkeypatch.setattr(FAMILIES, "_entries", {**FAMILIES, text_model_type(family): entry})
    model = tiny_model(family)
    with pytest.raises(ShortGPTError, match="config describes different layers than it has"):
        prune(model, layers=removal(family), verify=True)
    assert len(find_decoder_layers(model).layers) == NUM_LAYERS


def test_saving_failure_leaves_the_model_and_no_folder(monkeypatch, tmp_path):
    model = tiny_model("zamba2")
    prune(model, layers=removal("zamba2"))
    before = model(input_ids=IDS, use_cache=False).logits

    def broken_save(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", broken_save)
    with pytest.raises(ShortGPTError) as info:
        save_pruned(model, tmp_path / "out")
    assert str(info.value) == f"could not write {tmp_path / 'out'}: no space left on device; nothing was written"
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, before)


def test_restored_after_puts_a_hybrid_back(tmp_path):
    from shortgpt_hf.pruning import restored_after

    model = tiny_model("zamba2")
    before = model(input_ids=IDS, use_cache=False).logits
    blocks = [p for n, p in model.named_parameters() if "shared_transformer" in n]
    with restored_after(model):
        prune(model, layers=[1])
        model.train()
    assert model.training and all(m.training for m in model.modules())  # the user's mode change survives
    model.eval()
    assert_untouched(model, before)
    after = [p for n, p in model.named_parameters() if "shared_transformer" in n]
    # the same tensors, tied as before
    assert len(after) == len(blocks) and all(a is b for a, b in zip(after, blocks, strict=True))
    model.save_pretrained(tmp_path / "dense")


def test_rebuilding_families_refuse_a_dispatched_model(tmp_path):
    from accelerate import dispatch_model

    model = dispatch_model(tiny_model("zamba2"), device_map={"": "cpu"})
    with pytest.raises(ShortGPTError, match="rebuilds modules .* device_map"):
        prune(model, layers=[1])
    assert len(find_decoder_layers(model).layers) == NUM_LAYERS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[0, 0]), "duplicate"),
        (dict(layers=[-1]), "out of range"),
        (dict(layers=[NUM_LAYERS]), "out of range"),
        (dict(layers=list(range(NUM_LAYERS))), "all"),
        (dict(layers=[]), "no layers"),
        (dict(layers=[1], n_layers=1), "exactly one"),
        (dict(n_layers=2), "no tokenizer given"),  # it scores itself, on text this tiny model cannot cut
    ],
)
def test_bad_prune_requests(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ShortGPTError, match=message):
        prune(model, **kwargs)
    assert len(find_decoder_layers(model).layers) == NUM_LAYERS
