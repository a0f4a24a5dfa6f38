"""ShortGPT-gen: skip chosen layers while the prompt is processed, run all of them to decode.

A skipped layer returns its input unchanged during a multi-token forward, but
still writes the keys and values its own attention would have written (input
norm, k/v projections, the family's k-norm, rotary embedding at the right
positions), so every later token can attend to the prompt at that layer. The
reference code forgets the rotary embedding on those keys; here it comes from
the family's own ``apply_rotary_pos_emb``.

Boundary handling (POP, arXiv 2602.03295), on by default: the last prompt
token is not part of the skipped prefill but runs through the full model as
the first decode step, so the first generated token comes from the dense model.

Without a cache (``use_cache=False``) a multi-token forward simply skips the
layers, which is exactly the statically pruned model.

Both behaviours are installed by replacing the ``forward`` of the skipped
layers and of the model on the instances (the attribute accelerate's hooks
call, when the model is dispatched), so the state dict, ``save_pretrained``
and ``generate`` are untouched.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import ShortGPTConfig, tag_pruned
from .errors import InvalidRequest, UnsupportedModel
from .families import FAMILIES, describe, is_vision_language
from .layers import count_parameters, find_decoder_layers, text_config
from .sources import recorded_name

# The families whose skipped-layer K/V writing is known and tested (their ``prefill_kv`` entry).
SUPPORTED_FAMILIES = tuple(k for k, family in FAMILIES.items() if family.prefill_kv is not None)
_LAYER_ARGS = ("attention_mask", "position_ids", "cache", "use_cache", "position_embeddings")
_STATE = "_shortgpt_prefill_skip"


def _patch(module: nn.Module, replacement) -> None:
    """Route ``module``'s forward through ``replacement(original, *args, **kwargs)``."""
    attr = "_old_forward" if hasattr(module, "_old_forward") else "forward"  # accelerate calls _old_forward
    original = getattr(module, attr)
    wrapped = functools.wraps(original)(
        functools.partial(replacement, original)
    )  # keeps the signature generate inspects
    module._shortgpt_original_forward = (attr, original, "forward" in vars(module) and attr == "forward")
    setattr(module, attr, wrapped)


def _unpatch(module: nn.Module) -> None:
    attr, original, was_instance_attr = module._shortgpt_original_forward
    if attr == "forward" and not was_instance_attr:
        del module.forward
    else:
        setattr(module, attr, original)
    del module._shortgpt_original_forward


def write_skipped_kv(
    layer: nn.Module, hidden_states: torch.Tensor, cache: Any, position_embeddings: Any, **kwargs: Any
) -> None:
    """Write into ``cache`` the K/V that ``layer``'s attention would write for this input."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_states)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    if FAMILIES[attn.config.model_type].prefill_kv == "qkv_proj":  # fused projections: [q | k | v]
        qkv = attn.qkv_proj(x)
        q_size = attn.config.num_attention_heads * attn.head_dim
        kv_size = attn.config.num_key_value_heads * attn.head_dim
        key, value = qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
    else:
        key, value = attn.k_proj(x), attn.v_proj(x)
    key = key.view(shape)
    if getattr(attn, "k_norm", None) is not None:  # Qwen3, Gemma3: RMSNorm over head_dim
        key = attn.k_norm(key)
    key, value = key.transpose(1, 2), value.view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    _, key = rotate(key, key, cos, sin)
    cache.update(key, value, attn.layer_idx, kwargs=kwargs)


def _skipping_layer_forward(original, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
    if args or hidden_states.shape[1] == 1:  # decode step (or an unexpected call shape): the real layer
        return original(hidden_states, *args, **kwargs)
    cache = kwargs.get("cache")
    if cache is not None and kwargs.get("use_cache", True):
        extra = {k: v for k, v in kwargs.items() if k not in _LAYER_ARGS}
        write_skipped_kv(original.__self__, hidden_states, cache, kwargs["position_embeddings"], **extra)
    return hidden_states


def _boundary_forward(
    original,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    cache=None,
    inputs_embeds=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    """Prefill all but the last prompt token with skipping, then run the last token
    through the full model as the first decode step."""
    model = original.__self__
    tokens = input_ids if input_ids is not None else inputs_embeds
    use_cache = model.config.use_cache if use_cache is None else use_cache
    call = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kwargs)
    if not use_cache or tokens.shape[1] < 2:
        return original(
            input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, logits_to_keep=logits_to_keep, **call
        )
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)

    def part(t, sl):  # ids, embeddings and position ids are (batch, seq, ...)
        return None if t is None else t[:, sl]

    def mask(sl):  # 2-D: (batch, past + seq), the last column is the last token; 4-D: (batch, 1, seq, kv)
        if attention_mask is None or attention_mask.dim() == 4:
            return None if attention_mask is None else attention_mask[:, :, sl]
        return attention_mask if sl is tail else attention_mask[:, sl]

    head, tail = slice(None, -1), slice(-1, None)
    first = original(
        input_ids=part(input_ids, head),
        inputs_embeds=part(inputs_embeds, head),
        cache=cache,
        logits_to_keep=logits_to_keep,
        **dict(call, attention_mask=mask(head), position_ids=part(position_ids, head)),
    )
    last = original(
        input_ids=part(input_ids, tail),
        inputs_embeds=part(inputs_embeds, tail),
        cache=first.cache,
        logits_to_keep=logits_to_keep,
        **dict(call, attention_mask=mask(tail), position_ids=part(position_ids, tail)),
    )
    logits = torch.cat([first.logits, last.logits], dim=1)
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        logits = logits[:, -logits_to_keep:]
    last.logits = logits
    return last


def check_prefill_skip(model: nn.Module) -> None:
    """Refuse a model whose family has no known way to write a skipped layer's K/V (cheap: before scoring)."""
    cfg = text_config(model)
    if is_vision_language(model.config):
        # The boundary step re-runs the last prompt token alone, which would
        # separate image tokens from their pixels.
        raise UnsupportedModel(
            f"prefill skipping supports text-only models; {describe(model)} is a vision-language model"
        )
    if cfg.model_type not in SUPPORTED_FAMILIES:
        names = ", ".join(FAMILIES[k].name for k in SUPPORTED_FAMILIES)
        raise UnsupportedModel(f"prefill skipping supports {names}; {describe(model)} is not supported")


def enable_prefill_skip(model: nn.Module, layers: Sequence[int], boundary: bool = True) -> nn.Module:
    """Skip ``layers`` (current indices) during prefill only; record it in ``config.shortgpt``.

    The model keeps all its layers (and weights): this trades prompt-processing
    time for quality on generative tasks, where static removal hurts most.
    """
    check_prefill_skip(model)
    cfg = text_config(model)
    previous = ShortGPTConfig.from_model(model)
    if previous is not None and previous.mode == "remove":
        raise InvalidRequest("prefill skipping needs a model with all its layers; this one has layers removed")
    disable_prefill_skip(model)
    found = find_decoder_layers(model)
    requested = [int(i) for i in layers]
    chosen = sorted(set(requested))
    if len(chosen) != len(requested) or any(not 0 <= i < len(found.layers) for i in chosen):
        raise InvalidRequest(
            f"prefill-skip layers must be distinct indices in 0..{len(found.layers) - 1}, got {requested}"
        )
    if len(chosen) >= len(found.layers):
        raise InvalidRequest("cannot skip every layer")
    for i in chosen:
        _patch(found.layers[i], _skipping_layer_forward)
    if boundary:
        _patch(model, _boundary_forward)
    setattr(model, _STATE, (chosen, boundary))
    record = previous
    if record is None:
        base, revision = recorded_name(model.name_or_path)
        record = ShortGPTConfig(
            removed_layers=chosen,
            original_num_hidden_layers=len(found.layers),
            model_type=cfg.model_type,
            base_model_name_or_path=base,
            base_revision=revision,
            original_num_parameters=count_parameters(model),
        )
    record.removed_layers, record.mode, record.prefill_boundary = chosen, "prefill_skip", boundary
    model.config.shortgpt = ShortGPTConfig.from_dict(record.to_dict()).to_dict()
    tag_pruned(model)
    return model


def disable_prefill_skip(model: nn.Module) -> nn.Module:
    """Undo `enable_prefill_skip`: every layer runs on every forward again."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    chosen, boundary = state
    layers = find_decoder_layers(model).layers
    for i in chosen:
        _unpatch(layers[i])
    if boundary:
        _unpatch(model)
    delattr(model, _STATE)
    vars(model.config).pop("shortgpt", None)
    return model
