"""What each model family needs when layers are removed, kept as data.

Removing a decoder layer is the same operation in every family, but the
config says different things about layers in each: some fields have one entry
per layer (sliced), some hold layer indices (renumbered), some are thresholds
("the first k layers are dense": recounted), some place layer kinds by
arithmetic (``i % period == offset``: refitted, or refused when the kept
layers no longer follow any such pattern). A few families build modules from
layer indices when they are constructed, and must rebuild them. This module
says all of that per ``model_type`` (the text decoder's), one small
declarative entry per architecture; `surgery` applies it and knows no family
by name.

A family missing from the table is not refused: removal falls back to a
generic rule (every config list as long as the layer count is per-layer;
every index list, threshold, arithmetic layout and refusal the table knows
under a field name is honoured wherever that field exists) and says so in a
log warning, because that rule can be wrong for a family nobody checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UnsupportedModel
from .registry import Registry

logger = logging.getLogger("shortgpt_hf")


@dataclass(frozen=True)
class Periodic:
    """A layer kind placed by arithmetic instead of a list.

    Layer ``i`` is of ``kind`` iff ``i % period == offset``; with ``offset=None``
    iff ``(i + 1) % period == 0`` (Qwen-MoE's ``decoder_sparse_step``). Layers
    listed in ``excluded`` never are, and none are when ``requires(cfg)`` is false
    (a model configured without experts has no MoE layers to place).

    On removal the kept layers must keep their kinds. With ``excluded`` the
    pattern is made explicit: ``period`` becomes 1 and every kept layer not of
    ``kind`` is listed in ``excluded``. Without it, the smallest period and
    offset that reproduce the kept layers' kinds are searched for, and removal
    is refused, before the model is touched, when none exists.
    """

    kind: str
    period: str
    offset: str | None = None
    excluded: str | None = None
    requires: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        if self.offset is None and self.excluded is None:
            raise ValueError(f"Periodic({self.period!r}) needs an offset field or an excluded list to refit")

    def members(self, cfg: Any, num_layers: int) -> list[bool]:
        """Which of the first ``num_layers`` layers are of ``kind`` under the config as it is now."""
        if self.requires is not None and not self.requires(cfg):
            return [False] * num_layers
        period = getattr(cfg, self.period) or 1
        excluded = set(getattr(cfg, self.excluded, None) or []) if self.excluded else set()
        if self.offset is None:
            return [(i + 1) % period == 0 and i not in excluded for i in range(num_layers)]
        offset = getattr(cfg, self.offset)
        return [i % period == offset and i not in excluded for i in range(num_layers)]

    def refit(self, cfg: Any, kept: list[int], name: str) -> dict[str, Any]:
        """The field values that describe the kept layers' kinds; `ShortGPTError` if none can."""
        old = self.members(cfg, cfg.num_hidden_layers)
        wanted = [old[i] for i in kept]
        if self.excluded is not None:
            return {self.period: 1, self.excluded: [j for j, member in enumerate(wanted) if not member]}
        n = len(kept)
        for period in range(1, n + 2):  # period n + 1 with offset n: no layer of this kind is left
            for offset in range(period):
                if [j % period == offset for j in range(n)] == wanted:
                    return {self.period: period, self.offset: offset}
        positions = [j for j, member in enumerate(wanted) if member]
        raise UnsupportedModel(
            f"{name}: after this removal the {self.kind} layers would sit at new positions {positions}, "
            f"which {self.period}/{self.offset} (layer i is {self.kind} iff i % period == offset) cannot describe; "
            "choose layers that keep the pattern periodic"
        )


@dataclass(frozen=True)
class Refusal:
    """A configuration whose per-layer behaviour cannot survive renumbering."""

    field: str
    reason: str
    applies: Callable[[Any], bool] = lambda value: bool(value)

    def check(self, cfg: Any, name: str) -> None:
        value = getattr(cfg, self.field, None)
        if value is not None and self.applies(value):
            raise UnsupportedModel(f"{name} has {self.field}={value!r}: {self.reason}")


@dataclass(frozen=True)
class Fold:
    """Where a linear map that stands in for a removed gap can be folded: the update
    that the last kept layer before the gap adds to the residual stream.

    ``output`` is the submodule of a decoder layer whose output is that update.
    With ``diagonal=False`` it is linear in the weights named ``weights`` under
    it (every ``nn.Linear`` of that name, and stacked expert tensors of that
    name laid out ``[experts, out, in]``): a full map ``T`` becomes ``W' = TᵀW``
    for each of them, so dense MLPs, every expert and any shared expert all
    carry it, and the router's weighting commutes with it. With
    ``diagonal=True`` the update ends in a norm that scales by
    ``(norm_offset + w)``: only a per-channel map fits there, folded as
    ``w' = (norm_offset + w)·t - norm_offset``.
    """

    output: str = "mlp"
    weights: str = "down_proj"
    diagonal: bool = False
    norm_offset: float = 0.0


_DOWN_PROJ = Fold()
_GEMMA_NORM = Fold("post_feedforward_layernorm", weights="weight", diagonal=True, norm_offset=1.0)


@dataclass(frozen=True)
class Family:
    """Everything removal must know about one decoder family (keyed by the text config's ``model_type``).

    ``attention_layers`` names, for hybrid families, the config list and the
    values that mark a layer with a KV cache: transformers cannot decode with
    a cache when only recurrent layers are left, so a removal must keep one.
    ``prefill_kv`` says how ShortGPT-gen writes a skipped layer's keys and
    values: ``"k_proj/v_proj"`` (separate projections) or ``"qkv_proj"`` (one
    fused projection, ``[q | k | v]``); ``None`` means prefill skipping is not
    supported for the family. ``rebuild`` re-runs construction-time code that
    reads layer indices from the config, after the config has been fixed.
    ``decode_tolerance`` widens the cached-vs-uncached check for a family
    whose own decode path is inexact even before any layer is removed.
    ``partial_load=False`` marks a family whose construction reads every
    layer (weight ties or initialisation that reach into removed layers):
    a recipe then loads the whole base and removes layers afterwards.
    ``fold`` says where training-free linear repair puts its maps (`Fold`);
    ``None`` means that repair is refused for the family.
    """

    name: str
    layers: str = "layers"
    per_layer: tuple[str, ...] = ()
    layer_indices: tuple[str, ...] = ()
    thresholds: tuple[str, ...] = ()
    periodic: tuple[Periodic, ...] = ()
    reset: dict[str, Any] = field(default_factory=dict)
    refusals: tuple[Refusal, ...] = ()
    attention_layers: tuple[str, tuple[str, ...]] | None = None
    prefill_kv: str | None = None
    rebuild: Callable[[nn.Module, nn.Module, list[int]], None] | None = None
    decode_tolerance: float | None = None
    partial_load: bool = True
    fold: Fold | None = None

    def check_keeps_attention(self, cfg: Any, kept: list[int], name: str) -> None:
        """Refuse a removal that leaves a hybrid without any layer a KV cache can serve."""
        if self.attention_layers is None:
            return
        key, values = self.attention_layers
        kinds = list(getattr(cfg, key))
        if not any(kinds[i] in values for i in kept):
            positions = [i for i, kind in enumerate(kinds) if kind in values]
            raise UnsupportedModel(
                f"{name}: this removal keeps none of its attention layers {positions} ({key}), and transformers "
                "cannot decode a hybrid model with only recurrent layers; keep at least one"
            )


# ---------------------------------------------------------------------------
# Construction-time state that names layer indices.


def _rebuild_zamba2(model: nn.Module, decoder: nn.Module, kept: list[int]) -> None:
    """Zamba2 runs a few shared transformer blocks inside its hybrid layers.

    At construction (``get_layers``) it gives each hybrid layer a block id
    (hybrid ordinal mod ``num_mem_blocks``), per-hybrid-layer adapter slots, a
    ``{layer index: hybrid ordinal}`` table, and ties the blocks' weights under
    keys that name layer indices. All of it is rebuilt here from the fixed
    config, on the meta device, and filled with the kept blocks' own weights.
    Removing a hybrid layer shifts the ordinals after it, so ``num_mem_blocks``
    becomes the smallest cycle under which every pair of blocks it ties was
    tied before. That is exact, but may tie fewer blocks than before (at worst
    none), which makes the checkpoint larger, never wrong.
    """
    import torch
    from transformers.models.zamba2.modeling_zamba2 import Zamba2HybridLayer

    cfg = model.config.get_text_config(decoder=True)
    layers = list(decoder.layers)
    hybrid = [i for i, layer in enumerate(layers) if isinstance(layer, Zamba2HybridLayer)]
    old_blocks = [layers[i].shared_transformer for i in hybrid]
    ordinal = [block.feed_forward.layer_dic[kept[i]] for block, i in zip(old_blocks, hybrid, strict=True)]
    tie_class = [block.block_id for block in old_blocks]
    if getattr(cfg, "tie_word_embeddings", False):  # Zamba2 ties its blocks only alongside the embeddings
        cfg.num_mem_blocks = next(
            m for m in range(1, len(hybrid) + 1) if all(tie_class[j] == tie_class[j % m] for j in range(len(hybrid)))
        )
    decoder.layers_block_type = list(cfg.layers_block_type)
    with torch.device("meta"):
        fresh = decoder.get_layers()  # also rebuilds decoder._tied_weights_keys
    for j, i in enumerate(hybrid):
        block = fresh[i].shared_transformer
        before = dict(old_blocks[j].named_parameters())
        state = {k: v for k, v in old_blocks[j].state_dict().items() if "adapter_list." not in k}
        for key in block.state_dict():
            if "adapter_list." in key:  # slot s serves the s-th kept hybrid layer: take that layer's own adapter
                head, rest = key.split("adapter_list.", 1)
                slot, tail = rest.split(".", 1)
                state[key] = old_blocks[int(slot)].state_dict()[f"{head}adapter_list.{ordinal[int(slot)]}.{tail}"]
        block.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        for name, param in block.named_parameters():
            param.requires_grad_(before[name].requires_grad if name in before else True)
        layers[i].shared_transformer = block
    # Tie the blocks the new config ties, and nothing else (the LM head stays as it is).
    for source, target in decoder._tied_weights_keys.items():
        shared, tied = decoder.get_submodule(target), decoder.get_submodule(source)
        for name, param in shared.named_parameters():
            owner, _, leaf = name.rpartition(".")
            setattr(tied.get_submodule(owner) if owner else tied, leaf, param)
    decoder.all_tied_weights_keys = decoder.get_expanded_tied_weights_keys(all_submodels=False)
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


# ---------------------------------------------------------------------------
# The table.

_LAYER_TYPES = ("layer_types",)
_ATTENTION_TYPES = ("layer_types", ("full_attention", "sliding_attention"))
_ATTENTION_BLOCKS = ("layers_block_type", ("attention",))
_QWEN_MOE = Periodic(
    "MoE",
    "decoder_sparse_step",
    excluded="mlp_only_layers",
    requires=lambda cfg: (getattr(cfg, "num_experts", 0) or 0) > 0,
)

FAMILIES: Registry[Family] = Registry("model family")  # by the text config's model_type
FAMILIES.add("llama", Family("Llama", prefill_kv="k_proj/v_proj", fold=_DOWN_PROJ))
FAMILIES.add("mistral", Family("Mistral", per_layer=_LAYER_TYPES, prefill_kv="k_proj/v_proj", fold=_DOWN_PROJ))
FAMILIES.add(
    "qwen2",
    Family(
        "Qwen2", per_layer=_LAYER_TYPES, thresholds=("max_window_layers",), prefill_kv="k_proj/v_proj", fold=_DOWN_PROJ
    ),
)
FAMILIES.add(
    "qwen3",
    Family(
        "Qwen3", per_layer=_LAYER_TYPES, thresholds=("max_window_layers",), prefill_kv="k_proj/v_proj", fold=_DOWN_PROJ
    ),
)
FAMILIES.add("gemma2", Family("Gemma2", per_layer=_LAYER_TYPES, prefill_kv="k_proj/v_proj", fold=_GEMMA_NORM))
FAMILIES.add("gemma3_text", Family("Gemma3", per_layer=_LAYER_TYPES, prefill_kv="k_proj/v_proj", fold=_GEMMA_NORM))
FAMILIES.add("phi3", Family("Phi3", per_layer=_LAYER_TYPES, prefill_kv="qkv_proj", fold=_DOWN_PROJ))
FAMILIES.add(
    "gpt2",
    Family(
        "GPT-2",
        layers="h",
        refusals=(
            Refusal(
                "scale_attn_by_inverse_layer_idx",
                "each layer's attention scale is fixed by its original index, which a pruned checkpoint cannot express",
            ),
        ),
    ),
)
FAMILIES.add("gpt_neox", Family("GPT-NeoX"))
FAMILIES.add("opt", Family("OPT"))
FAMILIES.add("falcon", Family("Falcon", layers="h"))
FAMILIES.add("mixtral", Family("Mixtral", per_layer=_LAYER_TYPES, fold=_DOWN_PROJ))
FAMILIES.add(
    "qwen2_moe",
    Family(
        "Qwen2-MoE", per_layer=_LAYER_TYPES, thresholds=("max_window_layers",), periodic=(_QWEN_MOE,), fold=_DOWN_PROJ
    ),
)
FAMILIES.add(
    "qwen3_moe",
    Family(
        "Qwen3-MoE", per_layer=_LAYER_TYPES, thresholds=("max_window_layers",), periodic=(_QWEN_MOE,), fold=_DOWN_PROJ
    ),
)
FAMILIES.add("gpt_oss", Family("GPT-OSS", per_layer=_LAYER_TYPES))
FAMILIES.add("cohere", Family("Cohere"))
FAMILIES.add("cohere2", Family("Cohere2", per_layer=_LAYER_TYPES))
FAMILIES.add("olmo", Family("OLMo"))
FAMILIES.add("olmo2", Family("OLMo2"))
FAMILIES.add("olmo3", Family("OLMo3", per_layer=_LAYER_TYPES))
FAMILIES.add("granite", Family("Granite"))
FAMILIES.add("granitemoe", Family("GraniteMoE"))
FAMILIES.add("stablelm", Family("StableLM"))
FAMILIES.add("starcoder2", Family("Starcoder2"))
FAMILIES.add("phi", Family("Phi"))
FAMILIES.add("gptj", Family("GPT-J", layers="h"))
FAMILIES.add("bloom", Family("BLOOM", layers="h"))
FAMILIES.add("codegen", Family("CodeGen", layers="h"))
FAMILIES.add("gpt_bigcode", Family("GPTBigCode", layers="h"))
FAMILIES.add("glm4", Family("GLM-4"))
FAMILIES.add("ministral", Family("Ministral", per_layer=_LAYER_TYPES, fold=_DOWN_PROJ))
FAMILIES.add("exaone4", Family("EXAONE 4", per_layer=_LAYER_TYPES))
FAMILIES.add("smollm3", Family("SmolLM3", per_layer=("layer_types", "no_rope_layers"), fold=_DOWN_PROJ))
FAMILIES.add(
    "llama4_text", Family("Llama 4", per_layer=("layer_types", "no_rope_layers"), layer_indices=("moe_layers",))
)
FAMILIES.add(
    "deepseek_v2",
    Family(
        "DeepSeek-V2",
        thresholds=("first_k_dense_replace",),
        refusals=(
            Refusal(
                "moe_layer_freq",
                "MoE layers are placed every moe_layer_freq layers, which removal cannot renumber",
                lambda freq: freq != 1,
            ),
        ),
    ),
)
# Multi-token-prediction layers are keyed after the last layer; a pruned model has nothing there.
FAMILIES.add(
    "deepseek_v3", Family("DeepSeek-V3", thresholds=("first_k_dense_replace",), reset={"num_nextn_predict_layers": 0})
)
FAMILIES.add(
    "qwen3_next", Family("Qwen3-Next", per_layer=_LAYER_TYPES, periodic=(_QWEN_MOE,), attention_layers=_ATTENTION_TYPES)
)
FAMILIES.add(
    "qwen2_vl_text",
    Family("Qwen2-VL text decoder", per_layer=_LAYER_TYPES, thresholds=("max_window_layers",), fold=_DOWN_PROJ),
)
FAMILIES.add(
    "qwen2_5_vl_text",
    Family("Qwen2.5-VL text decoder", per_layer=_LAYER_TYPES, thresholds=("max_window_layers",), fold=_DOWN_PROJ),
)
FAMILIES.add("mamba", Family("Mamba"))
FAMILIES.add("falcon_h1", Family("Falcon-H1", partial_load=False))  # its weight init reads every layer's mamba mixer
FAMILIES.add(
    "lfm2", Family("LFM2", per_layer=_LAYER_TYPES, layer_indices=("full_attn_idxs",), attention_layers=_ATTENTION_TYPES)
)
FAMILIES.add("granitemoehybrid", Family("GraniteMoE-Hybrid", per_layer=_LAYER_TYPES, attention_layers=_ATTENTION_TYPES))
FAMILIES.add(
    "jamba",
    Family(
        "Jamba",
        periodic=(
            Periodic("attention", "attn_layer_period", "attn_layer_offset"),
            Periodic(
                "MoE",
                "expert_layer_period",
                "expert_layer_offset",
                requires=lambda cfg: (getattr(cfg, "num_experts", 1) or 1) > 1,
            ),
        ),
        attention_layers=_ATTENTION_BLOCKS,
    ),
)
FAMILIES.add(
    "bamba",
    Family(
        "Bamba",
        layer_indices=("attn_layer_indices",),
        attention_layers=_ATTENTION_TYPES,
        # Bamba's pure-PyTorch Mamba2 single-token step differs from its chunked scan by ~1e-3 (logits of
        # magnitude 0.5) in an unpruned tiny model; the check would otherwise fail on transformers, not on us.
        decode_tolerance=5e-3,
    ),
)
FAMILIES.add(
    "zamba2",
    Family(
        "Zamba2",
        per_layer=("layers_block_type",),
        layer_indices=("hybrid_layer_ids",),
        attention_layers=("layers_block_type", ("hybrid",)),
        rebuild=_rebuild_zamba2,
        partial_load=False,  # its shared blocks are stored once, under the first hybrid layer that uses them
    ),
)
FAMILIES.add(
    "gemma3n_text",
    Family(
        "Gemma3n",
        refusals=(
            Refusal(
                "num_kv_shared_layers", "its last layers reuse earlier layers' KV caches, which removal would break"
            ),
        ),
    ),
)

# Vision-language models whose text decoder we prune (outer ``model_type``: name).
# The decoder itself is looked up in FAMILIES by its own ``model_type``.
VISION_LANGUAGE: dict[str, str] = {
    "gemma3": "Gemma 3 (vision-language)",
    "llava": "LLaVA",
    "mistral3": "Mistral 3 (vision-language)",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
}

# Refusals for fields no family in the table has, checked only by the fallback.
_FALLBACK_REFUSALS = (
    Refusal(
        "kv_source_layers",
        "some layers read other layers' KV caches, which removal would break",
        lambda value: list(value) != list(range(len(value))),
    ),
)
_NOT_PER_LAYER = ("eos_token_id", "bos_token_id", "pad_token_id", "architectures")
_warned: set[str] = set()


def _unique(items: Any) -> tuple:
    return tuple(dict.fromkeys(items))


def family_of(cfg: Any) -> Family:
    """The table entry for a text config, or the logged generic fallback for an unknown family.

    The fallback applies every rule the table knows by field name wherever
    this config has that field (index lists, thresholds, arithmetic layouts,
    resets, refusals), and treats every other list as long as the layer
    count as per-layer.
    """
    known = FAMILIES.get(cfg.model_type)
    if known is not None:
        return known
    entries = list(FAMILIES.values())

    def has(key: str | None) -> bool:  # an absent field name (None) never stops a rule
        return key is None or hasattr(cfg, key)

    indices = _unique(k for f in entries for k in f.layer_indices if has(k))
    periodic = _unique(p for f in entries for p in f.periodic if has(p.period) and has(p.offset) and has(p.excluded))
    owned = set(indices) | {p.excluded for p in periodic} | set(_NOT_PER_LAYER)
    n = cfg.num_hidden_layers
    per_layer = tuple(
        k
        for k, v in vars(cfg).items()
        if isinstance(v, (list, tuple)) and len(v) == n and not k.startswith("_") and k not in owned
    )
    if cfg.model_type not in _warned:
        _warned.add(cfg.model_type)
        logger.warning(
            "shortgpt_hf has no entry for model_type %r; treating %s as per-layer. "
            "Check the result with prune(verify=True).",
            cfg.model_type,
            ", ".join(per_layer) or "no config field",
        )
    return Family(
        cfg.model_type,
        per_layer=per_layer,
        layer_indices=indices,
        thresholds=_unique(k for f in entries for k in f.thresholds if has(k)),
        periodic=periodic,
        reset={k: v for f in entries for k, v in f.reset.items() if has(k)},
        refusals=_unique(r for f in entries for r in f.refusals) + _FALLBACK_REFUSALS,
    )


def is_vision_language(config: Any) -> bool:
    """A model whose text decoder has a config of its own, beside a vision tower's."""
    return config.get_text_config(decoder=True) is not config


def describe_config(config: Any, class_name: str) -> str:
    """``"Llama (LlamaForCausalLM)"``, ``"LLaVA (LlavaForConditionalGeneration)"``: how errors name a model."""
    cfg = config.get_text_config(decoder=True)
    known = FAMILIES.get(cfg.model_type)
    name = VISION_LANGUAGE.get(config.model_type) or (known.name if known else cfg.model_type)
    return f"{name} ({class_name})"


def describe(model: nn.Module) -> str:
    return describe_config(model.config, type(model).__name__)


def auto_class(config: Any) -> type:
    """The transformers Auto class that loads this config: ``AutoModelForImageTextToText``
    for vision-language models (Gemma 3 maps to both; this is the one that names it),
    ``AutoModelForCausalLM`` for text models."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    order = (
        (AutoModelForImageTextToText, AutoModelForCausalLM) if is_vision_language(config) else (AutoModelForCausalLM,)
    )
    for auto in order:
        if type(config) in auto._model_mapping:
            return auto
    raise UnsupportedModel(
        f"{config.model_type} is neither a causal LM nor an image-text-to-text model in transformers"
    )


def native_class(config: Any) -> type:
    """The transformers class ``auto_class(config)`` instantiates for this config."""
    return auto_class(config)._model_mapping[type(config)]
