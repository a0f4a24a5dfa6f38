"""ShortGPT's central claim on a real model (SmolLM2-135M, 30 layers): removing the
8 lowest-Block-Influence layers hurts held-out perplexity far less than removing
8 random layers, the last 8 or the first 8. Perplexity is measured on plays that
were never used for calibration. Slow-ish: ~1 minute on 2 CPU cores."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortgpt_hf import perplexity, prune, score_layers

N = 8
PPL = dict(seq_len=256, max_tokens=4096)


@pytest.fixture(scope="module")
def outcomes(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)

    def fresh():
        return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()

    dense = fresh()
    results = {"dense": perplexity(dense, tok, **PPL)}
    choices = {"bi": score_layers(dense, tokenizer=tok, max_tokens=4096, progress=False)}
    for metric in ("sequential", "reverse"):
        choices[metric] = score_layers(dense, metric=metric)
    for seed in range(3):
        choices[f"random{seed}"] = score_layers(dense, metric="random", seed=seed)
    for name, scores in choices.items():
        model = fresh()
        prune(model, n_layers=N, scores=scores, verify=True)
        results[name] = perplexity(model, tok, **PPL)
    return results


def test_bi_beats_every_baseline(outcomes):
    print(outcomes)
    bi = outcomes["bi"]
    assert outcomes["dense"] < bi
    for name, value in outcomes.items():
        if name not in ("dense", "bi"):
            assert bi < value, f"BI ({bi:.1f}) should beat {name} ({value:.1f})"


def test_bi_margin_is_large(outcomes):
    """Not a coin flip: the best baseline is at least twice as perplexed as BI."""
    baselines = [v for k, v in outcomes.items() if k not in ("dense", "bi")]
    assert min(baselines) > 2 * outcomes["bi"]
