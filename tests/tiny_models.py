"""Tiny random models of many families, built from configs (no downloads).

Sizes are minimal but keep every per-layer mechanism switched on: sliding
windows smaller than the test sequences, alternating ``layer_types``, MoE with
dense layers in between, q/k norms. Norm weights are perturbed away from 1 so
that a layer made identity, or a norm applied twice, shows in the logits.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

NUM_LAYERS = 6
COMMON = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

FAMILIES: dict[str, dict] = {
    "llama": dict(COMMON),
    "mistral": dict(COMMON, sliding_window=4),
    "qwen2": dict(COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=3),
    "qwen3": dict(COMMON, head_dim=8),
    "gemma2": dict(COMMON, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 3),
    "gemma3_text": dict(COMMON, head_dim=8, sliding_window=4, layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]),
    "phi3": dict(COMMON),
    "gpt2": dict(bos_token_id=1, eos_token_id=2, vocab_size=128, n_embd=32, n_head=4, n_positions=128),
    "gpt_neox": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, max_position_embeddings=128),
    "opt": dict(vocab_size=128, hidden_size=32, ffn_dim=48, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128),
    "falcon": dict(vocab_size=128, hidden_size=32, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
    "mixtral": dict(COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[4]),
    "qwen3_moe": dict(COMMON, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1, 3]),
    "gpt_oss": dict(COMMON, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 3),
}


def tiny_config(family: str):
    kwargs = dict(FAMILIES[family])
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    kwargs[key] = NUM_LAYERS
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0):
    """A tiny fp32 model in eval mode, with norm weights perturbed away from 1."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model
