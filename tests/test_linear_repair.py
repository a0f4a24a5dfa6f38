"""Training-free linear repair on tiny models: the fold is exact, equals the map applied by a hook,
reloads with plain transformers, is undone with the removal, and refuses bad input in one line."""

import contextlib
import json
import logging

import pytest
import torch
from tiny_models import FAMILIES, tiny_auto, tiny_config, tiny_model
from transformers import LlamaForCausalLM

from shortgpt_hf import ShortGPTConfig, ShortGPTError, enable_prefill_skip, prune, recover, save_pruned, score_layers
from shortgpt_hf.families import family_of
from shortgpt_hf.layers import find_decoder_layers, layers_as_identity
from shortgpt_hf.pruning import restored_after
from shortgpt_hf.recovery import linear_maps
from shortgpt_hf.recovery.linear import LinearRecovery, fold_rule, maps_from_record, repair_aware_order
from shortgpt_hf.scoring import in_memory_driver

TOKENS = torch.randint(
    3, 128, (16, 24), generator=torch.Generator().manual_seed(5)
)  # 384 calibration tokens, hidden size 32
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
FOLDABLE = [f for f in FAMILIES if family_of(tiny_config(f).get_text_config(decoder=True)).fold is not None]
REMOVE = [0, 2, 3, 5]  # a gap at the embeddings, a two-layer gap and a gap that ends at the last layer


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def repaired(family, removed=REMOVE, **options):
    model = tiny_model(family)
    prune(
        model, layers=removed, recovery="linear", recovery_data=TOKENS, recovery_options=dict(progress=False, **options)
    )
    return model


@contextlib.contextmanager
def maps_applied_by_hooks(dense, record, maps):
    """The unpruned model with the removed layers as identity and each map applied to its kept layer's output."""
    fold = fold_rule(dense)
    layers = find_decoder_layers(dense).layers
    handles = []
    for m in maps_from_record(record, maps):
        if m.map is None:
            continue
        module = dense.get_input_embeddings() if m.after is None else layers[m.after].get_submodule(fold.output)
        handles.append(
            module.register_forward_hook(lambda mod, args, out, t=m.map: out * t if t.dim() == 1 else out @ t)
        )
    try:
        with layers_as_identity(dense, record.removed_layers):
            yield dense
    finally:
        for h in handles:
            h.remove()


def exactly_linear_llama(removed_layer: int) -> LlamaForCausalLM:
    """A tiny Llama whose layer ``removed_layer`` adds an exact linear function of the state it repairs.

    Its MLP is made linear (identity activation, constant gate, no norm before
    it) and reads only the second half of the channels, its attention adds
    nothing. For ``removed_layer=0`` that state is the embeddings; for 1,
    layer 0 writes its MLP output to the second half of the channels only and
    everything else to the first, so the gap's output is ``h_mid + M (I + A)``.
    """
    config = tiny_config("llama")
    config.mlp_bias, config.hidden_act = True, "linear"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    half = config.hidden_size // 2
    layers = model.model.layers
    with torch.no_grad():
        gap = layers[removed_layer]
        gap.self_attn.o_proj.weight.zero_()
        gap.post_attention_layernorm = torch.nn.Identity()
        gap.mlp.gate_proj.weight.zero_()
        gap.mlp.gate_proj.bias.fill_(1.0)
        gap.mlp.up_proj.weight.normal_(0, 0.5)  # large enough that removing the layer shows in the logits
        gap.mlp.down_proj.weight.normal_(0, 0.5)
        gap.mlp.up_proj.bias.zero_()
        gap.mlp.down_proj.bias.zero_()
        gap.mlp.up_proj.weight[:, :half] = 0
        if removed_layer == 1:
            model.model.embed_tokens.weight[:, half:] = 0
            layers[0].self_attn.o_proj.weight[half:] = 0
            layers[0].mlp.down_proj.weight[:half] = 0
            layers[0].mlp.down_proj.bias[:half] = 0
    return model


@pytest.mark.parametrize("removed, into", [(1, "layer 0"), (0, "input embeddings")])
def test_an_exactly_linear_gap_is_repaired_exactly(removed, into):
    model = exactly_linear_llama(removed)
    dense = logits(model)
    prune(model, layers=[removed])
    assert (logits(model) - dense).abs().max() > 1e-2, (
        "removing the layer must change the model (100x the tolerance below)"
    )
    model = exactly_linear_llama(removed)
    # Layer 0's update lives in half the channels, so MᵀM is singular there: a vanishing ridge picks the exact map.
    prune(
        model,
        layers=[removed],
        recovery="linear",
        recovery_data=TOKENS,
        recovery_options=dict(ridge=1e-9, progress=False),
    )
    torch.testing.assert_close(logits(model), dense, atol=1e-4, rtol=0)
    gap = ShortGPTConfig.from_model(model).recovery[0]["gaps"][0]
    assert gap["folded_into"] == into and gap["relative_error_repaired"] < 1e-9 < gap["relative_error_plain"]


@pytest.mark.parametrize("family", FOLDABLE)
def test_folded_maps_equal_hooked_maps_and_reload_natively(family, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="shortgpt_hf"):
        model = repaired(family)
    record = ShortGPTConfig.from_model(model)
    [step] = record.recovery
    assert (
        step["method"] == "linear"
        and step["tokens"] == TOKENS.numel()
        and [g["removed"] for g in step["gaps"]] == [[0], [2, 3], [5]]
    )
    repaired_gaps = [g for g in step["gaps"] if g["map"] is not None]
    assert all(g["relative_error_repaired"] <= g["relative_error_plain"] for g in repaired_gaps)
    tied = step["gaps"][0]["map"] is None
    assert tied == ("left unrepaired" in caplog.text), "a gap at layer 0 is skipped exactly when it is announced"
    dense = tiny_model(family)
    with maps_applied_by_hooks(dense, record, linear_maps(model)) as hooked:
        expected = logits(hooked)
    actual = logits(model)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    plain = tiny_model(family)
    with layers_as_identity(plain, REMOVE):
        assert (logits(plain) - actual).abs().max() > 1e-3, "the maps must change the pruned model"
    save_pruned(model, tmp_path / "out")  # reloads with the plain Auto class and compares logits itself
    reloaded = tiny_auto(model.config).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded), actual)


def test_gemma_maps_are_diagonal_in_the_norm_and_moe_maps_reach_every_expert():
    gemma = repaired("gemma3_text", removed=[2, 3])
    [gap] = ShortGPTConfig.from_model(gemma).recovery[0]["gaps"]
    assert gap["map"] == "diagonal" and "norm" in ShortGPTConfig.from_model(gemma).recovery[0]["map"]
    assert next(iter(linear_maps(gemma).values())).dim() == 1
    moe, dense = repaired("qwen2_moe", removed=[2, 3]), tiny_model("qwen2_moe")
    mlp, before = find_decoder_layers(moe).layers[1].mlp, find_decoder_layers(dense).layers[1].mlp
    t = next(iter(linear_maps(moe).values())).double()
    for name in ("experts.down_proj", "shared_expert.down_proj.weight"):
        new, old = mlp.get_parameter(name).double(), before.get_parameter(name).double()
        torch.testing.assert_close(new, t.T @ old, atol=1e-5, rtol=1e-5)


def test_the_removal_and_its_folds_are_undone_together():
    model = tiny_model("llama")
    params = {n: p for n, p in model.named_parameters()}
    before = logits(model)
    with restored_after(model):
        prune(model, layers=REMOVE, recovery="linear", recovery_data=TOKENS, recovery_options=dict(progress=False))
        assert len(find_decoder_layers(model).layers) == 2
    assert {n: p for n, p in model.named_parameters()} == params
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def unchanged(model, params, message, **kwargs):
    with pytest.raises(ShortGPTError, match=message) as err:
        prune(model, **{"layers": [2, 3], "recovery": "linear", "recovery_data": TOKENS, **kwargs})
    assert "\n" not in str(err.value)
    assert [id(p) for p in model.parameters()] == params and len(find_decoder_layers(model).layers) == 6
    assert ShortGPTConfig.from_model(model) is None


def test_bad_input_is_refused_in_one_line_and_the_model_is_untouched():
    model = tiny_model("llama")
    params = [id(p) for p in model.parameters()]
    unchanged(
        model,
        params,
        "16 calibration tokens cannot determine a 32x32 map .* ridge",
        recovery_data=TOKENS[:1, :16],
        recovery_options=dict(seq_len=16, progress=False),
    )
    unchanged(model, params, "ridge must be a non-negative number", recovery_options=dict(ridge=-1.0))
    unchanged(
        model,
        params,
        "recovery method 'linear': got an unexpected keyword argument 'rigde'",
        recovery_options=dict(rigde=1e-3),
    )
    with torch.no_grad():
        find_decoder_layers(model).layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    unchanged(model, params, "NaN or Inf in the activations of Llama", recovery_options=dict(progress=False))

    gpt2 = tiny_model("gpt2")
    with pytest.raises(
        ShortGPTError, match=r"linear repair does not know where to fold a map in GPT-2 \(GPT2LMHeadModel\)"
    ):
        prune(gpt2, layers=[2], recovery="linear", recovery_data=TOKENS)
    assert ShortGPTConfig.from_model(gpt2) is None

    skipping = enable_prefill_skip(tiny_model("llama"), [2])
    with pytest.raises(ShortGPTError, match="skips layers during prefill"):
        prune(skipping, layers=[2], recovery="linear", recovery_data=TOKENS)

    pruned = prune(tiny_model("llama"), layers=[2])
    with pytest.raises(
        ShortGPTError, match=r"fitted on the layers being removed.*prune\(model, \.\.\., recovery='linear'\)"
    ):
        recover(pruned, "linear", TOKENS)


def test_a_ridge_term_makes_too_few_tokens_usable_and_is_recorded():
    model = repaired("llama", removed=[2], ridge=1e-2, seq_len=16, max_tokens=16)
    step = ShortGPTConfig.from_model(model).recovery[0]
    assert step["ridge"] == 1e-2 and step["tokens"] == 16


def test_pruning_a_repaired_model_again_keeps_its_history():
    model = repaired("llama", removed=[2])
    prune(
        model, layers=[3], recovery="linear", recovery_data=TOKENS, recovery_options=dict(progress=False)
    )  # original layer 4
    record = ShortGPTConfig.from_model(model)
    assert record.removed_layers == [2, 4] and [[g["removed"] for g in s["gaps"]] for s in record.recovery] == [
        [[2]],
        [[4]],
    ]
    assert sorted(linear_maps(model)) == ["recovery.0.gap.2", "recovery.1.gap.4"]


def fitted_cost(model, layers):
    repair = LinearRecovery().fit(in_memory_driver(model, TOKENS, None, 256, None), sorted(layers), progress=False)
    return sum(m.residual for m in repair.maps)


def test_repair_aware_selection_is_greedy_on_the_fitted_error():
    model = tiny_model("llama")
    order, added = repair_aware_order(in_memory_driver(model, TOKENS, None, 256, None), 3, progress=False)
    for k in (1, 2, 3):  # the running cost is exactly the error left by the maps fitted for that removal
        assert sum(added[i] for i in order[:k]) == pytest.approx(fitted_cost(model, order[:k]), rel=1e-6)
    second = {j: fitted_cost(model, [order[0], j]) for j in range(6) if j != order[0]}
    assert order[1] == min(second, key=second.get), "step two must pick the cheapest pair containing the first choice"
    scores = score_layers(model, TOKENS, "linear_residual", max_layers=3, progress=False)
    assert scores.order == order and scores.lowest(2) == sorted(order[:2])
    with pytest.raises(ShortGPTError, match="chose only 3 layers; re-score asking for 4 or more"):
        scores.lowest(4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
def test_a_recipe_carries_its_maps_and_never_reads_removed_layers(family, tmp_path, tensor_reads):
    from conftest import removed_keys, stray_weight_files

    from shortgpt_hf import PrunedForCausalLM, save_recipe
    from shortgpt_hf.recovery.linear import LEGACY_MAPS_FILE, MAPS_FILE

    tiny_model(family).save_pretrained(tmp_path / "base")
    model = tiny_auto(tiny_config(family)).from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    prune(model, layers=REMOVE, recovery="linear", recovery_data=TOKENS, recovery_options=dict(progress=False))
    save_recipe(model, tmp_path / "recipe", verify=True)
    assert (tmp_path / "recipe" / MAPS_FILE).is_file()
    tensor_reads.clear()
    loaded = PrunedForCausalLM.from_pretrained(tmp_path / "recipe", attn_implementation="eager")
    assert tensor_reads and removed_keys(tensor_reads, REMOVE) == []
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    assert ShortGPTConfig.from_model(loaded).recovery == ShortGPTConfig.from_model(model).recovery

    # A native checkpoint keeps the maps in a subfolder, out of the weights' namespace (vLLM loads every top-level
    # *.safetensors as weights), so a recipe can still be written from a reload.
    save_pruned(loaded, tmp_path / "native")
    assert (tmp_path / "native" / MAPS_FILE).is_file() and stray_weight_files(tmp_path / "native") == []
    again = PrunedForCausalLM.from_pretrained(tmp_path / "native", attn_implementation="eager")
    save_recipe(again, tmp_path / "recipe2")
    torch.testing.assert_close(
        logits(PrunedForCausalLM.from_pretrained(tmp_path / "recipe2", attn_implementation="eager")),
        logits(model),
        atol=0,
        rtol=0,
    )

    # A recipe written before the maps moved keeps them at the top of the folder, and still loads.
    (tmp_path / "recipe" / MAPS_FILE).rename(tmp_path / "recipe" / LEGACY_MAPS_FILE)
    legacy = PrunedForCausalLM.from_pretrained(tmp_path / "recipe", attn_implementation="eager")
    torch.testing.assert_close(logits(legacy), logits(model), atol=0, rtol=0)
    (tmp_path / "recipe" / LEGACY_MAPS_FILE).unlink()
    with pytest.raises(ShortGPTError, match=f"records a linear repair but has no {MAPS_FILE}"):
        PrunedForCausalLM.from_pretrained(tmp_path / "recipe")
    plain = tiny_auto(tiny_config(family)).from_pretrained(tmp_path / "native").eval()
    with pytest.raises(ShortGPTError, match="maps .* not in memory"):
        save_recipe(plain, tmp_path / "recipe3")


def test_the_card_shows_the_repair_and_its_effect():
    from shortgpt_hf import model_card

    model = repaired("llama", eval_data=TOKENS[:4], eval_tokens=96, seq_len=24)
    step = ShortGPTConfig.from_model(model).recovery[0]
    text = str(model_card(model, repo_id="me/tiny-repaired"))
    assert (
        "1. **linear**" in text
        and f"perplexity_before: {step['perplexity_before']}" in text
        and f"perplexity_after: {step['perplexity_after']}" in text
    )
    assert "| 2, 3 | full | layer 1 |" in text and "| 0 | full | input embeddings |" in text
    assert "'key'" not in text and "gaps:" not in text


def test_linear_repair_of_real_smollm2_at_25_percent(smollm2):
    """Calibration on the packaged calibration plays, evaluation on held-out plays: the maps must
    cut held-out perplexity to at most 0.75x plain removal's (measured: about 0.57x with 8,192
    calibration tokens), and must not cost multiple-choice accuracy beyond two standard errors."""
    import math

    from shortgpt_hf import multiple_choice, perplexity
    from shortgpt_hf.texts import heldout_texts

    model, tok = smollm2
    held_out = heldout_texts()
    scores = score_layers(model, tokenizer=tok, max_tokens=4096, progress=False)

    def measure(**recovery):
        with restored_after(model):
            prune(model, ratio=0.25, scores=scores, tokenizer=tok, **recovery)
            mc = multiple_choice(model, tok, "general_knowledge")
            return (
                perplexity(model, tok, held_out, seq_len=256, max_tokens=4096),
                mc["acc"],
                mc["num_questions"],
                ShortGPTConfig.from_model(model),
            )

    plain_ppl, plain_acc, n, record = measure()
    ppl, acc, _, repaired_record = measure(recovery="linear", recovery_options=dict(max_tokens=8192, progress=False))
    print(f"plain {plain_ppl:.1f} / acc {plain_acc:.3f}; linear {ppl:.1f} / acc {acc:.3f}")
    assert record.removed_layers == repaired_record.removed_layers and len(record.removed_layers) == 8
    assert ppl <= 0.75 * plain_ppl
    noise = math.sqrt((plain_acc * (1 - plain_acc) + acc * (1 - acc)) / n)
    assert acc >= plain_acc - 2 * noise


def test_cli_prunes_with_linear_repair_and_eval_compares_it_with_plain_removal_and_lora(
    smollm2_path, tmp_path, capsys, monkeypatch
):
    from conftest import assert_one_line_error, run_cli

    from shortgpt_hf import heal, save_healed

    common = ["--layers", "13,14,25"]  # BI's lowest three: no scoring pass needed
    args = (*common, "--no-measure")  # plain removal is measured by the eval below
    code, out, err = run_cli(capsys, monkeypatch, "prune", smollm2_path, *args, "--out", tmp_path / "plain")
    assert code == 0, err
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "prune",
        smollm2_path,
        *common,
        "--recovery",
        "linear",
        "--recovery-tokens",
        "4096",
        "--out",
        tmp_path / "linear",
    )
    assert code == 0, err
    assert "linear repair on 4,096 tokens" in out and "-> layer" in out and "(plain removal) ->" in out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    native = AutoModelForCausalLM.from_pretrained(tmp_path / "linear")  # plain transformers, nothing of ours
    assert native.config.shortgpt["recovery"][0]["method"] == "linear" and native.config.num_hidden_layers == 27
    healed = heal(
        native,
        TOKENS,
        tokenizer=AutoTokenizer.from_pretrained(tmp_path / "linear"),
        steps=2,
        seq_len=24,
        progress=False,
    )
    save_healed(healed, tmp_path / "linear+lora", AutoTokenizer.from_pretrained(tmp_path / "linear"))

    models = [tmp_path / "plain", tmp_path / "linear", tmp_path / "linear+lora"]
    code, out, err = run_cli(
        capsys, monkeypatch, "eval", *models, "--tasks", "ppl", "--max-tokens", "512", "--json", tmp_path / "cmp.json"
    )
    assert code == 0, err
    reports = json.loads((tmp_path / "cmp.json").read_text())
    ppl = [r["results"][0]["value"] for r in reports]
    assert [r["model"] for r in reports] == [str(m) for m in models] and ppl[1] < ppl[0] and ppl[2] != ppl[1]

    code, _, err = run_cli(
        capsys, monkeypatch, "prune", "gpt2-tiny-does-not-matter", "--recovery", "lora", "--out", tmp_path / "x"
    )
    assert code == 2 and not (tmp_path / "x").exists()
    assert_one_line_error(
        err, "--recovery must be none or one of linear, cosine, got 'lora' (healing that trains: shortgpt heal)"
    )
    code, _, err = run_cli(capsys, monkeypatch, "eval", tmp_path / "plain", tmp_path / "linear", "--with-base")
    assert code == 2
    assert_one_line_error(err, "--with-base compares one model with its base")


def test_repair_on_a_dispatched_model_matches_one_device_and_refuses_offloaded_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")

    def placement(on_disk: int) -> dict:
        layers = {f"model.layers.{i}": ("disk" if i == on_disk else "cpu") for i in range(6)}
        return {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}

    # Layer 3 is offloaded to disk: its activations are read while fitting, and it is removed, so nothing is folded
    # there.
    dispatched = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=placement(3), offload_folder=str(tmp_path / "offload3"), **kwargs
    ).eval()
    assert "disk" in dispatched.hf_device_map.values()
    prune(dispatched, layers=REMOVE, recovery="linear", recovery_data=TOKENS, recovery_options=dict(progress=False))
    torch.testing.assert_close(logits(dispatched), logits(repaired("llama")))

    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=placement(1), offload_folder=str(tmp_path / "offload1"), **kwargs
    ).eval()
    params = [id(p) for p in offloaded.parameters()]
    with pytest.raises(ShortGPTError, match="cannot fold a map into .* offloaded or quantized"):
        prune(offloaded, layers=[2, 3], recovery="linear", recovery_data=TOKENS, recovery_options=dict(progress=False))
    assert [id(p) for p in offloaded.parameters()] == params and len(find_decoder_layers(offloaded).layers) == 6


def test_a_recipe_is_refused_for_trained_weights_it_could_not_rebuild(tmp_path):
    from shortgpt_hf import save_recipe

    model = repaired("llama", removed=[2])
    steps = [*model.config.shortgpt["recovery"], {"method": "lora", "steps": 3}]
    model.config.shortgpt = {
        **model.config.shortgpt,
        "recovery": steps,
        "base_model_name_or_path": str(tmp_path / "base"),
    }
    with pytest.raises(ShortGPTError, match="recovered with lora, which a recipe cannot rebuild"):
        save_recipe(model, tmp_path / "recipe")
    assert not (tmp_path / "recipe").exists()


def test_shrinkage_pulls_the_map_toward_plain_removal():
    """solve(shrinkage=s) is argmin ||M T - B||² + s·mean(diag MᵀM)·||T - I||²: 0 is least squares,
    a large s is plain removal (T = I), and a diagonal map shrinks the same way."""
    from shortgpt_hf.recovery.linear import NormalEquations

    gen = torch.Generator().manual_seed(0)
    m, b = torch.randn(200, 6, generator=gen), torch.randn(200, 6, generator=gen)
    for diagonal in (False, True):
        eq = NormalEquations(diagonal)
        eq.add(m, b, b)
        least_squares = eq.solve(0.0, "test")
        assert torch.allclose(eq.solve(0.0, "test", 0.0), least_squares)
        s = 0.3 * float(eq.mm.mean() if diagonal else eq.mm.diagonal().mean())
        if diagonal:
            expected = ((m * b).sum(0).double() + s) / ((m * m).sum(0).double() + s)
        else:
            mm, mb = m.T.double() @ m.double(), m.T.double() @ b.double()
            expected = torch.linalg.solve(
                mm + s * torch.eye(6, dtype=torch.float64), mb + s * torch.eye(6, dtype=torch.float64)
            )
        torch.testing.assert_close(eq.solve(0.0, "test", 0.3), expected)
        identity = torch.ones(6, dtype=torch.float64) if diagonal else torch.eye(6, dtype=torch.float64)
        torch.testing.assert_close(eq.solve(0.0, "test", 1e9), identity, atol=1e-6, rtol=0)


def test_automatic_shrinkage_is_chosen_on_a_held_out_slice():
    """shrinkage="auto" holds every fifth batch out, picks the candidate whose map (fitted on the rest)
    leaves the least error there, records it per gap, and refits on all the calibration."""
    from shortgpt_hf.recovery.linear import HELD_EVERY, SHRINKAGES, NormalEquations, gaps_of, gather

    model = tiny_model("llama")
    tokens = torch.randint(3, 128, (40, 32), generator=torch.Generator().manual_seed(9))
    driver = in_memory_driver(model, tokens, None, 32, None, batch_size=4)  # 10 batches, 2 held out
    repair = LinearRecovery().fit(driver, [2, 3], shrinkage="auto", progress=False)
    [chosen] = repair.maps
    assert chosen.shrinkage in SHRINKAGES
    [eq] = gather(driver, gaps_of([2, 3]), lambda gap, eq: eq, False, HELD_EVERY).values()
    assert eq.held is not None and eq.held.tokens == 2 * 4 * 32
    errors = {s: eq.held.residual(eq.solve(0.0, "gap", s)) for s in SHRINKAGES}
    assert chosen.shrinkage == min(errors, key=errors.get)
    whole = eq.merged()
    assert isinstance(whole, NormalEquations) and whole.tokens == 40 * 32
    torch.testing.assert_close(chosen.map, whole.solve(0.0, "gap", chosen.shrinkage).float())
    assert repair.entry["gaps"][0]["shrinkage"] == chosen.shrinkage
    with pytest.raises(ShortGPTError, match="shrinkage must be a non-negative number or 'auto'"):
        prune(tiny_model("llama"), [2], recovery="linear", recovery_data=tokens, recovery_options={"shrinkage": "x"})


def test_the_cosine_repair_lowers_the_cosine_distance_from_the_least_squares_start():
    """``cosine`` starts from the least-squares map and must end with a lower mean cosine distance
    between the repaired state and the true one, on the same rows, with a different map."""
    from shortgpt_hf.recovery.cosine import cosine_distance, refine_for_cosine
    from shortgpt_hf.recovery.linear import gaps_of, gather

    model = tiny_model("llama")
    driver = in_memory_driver(model, TOKENS, None, 32, None)
    [gap] = gaps_of([2, 3])
    equations = gather(driver, [gap], lambda gap, eq: eq, progress=False, keep_rows=True)[gap]
    start = equations.solve(0.0, "the gap").float()
    refined = refine_for_cosine(equations, start, "the gap", steps=20)
    before, after = float(cosine_distance(equations, start)), float(cosine_distance(equations, refined))
    assert after < before and not torch.allclose(refined, start)
