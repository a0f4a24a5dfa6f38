"""LoRA healing: adapters that name the pruned base, round trips through PEFT and
plain transformers, and a real recovery of held-out perplexity."""

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_python
from peft import IA3Config, LoraConfig
from tiny_models import NUM_LAYERS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortgpt_hf import ShortGPTConfig, ShortGPTError, perplexity, prune, save_pruned
from shortgpt_hf.recovery import adjacent_layers, heal, save_healed
from shortgpt_hf.recovery.training import healing_loss

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(6))
TOKENS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def saved_pruned(tmp_path):
    model = tiny_model("llama")
    prune(model, layers=[2])
    save_pruned(model, tmp_path / "pruned")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager")


@pytest.mark.slow  # reloads the adapter in a fresh interpreter
def test_adapter_round_trip_through_peft_and_merge(saved_pruned, tmp_path):
    healed = heal(saved_pruned, TOKENS, steps=3, lr=1e-2, seq_len=32, batch_size=4, layers="adjacent", progress=False)
    config = healed.peft_config["default"]
    assert config.base_model_name_or_path == str((tmp_path / "pruned").resolve())
    assert config.layers_to_transform == [1, 2] and config.layers_to_transform == adjacent_layers(
        ShortGPTConfig.from_model(saved_pruned)
    )
    healed.eval()
    expected = healed(input_ids=IDS).logits
    save_healed(healed, tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "pruned").resolve())
    code = f"""
import sys, torch
from peft import AutoPeftModelForCausalLM
m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r}, attn_implementation="eager").eval()
assert m.get_base_model().config.num_hidden_layers == {NUM_LAYERS - 1}, m.get_base_model().config.num_hidden_layers
print(m(input_ids=torch.tensor({IDS.tolist()})).logits.flatten()[:50].tolist())
assert "shortgpt_hf" not in sys.modules
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert eval(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected.flatten()[:50].tolist(), abs=1e-5)

    save_healed(healed, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-4)
    record = ShortGPTConfig.from_model(merged)
    assert (
        record.removed_layers == [2]
        and record.recovery[-1]["steps"] == 3
        and record.recovery[-1]["tokens"] == 3 * 4 * 32
    )
    assert record.recovery[-1]["layers"] == "adjacent" and record.recovery[-1]["data"].startswith("tokens")


def test_healing_refusals(saved_pruned, tmp_path):
    with pytest.raises(ShortGPTError, match="prune it first"):
        heal(tiny_model("llama"), TOKENS, seq_len=32, steps=1)
    with pytest.raises(ShortGPTError, match="QLoRA needs a CUDA GPU"):
        heal(saved_pruned, TOKENS, "qlora", seq_len=32, steps=1)
    with pytest.raises(ShortGPTError, match="layers must be"):
        heal(saved_pruned, TOKENS, seq_len=32, steps=1, layers=[99])
    with pytest.raises(ShortGPTError, match="give either peft_config or r, layers"):
        heal(saved_pruned, TOKENS, seq_len=32, steps=1, peft_config=LoraConfig(r=4), r=8, layers="adjacent")
    with pytest.raises(ShortGPTError, match="peft_config must be a peft LoraConfig"):
        heal(saved_pruned, TOKENS, seq_len=32, steps=1, peft_config=IA3Config())
    for bad, message in (
        (dict(temperature=0), "temperature must be positive"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be"),
    ):
        with pytest.raises(ShortGPTError, match=message):
            heal(saved_pruned, TOKENS, seq_len=32, steps=1, **bad)
    in_memory = tiny_model("llama")
    prune(in_memory, layers=[0])
    with pytest.warns(UserWarning, match="this pruned model is not saved"):
        healed = heal(in_memory, TOKENS, seq_len=32, steps=1, progress=False)
    with pytest.raises(ShortGPTError, match="is not where this pruned model is saved"):
        save_healed(healed, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_healing_lowers_heldout_perplexity_on_real_model(smollm2_path, tmp_path):
    """SmolLM2-135M with its 8 lowest-BI layers (25%) removed; 24 LoRA steps of
    2 x 128 tokens on the calibration plays, distilled from the dense model it
    was loaded from (the default teacher); perplexity on a different play
    (Othello) must drop clearly. ~2 minutes on 2 cores."""
    from shortgpt_hf.texts import calibration_texts, heldout_texts

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    prune(model, layers=[12, 13, 14, 15, 16, 17, 25, 26])
    held_out = [heldout_texts()[0]]
    healed = heal(
        model,
        calibration_texts(),
        tokenizer=tok,
        steps=24,
        lr=1e-3,
        seq_len=128,
        batch_size=2,
        eval_data=held_out,
        eval_tokens=2048,
        progress=False,
    )
    record = healed.get_base_model().config.shortgpt["recovery"][-1]
    print(record)
    assert record["perplexity_after"] < 0.8 * record["perplexity_before"]
    assert perplexity(healed, tok, held_out, seq_len=128, max_tokens=2048) == pytest.approx(
        record["perplexity_after"], rel=1e-3
    )


def test_a_new_recovery_method_is_one_registered_class(saved_pruned, monkeypatch):
    """The seam: a method only implements apply(); evaluation and the record come from recover()."""
    from shortgpt_hf.recovery import RECOVERY_METHODS, RecoveryMethod, recover, register

    monkeypatch.setattr(RECOVERY_METHODS, "_entries", dict(RECOVERY_METHODS))  # the test's method goes with it

    @register
    class ScaleHead(RecoveryMethod):
        name = "scale-head"
        summary = "multiplies the output head by a factor"

        def apply(self, model, windows, tokenizer, factor=2.0):
            with torch.no_grad():
                model.lm_head.weight.mul_(factor)
            return model, {"factor": factor, "tokens": windows.num_tokens}

    before = saved_pruned(input_ids=IDS).logits
    out = recover(saved_pruned, "scale-head", TOKENS, seq_len=32, eval_data=TOKENS[:2], factor=0.5)
    torch.testing.assert_close(out(input_ids=IDS).logits, before * 0.5)
    steps = ShortGPTConfig.from_model(out).recovery
    assert [s["method"] for s in steps] == ["scale-head"] and steps[0]["factor"] == 0.5 and steps[0]["tokens"] == 8 * 32
    assert steps[0]["perplexity_before"] != steps[0]["perplexity_after"] and steps[0]["data"].startswith("tokens")
    with pytest.raises(ShortGPTError, match="method 'nope'; choose from linear, cosine, lora, partial, scale-"):
        recover(saved_pruned, "nope", TOKENS)
    with pytest.raises(ShortGPTError, match="recovery method 'lora': got an unexpected keyword argument 'stepz'"):
        heal(saved_pruned, TOKENS, stepz=3)


def test_records_from_before_the_recovery_list_still_load():
    legacy = {"removed_layers": [2], "original_num_hidden_layers": 6, "healing": {"steps": 3, "r": 8}}
    assert ShortGPTConfig.from_dict(legacy).recovery == [{"method": "lora", "steps": 3, "r": 8}]
    assert ShortGPTConfig.from_dict({**legacy, "healing": None}).recovery is None


@pytest.mark.slow  # two processes under accelerate launch: about 20 s
def test_two_process_healing_shards_data_and_keeps_the_schedule(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each process trains on its own
    windows, the LR schedule is the single-process one step for step, both end
    with the same adapter, and only one writes it; it reloads with PEFT."""
    model = tiny_model("llama")
    prune(model, layers=[2])
    save_pruned(model, tmp_path / "pruned", tiny_tokenizer())
    tokens = torch.randint(3, 128, (16, 16), generator=torch.Generator().manual_seed(8))
    tokens[:, 0] = torch.arange(16) + 3  # the first token names the window
    out = tmp_path / "out"
    out.mkdir()
    torch.save(tokens, out / "tokens.pt")
    steps, batch_size, accumulation = 3, 2, 2
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    worker = [
        str(Path(__file__).parent / "heal_worker.py"),
        str(tmp_path / "pruned"),
        str(out),
        str(steps),
        str(batch_size),
        str(accumulation),
    ]
    result = subprocess.run(
        launch + worker, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"process{i}.json").read_text()) for i in (0, 1)]

    windows = [set(r["seen"]) for r in ranks]
    assert windows[0] and windows[1] and not windows[0] & windows[1], (
        f"the processes trained on the same windows: {windows}"
    )
    assert windows[0] | windows[1] == set(range(3, 19)), "together they cover the data"
    # accelerate's DataLoader reads one batch ahead, so a process may batch one more than it trains on
    assert all(0 <= len(r["seen"]) - steps * accumulation * batch_size <= batch_size for r in ranks)
    assert all(r["processes"] == 2 and r["tokens"] == 2 * steps * accumulation * batch_size * 16 for r in ranks)
    assert ranks[0]["lora"] == ranks[1]["lora"], "gradients are averaged across processes: the adapters stay identical"

    rates: list[float] = []
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager")
    heal(
        single,
        tokens,
        seq_len=16,
        steps=steps,
        batch_size=2 * batch_size,
        gradient_accumulation_steps=accumulation,
        lr=1e-2,
        progress=False,
        callback=lambda step, m, logs: rates.append(logs["lr"]),
    )
    assert ranks[0]["rates"] == ranks[1]["rates"] == pytest.approx(rates), (
        "the schedule ends where a single process with the same global batch ends"
    )
    assert len(rates) == steps and rates[-1] == pytest.approx(1e-2 * (1 - (steps - 1) / steps))

    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], "no temporary folder is left"
    code = f"""
import torch
from peft import AutoPeftModelForCausalLM
m = AutoPeftModelForCausalLM.from_pretrained({str(out / "adapter")!r}, attn_implementation="eager")
print(m.get_base_model().config.num_hidden_layers)
"""
    reloaded = run_python(code)
    assert reloaded.returncode == 0 and reloaded.stdout.strip().splitlines()[-1] == str(NUM_LAYERS - 1), (
        reloaded.stderr[-2000:]
    )

    # The README's command: the CLI itself under accelerate launch; both processes run it, one writes.
    (tmp_path / "train.txt").write_text(" ".join(f"t{3 + i % 120}" for i in range(2000)))
    heal_cli = [
        "-m",
        "shortgpt_hf.cli",
        "heal",
        str(tmp_path / "pruned"),
        "--out",
        str(tmp_path / "cli-adapter"),
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--data",
        str(tmp_path / "train.txt"),
    ]
    result = subprocess.run(
        launch + heal_cli, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "cli-adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "pruned").resolve()
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder is left"


def test_gradient_accumulation_equals_the_larger_batch(saved_pruned, tmp_path):
    """Two accumulated batches of 2 take the same optimizer steps as batches of 4 over the same windows."""
    adapters = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager")
        healed = heal(
            model,
            TOKENS,
            seq_len=32,
            steps=2,
            lr=1e-2,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            progress=False,
        )
        assert healed.get_base_model().config.shortgpt["recovery"][-1]["tokens"] == 2 * 4 * 32
        adapters.append({n: p.detach().clone() for n, p in healed.named_parameters() if "lora_" in n})
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for name in adapters[0]:
        torch.testing.assert_close(adapters[0][name], adapters[1][name], atol=1e-6, rtol=1e-5)
    moved = [n for n in adapters[0] if "lora_B" in n and adapters[0][n].abs().max() > 0]
    assert moved, "the adapters trained at all"


def _whole_batch_loss(student, ids, mask, teacher, kd_weight, temperature):
    """The healing loss as a formula on whole batch x seq x vocab tensors, differentiated by autograd."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ce = F.cross_entropy(student[:, :-1].reshape(-1, student.shape[-1]), targets.reshape(-1), ignore_index=-100)
    if teacher is None:
        return ce
    kl = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    return (1 - kd_weight) * ce + kd_weight * (kl * mask).sum() / mask.sum() * temperature**2


def test_chunked_loss_and_its_gradient_equal_the_whole_batch_formula():
    """`healing_loss` computes its value and its gradient a chunk of tokens at a time, so
    that no full-vocabulary log-probabilities are held whole: both equal autograd through
    the whole-batch formula, for any chunk size, with padding, with and without a teacher."""
    generator = torch.Generator().manual_seed(9)
    logits, teacher = (torch.randn(3, 10, 50, generator=generator) * 3 for _ in range(2))
    ids = torch.randint(0, 50, (3, 10), generator=generator)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = mask[2, 3:] = 0
    for given, kd_weight, temperature in (
        (None, 0.5, 1.0),
        (teacher, 0.5, 1.0),
        (teacher, 0.3, 2.0),
        (teacher, 1.0, 4.0),
    ):
        reference = logits.clone().requires_grad_()
        expected = _whole_batch_loss(reference, ids, mask, given, kd_weight, temperature)
        (expected * 0.5).backward()
        for chunk in (None, 1, 7, 30):
            student = logits.clone().requires_grad_()
            loss = healing_loss(student, ids, mask, given, kd_weight, temperature, chunk_tokens=chunk)
            (loss * 0.5).backward()
            torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(student.grad, reference.grad, atol=1e-6, rtol=1e-6)


def test_no_logits_outlive_the_loss(saved_pruned, tmp_path):
    """Both models' logits (batch x seq x vocab floats each: 192 MiB for SmolLM2 at the CLI's
    4 x 256 tokens) are freed once the loss is computed: none is alive in the backward pass
    (when the student's activations are) nor kept into the next step."""
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager")
    made: list[weakref.ref] = []
    alive_in_backward: list[int] = []
    alive_after_step: list[int] = []
    for model in (saved_pruned, teacher):
        model.register_forward_hook(lambda module, args, output: made.append(weakref.ref(output.logits)))
    saved_pruned.lm_head.register_full_backward_pre_hook(
        lambda module, grad: alive_in_backward.append(sum(ref() is not None for ref in made))
    )
    heal(
        saved_pruned,
        TOKENS,
        seq_len=32,
        steps=2,
        batch_size=4,
        teacher=teacher,
        progress=False,
        callback=lambda step, model, logs: alive_after_step.append(sum(ref() is not None for ref in made)),
    )
    assert len(made) == 4 and alive_in_backward == [0, 0] and alive_after_step == [0, 0]


def test_distillation_temperature_and_callback(saved_pruned, tmp_path):
    student = torch.randn(2, 5, 11)
    teacher = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for temperature in (1.0, 2.0, 4.0):
        expected = _whole_batch_loss(student, ids, mask, teacher, 1.0, temperature)  # all KL, no cross-entropy
        torch.testing.assert_close(healing_loss(student, ids, mask, teacher, 1.0, temperature), expected)

    # A teacher identical to the student (LoRA starts as the identity) gives no distillation loss at any
    # temperature, and nothing to learn: the gradient (student minus teacher probabilities) is zero throughout.
    teacher_model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager")
    logs = []
    healed = heal(
        saved_pruned,
        TOKENS,
        seq_len=32,
        steps=3,
        lr=1e-2,
        batch_size=4,
        teacher=teacher_model,
        kd_weight=1.0,
        temperature=3.0,
        progress=False,
        callback=lambda step, model, info: logs.append((step, model, info)),
    )
    assert [step for step, _, _ in logs] == [1, 2, 3] and all(model is healed for _, model, _ in logs)
    assert all(info["loss"] == pytest.approx(0.0, abs=1e-6) for _, _, info in logs)
    assert logs[0][2]["lr"] > logs[-1][2]["lr"] > 0
    record = healed.get_base_model().config.shortgpt["recovery"][-1]
    assert record["temperature"] == 3.0 and record["kd_weight"] == 1.0


def test_any_peft_lora_config(saved_pruned, tmp_path):
    """A user's own LoraConfig (here DoRA on two projections) is used as given, and named on the pruned base."""
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    healed = heal(saved_pruned, TOKENS, seq_len=32, steps=2, lr=1e-2, batch_size=4, peft_config=config, progress=False)
    used = healed.peft_config["default"]
    assert used.use_dora and used.r == 4 and set(used.target_modules) == {"q_proj", "v_proj"}
    assert (
        used.base_model_name_or_path == str((tmp_path / "pruned").resolve()) and config.base_model_name_or_path is None
    )
    record = healed.get_base_model().config.shortgpt["recovery"][-1]
    assert record["variant"] == "DoRA" and record["r"] == 4 and record["target_modules"] == ["q_proj", "v_proj"]
    trained = [n for n, p in healed.named_parameters() if p.requires_grad]
    assert (
        trained
        and all("q_proj" in n or "v_proj" in n for n in trained)
        and any("lora_magnitude_vector" in n for n in trained)
    )


def test_lora_config_with_one_layer_index(saved_pruned, tmp_path):
    healed = heal(
        saved_pruned,
        TOKENS,
        seq_len=32,
        steps=1,
        batch_size=4,
        peft_config=LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=1),
        progress=False,
    )
    assert healed.get_base_model().config.shortgpt["recovery"][-1]["layers"] == [1]


def test_partial_tuning_trains_only_the_last_layers_and_stays_native(tmp_path):
    """``partial``: the last kept layers and the final norm change, nothing before them does, every
    parameter is trainable again afterwards, and the result saves and loads as a plain checkpoint."""
    from shortgpt_hf.recovery import recover

    model = prune(tiny_model("llama"), [2, 3])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    out = recover(model, "partial", TOKENS, seq_len=32, layers=1, steps=3, lr=1e-3, batch_size=2, progress=False)
    assert out is model and all(p.requires_grad for p in model.parameters())
    last = len(model.model.layers) - 1
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(n.startswith((f"model.layers.{last}.", "model.norm.")) for n in changed)
    step = ShortGPTConfig.from_model(model).recovery[-1]
    assert step["method"] == "partial" and step["layers"] == [last] and step["head"] is False and step["steps"] == 3
    save_pruned(model, tmp_path / "tuned", tiny_tokenizer())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_partial_tuning_refuses_a_tied_head_and_a_bad_layer_count():
    from shortgpt_hf.recovery import recover

    tied = prune(tiny_model("gemma3_text"), [2])  # its head is its input embeddings
    with pytest.raises(ShortGPTError, match="tied to its input embeddings"):
        recover(tied, "partial", TOKENS, head=True)
    with pytest.raises(ShortGPTError, match="must be between 1 and 5, got 9"):
        recover(tied, "partial", TOKENS, layers=9)


@pytest.mark.parametrize("method", ["lora", "partial"])
def test_the_training_methods_share_one_set_of_options(method, saved_pruned):
    """Both training methods refuse the same bad shared options in one line before training, and
    each trains at its own default rate unless given one."""
    from shortgpt_hf.recovery import RECOVERY_METHODS, recover

    chosen = RECOVERY_METHODS[method]
    for bad, message in (
        (dict(lr=0.0), "the learning rate .* must be positive"),
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(kd_weight=2.0), "between 0 and 1"),
        (dict(steps=0), "at least 1, got 0"),
        (dict(stepz=3), f"recovery method '{method}': got an unexpected keyword argument 'stepz'"),
    ):
        with pytest.raises(ShortGPTError, match=message):
            recover(saved_pruned, method, TOKENS, seq_len=32, **bad)
    assert not ShortGPTConfig.from_model(saved_pruned).recovery  # nothing ran
    out = recover(saved_pruned, method, TOKENS, seq_len=32, steps=1, batch_size=2, progress=False)
    step = ShortGPTConfig.from_model(out.get_base_model() if method == "lora" else out).recovery[-1]
    assert step["lr"] == chosen.default_lr and step["steps"] == 1 and step["tokens"] == 2 * 32


def test_healing_distils_from_the_recorded_base_by_default(tmp_path):
    """The default teacher is the dense model the pruned one records: training with it is training
    with that model given by hand; cross-entropy is a different run; a base recorded but gone is
    refused in one line before anything trains."""
    import shutil

    from shortgpt_hf.recovery import recover

    tiny_model("llama").save_pretrained(tmp_path / "dense")

    def pruned() -> torch.nn.Module:
        return prune(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), [2])

    train = dict(seq_len=32, layers=1, steps=2, lr=1e-3, batch_size=2, progress=False)
    by_default = recover(pruned(), "partial", TOKENS, **train)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    given = recover(pruned(), "partial", TOKENS, teacher=dense, **train)
    on_text = recover(pruned(), "partial", TOKENS, teacher=None, **train)
    step = ShortGPTConfig.from_model(by_default).recovery[-1]
    assert step["teacher"] == ShortGPTConfig.from_model(by_default).base_model_name_or_path and step["kd_weight"] == 1.0
    last = by_default.model.layers[-1].mlp.down_proj.weight
    torch.testing.assert_close(last, given.model.layers[-1].mlp.down_proj.weight)
    assert not torch.allclose(last, on_text.model.layers[-1].mlp.down_proj.weight)
    assert ShortGPTConfig.from_model(on_text).recovery[-1]["teacher"] is None
    no_weight = recover(pruned(), "partial", TOKENS, teacher=dense, kd_weight=0.0, **train)  # a teacher unused
    assert ShortGPTConfig.from_model(no_weight).recovery[-1]["teacher"] is None
    torch.testing.assert_close(
        no_weight.model.layers[-1].mlp.down_proj.weight, on_text.model.layers[-1].mlp.down_proj.weight
    )
    with pytest.warns(UserWarning, match="records no dense base to distil from"):  # an in-memory model: no base
        recover(prune(tiny_model("llama"), [2]), "partial", TOKENS, **train)
    other = dense.config.__class__(**{**dense.config.to_dict(), "vocab_size": 96})
    with pytest.raises(ShortGPTError, match="the teacher predicts over 96 tokens and this model over 128"):
        recover(pruned(), "partial", TOKENS, teacher=AutoModelForCausalLM.from_config(other), **train)

    orphan = pruned()
    shutil.rmtree(tmp_path / "dense")
    with pytest.raises(ShortGPTError, match="the teacher to distil from: no such folder: .*kd_weight=0"):
        recover(orphan, "partial", TOKENS, **train)
    assert not ShortGPTConfig.from_model(orphan).recovery
