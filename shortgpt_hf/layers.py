"""Finding a causal LM's decoder layer list, and making layers act as identity.

Every family names its layer list differently (``model.layers``,
``transformer.h``, ``gpt_neox.layers``, ``model.decoder.layers``...). Rather
than a table of names we look for the one ``nn.ModuleList`` whose length is
``num_hidden_layers`` and whose elements are the class transformers itself
refuses to split across devices (``_no_split_modules``): that is the decoder
block by definition, in any family, including ones added after this was written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ShortGPTError


@dataclass(frozen=True)
class DecoderLayers:
    """Where the decoder blocks live: ``model.get_submodule(path)`` is ``layers``."""

    path: str
    layers: nn.ModuleList

    @property
    def parent_path(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def attr(self) -> str:
        return self.path.rpartition(".")[2]


def text_config(model: nn.Module):
    """The config that owns ``num_hidden_layers`` (the text decoder's, for multimodal models)."""
    return model.config.get_text_config(decoder=True)


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """Locate the decoder layer list, or explain in one line why there is none."""
    config = getattr(model, "config", None)
    if config is None:
        raise ShortGPTError(f"{type(model).__name__} is not a transformers model (no .config)")
    if getattr(config, "is_encoder_decoder", False):
        raise ShortGPTError(f"{type(model).__name__} is an encoder-decoder model; only decoder-only causal LMs are supported")
    num_layers = getattr(text_config(model), "num_hidden_layers", None)
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != num_layers or not name:
            continue
        # any(): while loading a recipe, removed slots hold parameter-less stand-ins.
        if block_names and not any(type(m).__name__ in block_names for m in module):
            continue
        candidates.append((name, module))
    causal = [c for c in candidates if "encoder" not in c[0] and "vision" not in c[0]]
    if len(causal) != 1 or not getattr(model, "can_generate", lambda: False)():
        raise ShortGPTError(
            f"{type(model).__name__} has no decoder layer list that shortgpt_hf recognises "
            "(expected a causal LM such as LlamaForCausalLM)"
        )
    name, module = causal[0]
    return DecoderLayers(path=name, layers=module)


def _identity_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + output[1:]
    return hidden


@contextlib.contextmanager
def layers_as_identity(model: nn.Module, indices: Iterable[int]) -> Iterator[None]:
    """Make the given layers return their input unchanged, for reference computations.

    The layers still run (so an uncached forward is the only meaningful use):
    this is the definition of what a correct removal must reproduce.
    """
    layers = find_decoder_layers(model).layers
    handles = [layers[i].register_forward_hook(_identity_hook, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_device(model: nn.Module) -> torch.device:
    """Where to put input ids. A model dispatched by accelerate moves inputs itself
    (its first weights may even be on disk), so CPU is right for it."""
    return torch.device("cpu") if getattr(model, "hf_device_map", None) else model.device


def probe_ids(model: nn.Module, length: int = 12, seed: int = 0) -> torch.Tensor:
    """A fixed, model-independent batch of token ids for parity checks."""
    vocab = min(text_config(model).vocab_size, 32000)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, length), generator=gen)
