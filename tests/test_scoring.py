"""Layer scores against independent computations, and every calibration form."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import NUM_LAYERS, tiny_model

from shortgpt_hf import LayerScores, ShortGPTError, prune, score_layers
from shortgpt_hf.calibration import prepare_calibration

TOKENS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def reference_terms(model, ids, fn):
    """Per-layer mean of fn(x_in, x_out) from output_hidden_states, for layers 0..L-2
    (the last hidden state is after the final norm, so the last layer is not comparable)."""
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    return [
        fn(hidden[i].reshape(-1, hidden[i].shape[-1]), hidden[i + 1].reshape(-1, hidden[i].shape[-1])).mean().item()
        for i in range(len(hidden) - 2)
    ]


@pytest.mark.parametrize(
    "metric, fn",
    [
        ("bi", lambda x, y: 1 - F.cosine_similarity(x, y, dim=-1)),
        ("angular", lambda x, y: torch.arccos(F.cosine_similarity(x, y, dim=-1).clamp(-1, 1)) / math.pi),
        ("relative_magnitude", lambda x, y: (y - x).norm(dim=-1) / y.norm(dim=-1)),
    ],
)
def test_scores_equal_reference_from_hidden_states(metric, fn):
    model = tiny_model("llama")
    result = score_layers(model, TOKENS, metric, seq_len=16, progress=False)
    expected = reference_terms(model, TOKENS, fn)
    assert result.num_layers == NUM_LAYERS and len(result.scores) == NUM_LAYERS
    assert result.scores[:-1] == pytest.approx(expected, abs=1e-5)
    assert result.num_tokens == TOKENS.numel()


def test_last_layer_uses_raw_output_not_final_norm():
    model = tiny_model("llama")
    captured = {}
    last = model.model.layers[-1]
    last.register_forward_hook(lambda m, a, o: captured.setdefault("out", o[0] if isinstance(o, tuple) else o))
    last.register_forward_pre_hook(lambda m, a: captured.setdefault("in", a[0]))
    result = score_layers(model, TOKENS[:1], "bi", seq_len=16, progress=False)
    x, y = captured["in"].reshape(-1, 32), captured["out"].reshape(-1, 32)
    assert result.scores[-1] == pytest.approx((1 - F.cosine_similarity(x, y, dim=-1)).mean().item(), abs=1e-5)


def test_angular_blocks_follow_gromov():
    model = tiny_model("llama")
    result = score_layers(model, TOKENS, "angular", seq_len=16, block_size=2, progress=False)
    hidden = model(input_ids=TOKENS, output_hidden_states=True).hidden_states
    flat = [h.reshape(-1, 32) for h in hidden]
    expected = [
        (torch.arccos(F.cosine_similarity(flat[s], flat[s + 2], dim=-1).clamp(-1, 1)) / math.pi).mean().item()
        for s in range(NUM_LAYERS - 2)
    ]
    assert len(result.scores) == NUM_LAYERS - 1
    assert result.scores[: NUM_LAYERS - 2] == pytest.approx(expected, abs=1e-5)
    start = min(range(len(result.scores)), key=result.scores.__getitem__)
    assert result.lowest(2) == [start, start + 1]
    with pytest.raises(ShortGPTError, match="blocks of 2"):
        result.lowest(3)


def test_padding_is_masked_batch_size_does_not_matter(smollm2):
    model, tok = smollm2
    texts = [
        "To be, or not to be, that is the question.",
        "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
        "Double, double toil and trouble;",
        "Now is the winter of our discontent made glorious summer by this sun of York.",
        "All the world's a stage, and all the men and women merely players.",
        "O Romeo, Romeo!",
        "We are such stuff as dreams are made on, and our little life is rounded with a sleep.",
        "The quality of mercy is not strain'd; it droppeth as the gentle rain from heaven.",
    ]
    one = score_layers(model, texts, tokenizer=tok, seq_len=32, batch_size=1, progress=False)
    eight = score_layers(model, texts, tokenizer=tok, seq_len=32, batch_size=8, progress=False)
    assert one.num_tokens == eight.num_tokens
    assert eight.scores == pytest.approx(one.scores, abs=1e-5)


def test_bf16_ranks_layers_like_fp32(smollm2):
    model, tok = smollm2
    fp32 = score_layers(model, tokenizer=tok, max_tokens=2048, progress=False)
    bf16 = score_layers(model.to(torch.bfloat16), tokenizer=tok, max_tokens=2048, progress=False)
    assert bf16.lowest(8) == fp32.lowest(8)
    order32 = sorted(range(30), key=fp32.scores.__getitem__)
    order16 = sorted(range(30), key=bf16.scores.__getitem__)
    rank_gap = [abs(order32.index(i) - order16.index(i)) for i in range(30)]
    assert max(rank_gap) <= 1, rank_gap


def test_order_baselines():
    model = tiny_model("llama")
    assert score_layers(model, metric="sequential").lowest(2) == [0, 1]
    assert score_layers(model, metric="reverse").lowest(2) == [NUM_LAYERS - 2, NUM_LAYERS - 1]
    a, b = score_layers(model, metric="random", seed=3), score_layers(model, metric="random", seed=3)
    assert a.scores == b.scores
    assert any(score_layers(model, metric="random", seed=s).lowest(3) != a.lowest(3) for s in range(4, 10))


def test_calibration_forms_agree(tmp_path, smollm2):
    from datasets import Dataset

    model, tok = smollm2
    text = (
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. "
        * 6
    )
    path = tmp_path / "calib.txt"
    path.write_text(text)
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    kwargs = dict(tokenizer=tok, seq_len=32, progress=False)
    results = [
        score_layers(model, [text], **kwargs),
        score_layers(model, path, **kwargs),
        score_layers(model, str(path), **kwargs),
        score_layers(model, Dataset.from_dict({"text": [text]}), **kwargs),
        score_layers(model, ids, **kwargs),
        score_layers(model, [ids], **kwargs),
        score_layers(model, {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids))}, **kwargs),
    ]
    for r in results[1:]:
        assert r.scores == pytest.approx(results[0].scores, abs=1e-6)
        assert r.num_tokens == results[0].num_tokens
    assert results[1].calibration == "file:calib.txt"


def test_windows_never_span_documents():
    windows = prepare_calibration([torch.arange(10), torch.arange(5)], None, seq_len=4)
    assert [len(w) for w in windows.windows] == [4, 4, 2, 4, 1]
    assert prepare_calibration([torch.arange(10)], None, seq_len=4, max_tokens=6).num_tokens == 6


@pytest.mark.parametrize(
    "calibration, message",
    [
        ([], "empty"),
        (["   "], "empty"),
        (torch.arange(5), "fewer than one window"),
        ("/no/such/file.txt", "not found"),
        (3.5, "unsupported calibration"),
    ],
)
def test_bad_calibration(calibration, message):
    with pytest.raises(ShortGPTError, match=message):
        score_layers(tiny_model("llama"), calibration, tokenizer=object(), seq_len=16, progress=False)


def test_unknown_metric_and_json_roundtrip(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ShortGPTError, match="unknown metric"):
        score_layers(model, TOKENS, "magic")
    result = score_layers(model, TOKENS, seq_len=16, progress=False)
    result.to_json(tmp_path / "s.json")
    assert LayerScores.from_json(tmp_path / "s.json") == result
    assert LayerScores.from_json(result.to_json()) == result


def test_prune_by_scores_and_ratio_records_original_indices():
    model = tiny_model("llama")
    result = LayerScores("bi", [0.5, 0.1, 0.4, 0.05, 0.3, 0.9], NUM_LAYERS, 100, "test", 16)
    prune(model, ratio=0.34, scores=result)  # round(2.04) = 2 layers: 3 and 1
    record = model.config.shortgpt
    assert record["removed_layers"] == [1, 3] and record["metric"] == "bi"
    rescored = LayerScores("bi", [0.2, 0.9, 0.1, 0.8], 4, 100, "test", 16)
    prune(model, n_layers=1, scores=rescored)  # current 2 is original 4
    assert model.config.shortgpt["removed_layers"] == [1, 3, 4]
    assert model.config.shortgpt["layer_scores"] == [0.2, None, 0.9, None, 0.1, 0.8]
    with pytest.raises(ShortGPTError, match="cover 4 layers"):
        prune(model, n_layers=1, scores=rescored)
    with pytest.raises(ShortGPTError, match="removes zero"):
        prune(model, ratio=0.05, scores=LayerScores("bi", [0.1, 0.2, 0.3], 3))


def test_non_integer_layers_and_binary_calibration_are_refused(tmp_path):
    import numpy as np

    model = tiny_model("llama")
    for bad in ([1.5], [1.0], [True], ["2"]):
        with pytest.raises(ShortGPTError, match="layer indices must be integers"):
            prune(model, layers=bad)
    assert len(model.model.layers) == NUM_LAYERS, "a refused request leaves the model whole"
    prune(model, layers=[np.int64(1), torch.tensor(2)])  # integer types from numpy and torch are indices
    assert model.config.shortgpt["removed_layers"] == [1, 2]

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ShortGPTError, match="is not UTF-8 text"):
        prepare_calibration(binary, None, 16)


def test_plots_make_their_folder_and_leave_pyplot_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    scores = LayerScores("bi", [0.3, 0.1, 0.2, 0.5], num_layers=4, num_tokens=64)
    written = scores.plot(tmp_path / "new" / "deeper" / "bi.png", highlight=1)
    assert written.read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
