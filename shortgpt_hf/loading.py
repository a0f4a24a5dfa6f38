"""Resolving what a user calls "a model": a built-in name, a local folder or a Hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .builtin import BUILTINS, builtin_path
from .errors import ShortGPTError
from .families import auto_class


def resolve_model(name_or_path: str) -> str:
    """A path or Hub id that ``from_pretrained`` understands."""
    if name_or_path in BUILTINS:
        return str(builtin_path(name_or_path))
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ShortGPTError(f"{path} is not a model folder (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ShortGPTError(f"model path does not exist: {name_or_path}")
    return name_or_path  # a Hub id: huggingface_hub resolves it (from its cache when offline)


# from_pretrained arguments that also decide which config is read.
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")


def load_model(name_or_path: str, tokenizer: bool = True, **from_pretrained_kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` through the Auto class the config maps to (``AutoModelForCausalLM``,
    or ``AutoModelForImageTextToText`` for a vision-language model); missing models become one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name_or_path)
    hub = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
    try:
        if hub.get("trust_remote_code"):  # custom classes are not in transformers' mappings
            auto = AutoModelForCausalLM
        else:
            auto = auto_class(AutoConfig.from_pretrained(source, **hub))
        model = auto.from_pretrained(source, **from_pretrained_kwargs)
        tok = AutoTokenizer.from_pretrained(source) if tokenizer else None
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShortGPTError(f"cannot load {name_or_path!r}: {first}") from None
    except ValueError as e:  # e.g. a config with no causal-LM class (BERT, T5 encoders)
        first = str(e).strip().splitlines()[0]
        raise ShortGPTError(f"{name_or_path!r} is not a supported causal LM: {first}") from None
    if name_or_path in BUILTINS:
        # Record the portable name, not this machine's cache path (it ends up in ShortGPTConfig).
        model.name_or_path = model.config.name_or_path = name_or_path
    return model, tok


def tokenizer_for(model: Any) -> Any:
    """The tokenizer saved with ``model`` (where it was loaded from), for calls that got none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model.name_or_path))
    except (OSError, ValueError) as e:
        raise ShortGPTError(f"no tokenizer given and none found at {model.name_or_path!r}: pass tokenizer=") from e
