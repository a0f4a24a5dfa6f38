"""Finding a model's text decoder layer list, and making layers act as identity.

The decoder is found through the model's own structure: ``get_decoder()``
(which resolves ``model.model``, ``transformer``, or a vision-language
model's ``language_model``), then the attribute that holds its blocks, which
the family table names (``layers``, or ``h`` for GPT-2-style models). Counting
list lengths is not enough: a vision tower can have exactly as many blocks as
the text decoder has layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModel
from .families import FAMILIES


@dataclass(frozen=True)
class DecoderLayers:
    """Where the decoder blocks live: ``model.get_submodule(path)`` is ``layers``, an attribute of ``decoder``."""

    path: str
    layers: nn.ModuleList
    decoder: nn.Module

    @property
    def attr(self) -> str:
        return self.path.rpartition(".")[2]


def text_config(model: nn.Module):
    """The config that owns ``num_hidden_layers`` (the text decoder's, for multimodal models)."""
    return model.config.get_text_config(decoder=True)


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """Locate the text decoder's layer list, or explain in one line why there is none."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModel(f"{type(model).__name__} is not a transformers model (no .config)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(
            f"{type(model).__name__} is an encoder-decoder model; only decoder-only causal LMs are supported"
        )
    cfg = text_config(model)
    if not getattr(model, "can_generate", lambda: False)() or not hasattr(model, "get_decoder"):
        raise UnsupportedModel(
            f"{type(model).__name__} has no decoder layer list that shortgpt_hf recognises "
            "(expected a causal LM such as LlamaForCausalLM, or a vision-language model)"
        )
    # get_decoder() first; some wrappers return themselves, so also every
    # submodule built from the text config (a vision tower never is).
    named = list(model.named_modules())  # starts with ("", model)
    decoder = model.get_decoder()
    owners = [(n, m) for n, m in named if m is decoder] + [
        (n, m) for n, m in named if getattr(m, "config", None) is cfg
    ]
    family = FAMILIES.get(cfg.model_type)
    for prefix, owner in owners:
        if family is not None:
            names = [family.layers]
        else:  # an unknown family: the decoder's own list of blocks, if it has exactly one
            names = [
                n for n, m in owner.named_children() if isinstance(m, nn.ModuleList) and len(m) == cfg.num_hidden_layers
            ]
        if len(names) != 1:
            continue
        layers, path = getattr(owner, names[0], None), f"{prefix}.{names[0]}" if prefix else names[0]
        if family is None and "encoder" in path.split("."):  # BERT-style "causal" heads on an encoder stack
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) == cfg.num_hidden_layers:
            return DecoderLayers(path=path, layers=layers, decoder=owner)
    raise UnsupportedModel(
        f"{type(model).__name__} has no decoder layer list that shortgpt_hf recognises "
        f"(looked for {cfg.num_hidden_layers} layers in its text decoder, {type(decoder).__name__})"
    )


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
    ids = torch.randint(3, vocab, (2, length), generator=gen)
    # A vision-language model treats its image/video placeholder ids as slots for pixels it is not given.
    special = [
        v for k, v in vars(model.config).items() if k.endswith(("_token_id", "_token_index")) and isinstance(v, int)
    ]
    if special:
        plain = next(i for i in range(3, vocab) if i not in special)
        ids = ids.masked_fill(torch.isin(ids, torch.tensor(special)), plain)
    return ids


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a measurement in eval mode (no dropout) and give the model back in the
    mode it had, also when the measurement fails or is interrupted: a model
    being trained must not come back from an evaluation in eval mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
