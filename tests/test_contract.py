"""The registries' contract: every registered metric and recovery method runs through
`prune`, `recover`, the ablation, the CLI's choices and both drivers (in memory and
layer by layer) with the same results, so one new registered class is tested
everywhere by these parametrizations; and the front door,
``PrunedForCausalLM.from_pretrained(..., shortgpt_config=...)``, builds what
``shortgpt prune`` writes, on either path."""

import re
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from shortgpt_hf import (
    METRICS,
    RECOVERY_METHODS,
    InvalidRequest,
    PrunedForCausalLM,
    ShortGPTConfig,
    ShortGPTError,
    ablate,
    prune,
    prune_to_folder,
    recover,
    score_layers,
    score_layers_sequentially,
)
from shortgpt_hf.ablation import default_metrics, recovery_choices
from shortgpt_hf.families import FAMILIES, Family
from shortgpt_hf.metrics import BlockInfluence
from shortgpt_hf.recovery.base import takes_option
from shortgpt_hf.recovery.linear import LinearRecovery
from shortgpt_hf.scoring import in_memory_driver
from shortgpt_hf.streaming import dense_driver, fit_linear_sequentially

NUM_LAYERS = 6
TOKENS = torch.randint(3, 128, (12, 32), generator=torch.Generator().manual_seed(3))  # 384 tokens, hidden 32
IDS = torch.arange(3, 15).reshape(2, 6)
WORDS = " ".join(f"t{3 + (7 * i) % 120}" for i in range(600))  # text the tiny tokenizer cuts into 600 tokens
FITTED = [name for name, method in RECOVERY_METHODS.items() if method.needs_removed_layers]
TRAINED = [name for name, method in RECOVERY_METHODS.items() if not method.needs_removed_layers]
COMMANDS = ("score", "prune", "ablate")
QUICK = {"lora": {"steps": 2, "batch_size": 2}, "partial": {"steps": 2, "batch_size": 2}}  # each in a second


def checkpoint(tmp_path: Path, family: str = "llama") -> Path:
    folder = tmp_path / f"{family}-dense"
    tiny_model(family).save_pretrained(folder, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "calibration.txt").write_text(WORDS)
    return folder


def greedy_steps(metric: str) -> int | None:
    return 2 if METRICS[metric].greedy else None


def test_registries_refuse_a_second_entry_under_a_taken_name():
    with pytest.raises(ValueError, match="a metric named 'bi' is already registered"):
        METRICS.add("bi", BlockInfluence())
    with pytest.raises(ValueError, match="a recovery method named 'linear' is already registered"):
        RECOVERY_METHODS.add("linear", LinearRecovery())
    with pytest.raises(ValueError, match="a model family named 'llama' is already registered"):
        FAMILIES.add("llama", Family("Llama again"))
    with pytest.raises(InvalidRequest, match="unknown metric 'nope'; choose from bi, angular"):
        ShortGPTConfig(metric="nope")
    with pytest.raises(InvalidRequest, match="unknown recovery method 'nope'; choose from linear, cosine, lora, part"):
        ShortGPTConfig(recovery="nope")


def readme_list(tag: str) -> list[str]:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(rf"<!-- {tag}:start -->\n(.*?)\n *<!-- {tag}:end -->", readme, re.S).group(1)
    return [line.strip() for line in block.splitlines()]


def test_choices_everywhere_come_from_the_registries(capsys, monkeypatch):
    """The CLI's help, the ablation's defaults and choices, and the README's lists are the registries'."""
    assert readme_list("metrics") == [f"- `{name}`: {m.summary}" for name, m in METRICS.items()]
    assert readme_list("recovery") == [f"- `{name}`: {m.summary}" for name, m in RECOVERY_METHODS.items()]
    helps = {command: " ".join(run_cli(capsys, monkeypatch, command, "--help")[1].split()) for command in COMMANDS}
    assert f"One of: {', '.join(METRICS)}." in helps["score"] and f"One of: {', '.join(METRICS)}." in helps["prune"]
    assert f"from: {', '.join(METRICS)}." in helps["ablate"]
    assert f"from: {', '.join(recovery_choices())}." in helps["ablate"]
    # the built-ins: the paper's metrics and baselines by default, the greedy search only when asked
    assert default_metrics()[:6] == ["bi", "angular", "relative_magnitude", "sequential", "reverse", "random"]
    assert "linear_residual" in METRICS and "linear_residual" not in default_metrics()
    assert {"none", "linear", "lora", "linear+lora"} <= set(
        recovery_choices()
    ) and "lora+linear" not in recovery_choices()


@pytest.mark.parametrize("metric", list(METRICS))
def test_every_metric_gives_the_same_scores_on_both_drivers(metric, tmp_path):
    folder = checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    options = dict(seq_len=32, batch_size=4, max_layers=greedy_steps(metric), progress=False)
    in_memory = score_layers(model, TOKENS, metric, **options)
    walked = score_layers_sequentially(folder, TOKENS, metric, device="cpu", **options)
    assert walked.metric == in_memory.metric == metric and walked.num_tokens == in_memory.num_tokens
    assert walked.scores == pytest.approx(in_memory.scores, rel=1e-5, abs=1e-9)
    assert walked.order == in_memory.order
    assert walked.lowest(2) == in_memory.lowest(2)
    if METRICS[metric].blocks:  # blocks of consecutive layers, on both drivers too
        blocks = score_layers(model, TOKENS, metric, block_size=2, **options)
        walked_blocks = score_layers_sequentially(folder, TOKENS, metric, block_size=2, device="cpu", **options)
        assert walked_blocks.scores == pytest.approx(blocks.scores, rel=1e-5) and len(blocks.scores) == NUM_LAYERS - 1


@pytest.mark.parametrize("metric", list(METRICS))
def test_every_metric_prunes_through_a_request_and_the_ablation(metric):
    model = tiny_model("llama")
    expected = score_layers(model, TOKENS, metric, seq_len=32, max_layers=greedy_steps(metric), progress=False)
    prune(model, ShortGPTConfig(n_layers=2, metric=metric, seq_len=32, measure=False), calibration_data=TOKENS)
    record = ShortGPTConfig.from_model(model)
    assert record.removed_layers == expected.lowest(2) and record.metric == metric
    assert record.request["metric"] == metric and record.request["n_layers"] == 2

    dense = tiny_model("llama")
    result = ablate(
        dense,
        tiny_tokenizer(),
        ratios=[0.34],
        metrics=[metric],
        tasks=["ppl"],
        calibration=TOKENS,
        max_tokens=256,
        seq_len=32,
        progress=False,
    )
    assert [run.removed_layers for run in result.runs] == [expected.lowest(2)]


@pytest.mark.parametrize("method", FITTED)
def test_every_training_free_method_fits_the_same_maps_on_both_drivers(method, tmp_path):
    folder = checkpoint(tmp_path)
    removed = [2, 3]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    in_memory = RECOVERY_METHODS[method].fit(in_memory_driver(model, TOKENS, None, 32, None), removed, progress=False)
    walked = fit_linear_sequentially(folder, removed, TOKENS, method=method, seq_len=32, device="cpu", progress=False)
    assert walked.method == in_memory.method == method and walked.entry == in_memory.entry
    for a, b in zip(walked.maps, in_memory.maps, strict=True):
        torch.testing.assert_close(a.map, b.map, rtol=1e-5, atol=1e-6)
    driver = dense_driver(folder, TOKENS, seq_len=32, device="cpu")  # the same fit, through the generic entry
    assert RECOVERY_METHODS[method].fit(driver, removed, progress=False).entry == in_memory.entry
    if takes_option(method, "shrinkage"):  # a held-out slice is the same batches on both drivers
        memory_driver = in_memory_driver(model, TOKENS, None, 32, None, batch_size=2)
        auto_memory = RECOVERY_METHODS[method].fit(memory_driver, removed, shrinkage="auto", progress=False)
        walk_driver = dense_driver(folder, TOKENS, seq_len=32, batch_size=2, device="cpu")
        auto_walked = RECOVERY_METHODS[method].fit(walk_driver, removed, shrinkage="auto", progress=False)
        assert auto_walked.entry == auto_memory.entry


@pytest.mark.filterwarnings("ignore:this pruned model is not saved")  # the adapters are evaluated, never saved
@pytest.mark.parametrize("method", list(RECOVERY_METHODS))
def test_every_recovery_method_runs_through_prune_recover_and_the_ablation(method, tmp_path):
    options = QUICK.get(method, {})
    model = tiny_model("llama")
    request = ShortGPTConfig(layers=[2, 3], recovery=[{"method": method, **options}], seq_len=32, measure=False)
    recovered = prune(model, request, calibration_data=TOKENS)
    steps = ShortGPTConfig.from_model(getattr(recovered, "get_base_model", lambda: recovered)()).recovery
    assert [s["method"] for s in steps] == [method]
    if method in TRAINED:  # a training method also runs on its own, after the removal
        pruned = prune(tiny_model("llama"), [2, 3])
        again = recover(pruned, method, TOKENS, seq_len=32, **options)
        base = getattr(again, "get_base_model", lambda: again)()  # a PEFT model, or the model itself
        assert [s["method"] for s in ShortGPTConfig.from_model(base).recovery] == [method]
    else:  # a training-free one needs the layers it replaces: recover() after the fact says so
        with pytest.raises(ShortGPTError, match=f"prune\\(model, ..., recovery='{method}'\\)"):
            recover(prune(tiny_model("llama"), [2, 3]), method, TOKENS)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(" ".join(f"t{3 + (11 * i) % 120}" for i in range(400)))
    result = ablate(
        tiny_model("llama"),
        tiny_tokenizer(),
        ratios=[0.34],
        metrics=["sequential"],
        tasks=[f"ppl:{held_out}"],
        calibration=TOKENS,
        recoveries=["none", method],
        recovery_options={method: options},
        max_tokens=256,
        seq_len=32,
        progress=False,
    )
    plain, recovered_run = (run.value("perplexity", "perplexity") for run in result.runs)
    assert [run.recovery for run in result.runs] == ["none", method] and recovered_run != plain  # it changed the model


@pytest.mark.parametrize("method", TRAINED)
def test_training_methods_are_refused_up_front_layer_by_layer(method, tmp_path, capsys, monkeypatch):
    folder = checkpoint(tmp_path)
    request = ShortGPTConfig(layers=[2], recovery=method)
    with pytest.raises(InvalidRequest, match=f"recovery '{method}' trains the pruned model"):
        prune_to_folder(folder, request, tmp_path / "x", layer_by_layer=True)
    code, _, err = run_cli(capsys, monkeypatch, "prune", folder, "--recovery", method, "--out", tmp_path / "x")
    assert code == 2 and not (tmp_path / "x").exists()
    assert_one_line_error(err, f"--recovery must be none or one of {', '.join(FITTED)}")


def test_a_newly_registered_metric_appears_everywhere(tmp_path, capsys, monkeypatch):
    """The seam: one registered class is a metric of the request, both drivers, the ablation and the CLI."""
    from shortgpt_hf.metrics import OrderMetric, register_metric

    monkeypatch.setattr(METRICS, "_entries", dict(METRICS))  # the test's metric goes with it

    @register_metric
    class Middle(OrderMetric):
        name = "middle_out"
        summary = "remove from the middle outwards"

        def order_scores(self, num_layers, seed):
            return [abs(i - (num_layers - 1) / 2) for i in range(num_layers)]

    folder = checkpoint(tmp_path)
    assert "middle_out" in default_metrics()
    assert score_layers_sequentially(folder, None, "middle_out", progress=False).lowest(2) == [2, 3]
    model = PrunedForCausalLM.from_pretrained(folder, shortgpt_config=ShortGPTConfig(n_layers=2, metric="middle_out"))
    assert model.config.shortgpt["removed_layers"] == [2, 3]
    _, help_text, _ = run_cli(capsys, monkeypatch, "score", "--help")
    assert "middle_out" in help_text


@pytest.mark.parametrize("recovery", ["none", "linear"])
@pytest.mark.parametrize("layer_by_layer", [False, True])
def test_from_pretrained_with_a_request_builds_what_shortgpt_prune_writes(
    recovery, layer_by_layer, tmp_path, capsys, monkeypatch
):
    folder = checkpoint(tmp_path)
    calibration = tmp_path / "calibration.txt"
    request = ShortGPTConfig(
        ratio=0.25, calibration=str(calibration), seq_len=32, recovery=None if recovery == "none" else recovery
    )
    model, info = PrunedForCausalLM.from_pretrained(
        folder, shortgpt_config=request, layer_by_layer=layer_by_layer, output_loading_info=True
    )
    result = info["shortgpt"]
    assert result.path == ("layer by layer" if layer_by_layer else "in memory") and result.reason == "as asked"
    assert type(model).__name__ == "LlamaForCausalLM" and result.model is model
    load = "layer-by-layer" if layer_by_layer else "full"
    args = ["--ratio", "0.25", "--calibration", calibration, "--seq-len", "32", "--recovery", recovery, "--load", load]
    code, stdout, err = run_cli(capsys, monkeypatch, "prune", folder, *args, "--out", tmp_path / "cli")
    assert code in (0, None), err
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    ours, theirs = ShortGPTConfig.from_model(model), ShortGPTConfig.from_model(written)
    assert ours.removed_layers == theirs.removed_layers and len(ours.removed_layers) == 2  # 25% of 6, halves up
    assert ours.request == theirs.request == request.request_dict()
    assert [s["method"] for s in ours.recovery or []] == [s["method"] for s in theirs.recovery or []]
    assert f"removed layers (original indices): {ours.removed_layers} by bi" in stdout
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, written(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_from_pretrained_refuses_what_it_cannot_return(tmp_path):
    folder = checkpoint(tmp_path)
    with pytest.raises(InvalidRequest, match="recovery 'lora' trains the pruned model, which this job does not do"):
        PrunedForCausalLM.from_pretrained(folder, shortgpt_config=ShortGPTConfig(layers=[1], recovery="lora"))
    with pytest.raises(InvalidRequest, match="not also as removed_layers"):
        PrunedForCausalLM.from_pretrained(folder, shortgpt_config=ShortGPTConfig(layers=[1]), removed_layers=[1])
    with pytest.raises(InvalidRequest, match="out of range 0..5"):  # before any weight is read
        PrunedForCausalLM.from_pretrained(folder, shortgpt_config=ShortGPTConfig(layers=[9]))


def test_errors_are_typed_so_a_caller_can_catch_one_kind(tmp_path, monkeypatch):
    """Every failure is still a one-line ShortGPTError; its subclass says which kind it is."""
    import shortgpt_hf.verification
    from shortgpt_hf import SourceUnavailable, UnsupportedModel, VerificationFailed

    with pytest.raises(InvalidRequest, match="ratio must be between 0 and 1"):
        ShortGPTConfig(ratio=1.5)
    with pytest.raises(InvalidRequest, match="give one of layers, n_layers or ratio, not layers and ratio"):
        ShortGPTConfig(layers=[1], ratio=0.25)
    with pytest.raises(SourceUnavailable, match="no such folder"):
        PrunedForCausalLM.from_pretrained(str(tmp_path / "missing") + "/", shortgpt_config=ShortGPTConfig())
    gpt2 = tiny_model("gpt2")
    gpt2.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UnsupportedModel, match="scale_attn_by_inverse_layer_idx"):
        prune(gpt2, [1])
    model = tiny_model("llama")
    before = model(input_ids=IDS).logits
    monkeypatch.setattr(shortgpt_hf.verification, "logits_close", lambda *args: False)
    with pytest.raises(VerificationFailed, match="does not match the original with those layers skipped"):
        prune(model, [1], verify=True)
    torch.testing.assert_close(model(input_ids=IDS).logits, before)  # restored


def test_a_request_round_trips_through_json_and_a_folder(tmp_path):
    folder = checkpoint(tmp_path)
    recovery = [{"method": "linear", "ridge": 1e-3}]
    request = ShortGPTConfig(
        n_layers=2, metric="angular", block_size=2, calibration=tmp_path / "calibration.txt", recovery=recovery
    )
    assert request.is_request and request.recovery == recovery and request.calibration.endswith("calibration.txt")
    assert ShortGPTConfig.from_json_string(request.to_json_string()) == request
    request.save_pretrained(tmp_path / "request")
    assert ShortGPTConfig.from_pretrained(tmp_path / "request") == request
    with pytest.raises(InvalidRequest, match="holds a request, not a pruned model's record"):
        PrunedForCausalLM.from_pretrained(tmp_path / "request")  # a request is not a recipe to load
    folder = checkpoint(tmp_path)
    model = PrunedForCausalLM.from_pretrained(
        folder, shortgpt_config=ShortGPTConfig.from_pretrained(tmp_path / "request")
    )
    record = ShortGPTConfig.from_model(model)
    assert not record.is_request and record.request == request.request_dict()
    assert ShortGPTConfig(**record.request) == request  # the record says how to do it again


def test_bad_requests_are_refused_before_anything_runs(tmp_path, monkeypatch):
    """A misspelt or misplaced step option, or a count blocks cannot give, fails when the request is built or
    before any weight is read; the keyword form refuses what it cannot use instead of dropping it."""
    import shortgpt_hf.pipeline
    from shortgpt_hf import LayerScores

    with pytest.raises(InvalidRequest, match="recovery method 'linear': got an unexpected keyword argument 'ridg'"):
        ShortGPTConfig(recovery=[{"method": "linear", "ridg": 1e-3}])
    with pytest.raises(InvalidRequest, match="option 'max_tokens' is set by the request for every step"):
        ShortGPTConfig(recovery=[{"method": "lora", "max_tokens": 100}])
    folder = checkpoint(tmp_path)
    monkeypatch.setattr(shortgpt_hf.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    blocks = ShortGPTConfig(n_layers=3, metric="angular", block_size=2)
    for layer_by_layer in (False, True):
        with pytest.raises(
            InvalidRequest, match="blocks of 2 layers remove one block, 2 layers; this request removes 3"
        ):
            PrunedForCausalLM.from_pretrained(folder, shortgpt_config=blocks, layer_by_layer=layer_by_layer)
    model = tiny_model("llama")
    with pytest.raises(InvalidRequest, match="give a ShortGPTConfig or a list of layer indices, got 2"):
        prune(model, 2)
    with pytest.raises(InvalidRequest, match="recovery_options \\['ridge'\\] were given without a recovery method"):
        prune(model, [1], recovery_options={"ridge": 1e-3})
    mine = LayerScores("my_own_metric", [0.5, 0.1, 0.2, 0.9, 0.8, 0.7], NUM_LAYERS)  # scores need no registered metric
    prune(model, n_layers=2, scores=mine)
    record = ShortGPTConfig.from_model(model)
    assert record.removed_layers == [1, 2] and record.metric == "my_own_metric" and record.request["layers"] == [1, 2]
