"""`ShortGPTConfig`: the record of which layers were removed, and why.

It lives in two places with the same content: as the ``shortgpt`` block of a
pruned model's ``config.json`` (like ``quantization_config``, it round-trips
through ``AutoConfig`` untouched), and later as a standalone recipe file.
Indices are always ORIGINAL layer indices of the unpruned base, so pruning a
pruned model composes without ambiguity.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from .errors import ShortGPTError
from .sources import CONFIG_NAME, RECIPE_MODEL_TYPE, resolve

MODES = ("remove", "prefill_skip")
CONFIG_TYPE = "shortgpt"


def _library_version() -> str:
    return importlib.metadata.version("shortgpt_hf")


@dataclass
class ShortGPTConfig:
    """Which original layers are gone from a model, and how they were chosen.

    With ``mode="prefill_skip"`` (ShortGPT-gen) nothing is gone: the listed
    layers are skipped while a prompt is processed and run for every decoded
    token; ``prefill_boundary`` says whether the last prompt token runs dense.

    ``recovery`` lists the recovery steps applied after removal, in order
    (method, its settings, held-out perplexity before and after).

    ``layer_scores`` has one entry per ORIGINAL layer (``None`` for a layer that
    had already been removed when the scores were computed), so a card or a
    plot can show every layer of the base in its own place.
    """

    removed_layers: list[int]
    original_num_hidden_layers: int
    metric: str | None = None
    layer_scores: list[float | None] | None = None
    block_size: int = 1
    calibration: dict[str, Any] | None = None
    mode: str = "remove"
    prefill_boundary: bool | None = None
    original_num_parameters: int | None = None
    recovery: list[dict[str, Any]] | None = None
    model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_revision: str | None = None
    library_version: str = field(default_factory=_library_version)
    config_type: str = CONFIG_TYPE

    def __post_init__(self) -> None:
        self.removed_layers = sorted(int(i) for i in self.removed_layers)
        n = self.original_num_hidden_layers
        if not isinstance(n, int) or n < 1:
            raise ShortGPTError(f"original_num_hidden_layers must be a positive int, got {n!r}")
        if len(set(self.removed_layers)) != len(self.removed_layers):
            raise ShortGPTError(f"removed_layers has duplicates: {self.removed_layers}")
        bad = [i for i in self.removed_layers if not 0 <= i < n]
        if bad:
            raise ShortGPTError(f"removed_layers {bad} are outside 0..{n - 1}")
        if len(self.removed_layers) >= n:
            raise ShortGPTError("removed_layers would remove every layer")
        if self.mode not in MODES:
            raise ShortGPTError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.layer_scores is not None and len(self.layer_scores) != n:
            raise ShortGPTError(f"layer_scores has {len(self.layer_scores)} entries for {n} original layers")
        if self.config_type != CONFIG_TYPE:
            raise ShortGPTError(f"not a ShortGPT config (config_type={self.config_type!r})")

    @property
    def kept_layers(self) -> list[int]:
        """Original indices of the layers still present, in order."""
        removed = set(self.removed_layers)
        return [i for i in range(self.original_num_hidden_layers) if i not in removed]

    @property
    def num_hidden_layers(self) -> int:
        return self.original_num_hidden_layers - len(self.removed_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShortGPTConfig:
        """Build from a dict, warning about (not failing on) keys from newer versions."""
        if not isinstance(data, dict):
            raise ShortGPTError(f"a ShortGPT config must be a JSON object, got {type(data).__name__}")
        if "healing" in data:  # written before recovery became a list of steps: at most one LoRA step
            healing = data["healing"]
            data = {k: v for k, v in data.items() if k != "healing"}
            if isinstance(healing, dict):
                data["recovery"] = [{"method": "lora", **healing}]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"ignoring unknown ShortGPT config keys {unknown} (written by a newer version?)", stacklevel=2
            )
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise ShortGPTError(f"invalid ShortGPT config: {e}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> ShortGPTConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShortGPTError(f"ShortGPT config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``shortgpt_config.json`` (the whole recipe; `save_recipe` adds the tokenizer, atomically)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.to_json_string())
        return path / CONFIG_NAME

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, revision: str | None = None, **hub_kwargs: Any
    ) -> ShortGPTConfig:
        """Read a recipe from a local folder or a Hub repo (through huggingface_hub's cache)."""
        source = resolve(name_or_path, revision, **hub_kwargs)
        if source.kind != "recipe":
            raise ShortGPTError(f"{source.describe()} is not a ShortGPT recipe (it has no {CONFIG_NAME})")
        return cls.from_json_string(source.read_text(CONFIG_NAME))

    @classmethod
    def from_model(cls, model: Any) -> ShortGPTConfig | None:
        """The config recorded on a model by `prune`, or None for an unpruned model."""
        data = getattr(model.config, "shortgpt", None)
        return None if data is None else cls.from_dict(data)


class RecipeConfig(PretrainedConfig):
    """The ``config.json`` a recipe folder carries so that transformers' ``AutoConfig``
    recognises it (registered in `shortgpt_hf.auto`) and ``AutoModelForCausalLM``
    hands it to `PrunedForCausalLM`. The recipe itself is ``shortgpt_config.json``
    beside it, as a PEFT adapter is ``adapter_config.json``; this file only adds
    the model's ``vocab_size``, which PEFT compares with an adapter's model to
    decide whether the embeddings were resized and must be saved with it."""

    model_type = RECIPE_MODEL_TYPE
    written = ("model_type", "transformers_version", "vocab_size")  # the keys the file holds

    def absorbed_kwargs(self) -> dict[str, Any]:
        """The ``from_pretrained`` arguments that ``AutoConfig`` absorbed into this config
        on the way to `PrunedForCausalLM` (``attn_implementation``, ``output_attentions``...):
        they belong to the base model it loads."""
        absorbed = {k: v for k, v in self.to_diff_dict().items() if k not in self.written}
        if self._attn_implementation is not None:
            absorbed["attn_implementation"] = self._attn_implementation
        return absorbed
