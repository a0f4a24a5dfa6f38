"""Tiny random models of many families, built from configs (no downloads).

Sizes are minimal but keep every per-layer mechanism switched on: sliding
windows smaller than the test sequences, alternating ``layer_types``, MoE with
dense layers in between, q/k norms, hybrid attention/recurrent stacks with at
least two attention layers. Norm weights are perturbed away from 1 so that a
layer made identity, or a norm applied twice, shows in the logits.

A key of ``FAMILIES`` is a ``model_type`` unless ``MODEL_TYPES`` maps it to
one (variants). Multimodal entries hold the outer config's kwargs, with
``text_config`` / ``vision_config`` dicts; ``NUM_LAYERS`` goes to the text
decoder.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

NUM_LAYERS = 6
COMMON = dict(
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
GPT_STYLE = dict(
    bos_token_id=1, eos_token_id=2, vocab_size=128, n_embd=32, n_head=4, n_positions=128
)  # gpt2-style names
MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2)
SSM2 = dict(mamba_n_heads=8, mamba_d_state=8, mamba_chunk_size=8)  # mamba2 mixers: 8 heads of 8, chunks < 14 tokens

S, F, L = "sliding_attention", "full_attention", "linear_attention"
SFS = [S, S, F] * 2  # two full layers among sliding ones
LAYERS_2_ATTN = [1, 4]  # hybrids: attention (or hybrid) blocks at 1 and 4, recurrent elsewhere
MIXED = [F if i in LAYERS_2_ATTN else L for i in range(NUM_LAYERS)]

# Multimodal pieces. Image/video special ids sit beyond the text vocab (128) so
# random input ids never hit them; text-only forwards never embed them.
IMAGE_IDS = dict(image_token_id=130)
SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=48,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
PIXTRAL = dict(
    model_type="pixtral",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    head_dim=8,
    image_size=32,
    patch_size=8,
)
QWEN_VL_IDS = dict(image_token_id=130, video_token_id=131, vision_start_token_id=132, vision_end_token_id=133)
QWEN_VL_TEXT = dict(
    COMMON,
    use_sliding_window=True,
    sliding_window=4,
    max_window_layers=3,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2]),
)  # mrope sections sum to head_dim/2
QWEN2_VL_VISION = dict(
    depth=1,
    embed_dim=32,
    hidden_size=32,
    num_heads=4,
    mlp_ratio=2,
    patch_size=8,
    spatial_merge_size=2,
    temporal_patch_size=2,
)

FAMILIES: dict[str, dict] = {
    "llama": dict(COMMON),
    "mistral": dict(COMMON, sliding_window=4),
    "qwen2": dict(COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=3),
    "qwen3": dict(COMMON, head_dim=8),
    "gemma2": dict(COMMON, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 3),
    "gemma3_text": dict(
        COMMON,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
    ),
    "phi3": dict(COMMON),
    "gpt2": dict(GPT_STYLE),
    "gpt_neox": dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, max_position_embeddings=128
    ),
    "opt": dict(
        vocab_size=128,
        hidden_size=32,
        ffn_dim=48,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
    ),
    "falcon": dict(
        vocab_size=128, hidden_size=32, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2
    ),
    "mixtral": dict(COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(
        COMMON,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[4],
    ),
    "qwen3_moe": dict(
        COMMON,
        head_dim=8,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[1, 3],
    ),
    "gpt_oss": dict(
        COMMON,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 3,
    ),
    # --- dense decoders ---
    "cohere": dict(COMMON, use_qk_norm=True, logit_scale=0.5),  # per-head q/k LayerNorm
    "cohere2": dict(COMMON, sliding_window=4, layer_types=SFS),  # sliding layers use RoPE, full layers none
    "olmo": dict(COMMON, clip_qkv=8.0),  # non-parametric LayerNorm: no norm weights to perturb
    "olmo2": dict(COMMON),  # q/k RMSNorm over all heads, post-norms
    "olmo3": dict(COMMON, sliding_window=4, layer_types=SFS),
    "granite": dict(
        COMMON, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0
    ),
    "stablelm": dict(COMMON, qk_layernorm=True, use_qkv_bias=True),  # partial rotary (0.25) by default
    "starcoder2": dict(COMMON, sliding_window=4),
    "phi": dict(COMMON, qk_layernorm=True, partial_rotary_factor=0.5),  # parallel attn/MLP block
    "gptj": dict(GPT_STYLE, n_inner=48, rotary_dim=4),  # rotary on half the head dim
    "bloom": dict(vocab_size=128, hidden_size=32, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),  # ALiBi
    "codegen": dict(GPT_STYLE, n_ctx=128, n_inner=48, rotary_dim=4),
    "gpt_bigcode": dict(GPT_STYLE, n_inner=48, multi_query=True),
    "smollm3": dict(
        COMMON, no_rope_layers=[1, 1, 0, 1, 1, 0], use_sliding_window=True, sliding_window=4
    ),  # 0 = NoPE layer (and sliding)
    "exaone4": dict(COMMON, sliding_window=4, layer_types=SFS),
    "glm4": dict(COMMON, head_dim=8),  # partial rotary 0.5, post-norms
    "ministral": dict(COMMON, head_dim=8, sliding_window=4, layer_types=[S, F] * 3),
    # --- MoE ---
    "granitemoe": dict(
        COMMON,
        num_local_experts=4,
        num_experts_per_tok=2,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=2.0,
    ),
    # MLA attention with a q LoRA; layer 0 dense (first_k_dense_replace), the rest MoE
    "deepseek_v2": dict(
        COMMON,
        **MOE,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
    ),
    "deepseek_v3": dict(
        COMMON,
        **MOE,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
    ),
    # MoE on odd layers; NoPE (no_rope_layers 0) on 2 and 5, chunked attention (chunk 4 < 14) on the RoPE layers
    "llama4_text": dict(
        COMMON,
        head_dim=8,
        intermediate_size_mlp=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        moe_layers=[1, 3, 5],
        no_rope_layers=[1, 1, 0, 1, 1, 0],
        attention_chunk_size=4,
    ),
    # --- hybrids (attention + recurrent layers) ---
    # gated DeltaNet layers with full attention at 1 and 4; MoE everywhere but layer 3 (mlp_only_layers)
    "qwen3_next": dict(
        COMMON,
        **MOE,
        head_dim=8,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=4,
        shared_expert_intermediate_size=16,
        mlp_only_layers=[3],
        layer_types=MIXED,
    ),
    "mamba": dict(
        vocab_size=128, hidden_size=32, state_size=8, bos_token_id=1, eos_token_id=2, pad_token_id=0
    ),  # attention-free
    # every layer runs attention and a mamba2 mixer in parallel (no pure-attention layers)
    "falcon_h1": dict(
        COMMON,
        **SSM2,
        mamba_d_ssm=64,
        mlp_multipliers=[1.5, 0.5],
        ssm_multipliers=[1.0, 0.5, 1.5, 1.0, 0.5],
        key_multiplier=0.7,
    ),
    # short-conv layers with attention at full_attn_idxs; no auto-rounding of the FFN size up to 256
    "lfm2": dict(COMMON, full_attn_idxs=LAYERS_2_ATTN, block_auto_adjust_ff_dim=False),
    "granitemoehybrid": dict(
        COMMON,
        **SSM2,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=16,
        layer_types=MIXED,
        position_embedding_type="rope",
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=2.0,
    ),
    # attention at i % 3 == 1 (1, 4), MoE at odd layers; pure-torch mamba path
    "jamba": dict(
        COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=3,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
    ),
    "bamba": dict(COMMON, **SSM2, attn_layer_indices=LAYERS_2_ATTN),
    # mamba2 layers; at 1, 3, 5 a shared transformer block runs first: 2 blocks used in turn, so layer 5's is tied
    # to layer 1's; per-hybrid-layer LoRA adapters (these need num_key_value_heads == num_attention_heads)
    "zamba2": dict(
        COMMON,
        num_key_value_heads=4,
        n_mamba_heads=4,
        mamba_d_state=8,
        chunk_size=8,
        layers_block_type=[L, "hybrid"] * 3,
        num_mem_blocks=2,
        use_shared_attention_adapter=True,
        adapter_rank=4,
        use_mem_rope=True,
    ),
    # --- vision-language (NUM_LAYERS go to text_config) ---
    "gemma3": dict(
        **IMAGE_IDS,
        boi_token_index=131,
        eoi_token_index=132,
        mm_tokens_per_image=4,
        text_config=dict(COMMON, model_type="gemma3_text", head_dim=8, sliding_window=4, layer_types=SFS),
        vision_config=SIGLIP,
    ),
    "llava": dict(**IMAGE_IDS, text_config=dict(COMMON, model_type="llama"), vision_config=CLIP),
    "mistral3": dict(
        **IMAGE_IDS,
        spatial_merge_size=2,
        text_config=dict(COMMON, model_type="mistral", head_dim=8, sliding_window=4),
        vision_config=PIXTRAL,
    ),
    "qwen2_vl": dict(**QWEN_VL_IDS, text_config=QWEN_VL_TEXT, vision_config=QWEN2_VL_VISION),
    "qwen2_vl_deep_vision": dict(
        **QWEN_VL_IDS, text_config=QWEN_VL_TEXT, vision_config=dict(QWEN2_VL_VISION, depth=NUM_LAYERS)
    ),  # as many vision blocks as text layers
    # vision blocks use windowed attention except fullatt_block_indexes
    "qwen2_5_vl": dict(
        **QWEN_VL_IDS,
        text_config=QWEN_VL_TEXT,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=32,
            patch_size=8,
            spatial_merge_size=2,
            window_size=32,
            fullatt_block_indexes=[1],
        ),
    ),
}
MODEL_TYPES = {"qwen2_vl_deep_vision": "qwen2_vl"}  # FAMILIES keys that are not a model_type
N_LAYER = {"gpt2", "gptj", "bloom", "codegen", "gpt_bigcode"}  # configs whose layer count is `n_layer`


# The removal the family matrix checks: the first, a middle and the last layer, except where a
# layout needs another choice to stay expressible. jamba: attention at 1, 4 and MoE at 1, 3, 5
# become attention at 0, 2 and MoE at 0, 3. zamba2: hybrid layer 3 goes, so hybrids 1 and 5, whose
# shared blocks are tied, become 0 and 3 (num_mem_blocks 2 -> 1) and every adapter slot moves.
REMOVE = [0, 2, NUM_LAYERS - 1]
REMOVE_FOR = {"jamba": [0, 3], "zamba2": [0, 3]}


def removal(family: str) -> list[int]:
    return REMOVE_FOR.get(family, REMOVE)


def tiny_config(family: str):
    model_type = MODEL_TYPES.get(family, family)
    kwargs = copy.deepcopy(FAMILIES[family])  # configs may edit nested dicts/lists shared between entries
    if "text_config" in kwargs:
        kwargs["text_config"]["num_hidden_layers"] = NUM_LAYERS
    else:
        kwargs["n_layer" if model_type in N_LAYER else "num_hidden_layers"] = NUM_LAYERS
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_auto(config):
    """The Auto class this config maps to: text models are causal LMs, vision-language ones image-text-to-text."""
    return AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForImageTextToText


def tiny_model(family: str, seed: int = 0):
    """A tiny fp32 model in eval mode, with norm weights perturbed away from 1."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = "eager"
    model = tiny_auto(config).from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids ("t3 t17 ..."), for the
    entry points that need one (pipeline, AutoPeftModel); no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, COMMON["vocab_size"])}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
