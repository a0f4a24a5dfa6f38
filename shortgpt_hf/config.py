"""`ShortGPTConfig`: what to remove and how (the request), and, once done, what was removed (the record).

Like PEFT's ``LoraConfig``, one typed object is both the thing you ask with and
the thing a model carries: ``ShortGPTConfig(ratio=0.25, metric="bi",
recovery="linear")`` is a request, which `prune`, ``PrunedForCausalLM.from_pretrained
(..., shortgpt_config=...)`` and ``shortgpt prune`` carry out; the config they
leave on the model has ``removed_layers`` filled in (the record) and keeps the
request it came from under ``request``, so every pruned model says how to
reproduce it.

The record lives in two places with the same content: as the ``shortgpt``
block of a pruned model's ``config.json`` (like ``quantization_config``, it
round-trips through ``AutoConfig`` untouched), and as a standalone recipe file.
Indices in the record are always ORIGINAL layer indices of the unpruned base,
so pruning a pruned model composes without ambiguity.
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

from .errors import InvalidRequest
from .registry import METRICS, RECOVERY_METHODS
from .selection import check_layers, removal_count
from .sources import CONFIG_NAME, RECIPE_MODEL_TYPE, resolve

MODES = ("remove", "prefill_skip")
CONFIG_TYPE = "shortgpt"
DEFAULT_RATIO = 0.25
_ANY_DEPTH = 2**31  # checks explicit layers before the model (and so its depth) is known
# Fields that only a request has; a record keeps them, as they were asked, in ``request``.
REQUEST_FIELDS = (
    "layers",
    "n_layers",
    "ratio",
    "metric",
    "block_size",
    "calibration",
    "calibration_tokens",
    "seq_len",
    "batch_size",
    "seed",
    "recovery",
    "recovery_tokens",
    "measure",
    "verify",
    "mode",
)


# Fields a record has too, with the meaning a record gives them.
_SHARED_FIELDS = ("metric", "block_size", "calibration", "recovery", "mode")


# What the request itself sets for every recovery step; a step's own options cannot.
_STEP_SETTINGS = ("data", "tokenizer", "seq_len", "max_tokens", "eval_data", "eval_tokens", "fitted")


def _check_options(step: dict[str, Any]) -> None:
    """Refuse an unknown method, or an option its ``apply`` does not take, in one line, when the request is built."""
    method = RECOVERY_METHODS.get_or_refuse(step["method"])
    options = {k: v for k, v in step.items() if k != "method"}
    fixed = [k for k in options if k in _STEP_SETTINGS]
    if fixed:
        raise InvalidRequest(
            f"recovery step option {fixed[0]!r} is set by the request for every step "
            "(seq_len, recovery_tokens, calibration), not by one step"
        )
    method.refuse_unknown(options)


def _calibration_sources(calibration: Any) -> str | dict[str, float] | None:
    """A request's calibration as JSON keeps it: a text file or folder, or a mixture ``{source: weight}``
    (a list of sources is a mixture of equal weights)."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, Path)):
        return str(calibration)
    if isinstance(calibration, (list, tuple)) and all(isinstance(c, (str, Path)) for c in calibration):
        calibration = dict.fromkeys(calibration, 1.0)
    if isinstance(calibration, dict) and all(isinstance(k, (str, Path)) for k in calibration):
        weights = {str(k): v for k, v in calibration.items()}
        bad = [w for w in weights.values() if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0]
        if bad or not weights:
            raise InvalidRequest(f"calibration weights must be positive numbers, got {calibration!r}")
        return {k: float(v) for k, v in weights.items()}
    raise InvalidRequest(
        "calibration in a ShortGPTConfig is a text file or folder, or a mixture {source: weight} (it must survive "
        "JSON); give other data (texts, a Dataset, tokens) as calibration_data="
    )


def _library_version() -> str:
    return importlib.metadata.version("shortgpt_hf")


@dataclass
class ShortGPTConfig:
    """A layer-removal request and, once carried out, its record.

    **As a request** (``removed_layers`` is None), say what to remove with one of
    ``layers`` (indices, original for a dense model), ``n_layers`` or ``ratio``
    (default: ``ratio=0.25``), chosen by the lowest scores of ``metric`` (any
    registered metric, see ``shortgpt_hf.METRICS``) on ``calibration`` (a text
    file, a folder of ``.txt`` files, or a mixture ``{source: weight}`` in which
    each source gets its weight's share of the tokens; None: the packaged
    calibration text; in Python, `prune` and ``from_pretrained`` also take any
    data as ``calibration_data=``), cut into
    ``seq_len``-token windows, ``calibration_tokens`` of them. ``recovery`` names
    the recovery steps to run, in order: a method name, or a list of names or
    ``{"method": name, **options}`` dicts (a training-free method, fitted on the
    layers being removed, comes first; ``recovery_tokens`` caps its calibration
    tokens); ``measure`` records held-out perplexity before and after each step and
    the result's fidelity to its dense base on the held-out suite.
    ``verify`` checks the result against the model with those layers skipped.
    ``mode="prefill_skip"`` (ShortGPT-gen) skips the layers during prefill only.

    **As a record** (``removed_layers`` set): which ORIGINAL layers are gone and
    how they were chosen. ``layer_scores`` has one entry per original layer
    (``None`` for a layer already removed when scored); ``calibration`` is what
    the scores were computed on; ``recovery`` lists the steps applied, each with
    its figures; ``fidelity`` (when ``measure`` was on) holds the result's drift from
    its base on every genre of the held-out suite (`evaluation.fidelity_record`);
    ``request`` is the request that produced it. With
    ``mode="prefill_skip"`` nothing is gone: the listed layers are skipped while
    a prompt is processed and run for every decoded token; ``prefill_boundary``
    says whether the last prompt token runs dense.
    """

    removed_layers: list[int] | None = None
    original_num_hidden_layers: int | None = None
    metric: str | None = None
    layer_scores: list[float | None] | None = None
    block_size: int = 1
    calibration: Any = None  # request: a file, folder or {source: weight} (None: packaged); record: what was read
    mode: str = "remove"
    prefill_boundary: bool | None = None
    original_num_parameters: int | None = None
    recovery: Any = None  # request: steps to run; record: the steps applied, with their figures
    fidelity: dict[str, Any] | None = None  # record: the result against its base on the held-out suite
    model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_revision: str | None = None
    library_version: str = field(default_factory=_library_version)
    config_type: str = CONFIG_TYPE
    layers: list[int] | None = field(default=None, kw_only=True)
    n_layers: int | None = field(default=None, kw_only=True)
    ratio: float | None = field(default=None, kw_only=True)
    calibration_tokens: int | None = field(default=8192, kw_only=True)
    seq_len: int = field(default=256, kw_only=True)
    batch_size: int = field(default=8, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    recovery_tokens: int | None = field(default=None, kw_only=True)
    measure: bool = field(default=True, kw_only=True)
    verify: bool = field(default=True, kw_only=True)
    request: dict[str, Any] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.config_type != CONFIG_TYPE:
            raise InvalidRequest(f"not a ShortGPT config (config_type={self.config_type!r})")
        if self.mode not in MODES:
            raise InvalidRequest(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.is_request:
            self._check_request()
        else:
            self._check_record()

    @property
    def is_request(self) -> bool:
        """True until the removal is carried out (``removed_layers`` is still None)."""
        return self.removed_layers is None

    def _check_record(self) -> None:
        self.removed_layers = sorted(int(i) for i in self.removed_layers)
        n = self.original_num_hidden_layers
        if n is None:
            raise InvalidRequest("invalid ShortGPT config: removed_layers needs original_num_hidden_layers")
        if not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"original_num_hidden_layers must be a positive int, got {n!r}")
        if len(set(self.removed_layers)) != len(self.removed_layers):
            raise InvalidRequest(f"removed_layers has duplicates: {self.removed_layers}")
        bad = [i for i in self.removed_layers if not 0 <= i < n]
        if bad:
            raise InvalidRequest(f"removed_layers {bad} are outside 0..{n - 1}")
        if len(self.removed_layers) >= n:
            raise InvalidRequest("removed_layers would remove every layer")
        if self.layer_scores is not None and len(self.layer_scores) != n:
            raise InvalidRequest(f"layer_scores has {len(self.layer_scores)} entries for {n} original layers")

    def _check_request(self) -> None:
        given = [k for k in ("layers", "n_layers", "ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            raise InvalidRequest(f"give one of layers, n_layers or ratio, not {' and '.join(given)}")
        if not given:
            self.ratio = DEFAULT_RATIO
        if self.layers is not None:  # the range is checked against the model being pruned
            self.layers = sorted(check_layers(_ANY_DEPTH, self.layers))
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1):
            raise InvalidRequest(f"ratio must be between 0 and 1, got {self.ratio}")
        if self.n_layers is not None and not (isinstance(self.n_layers, int) and self.n_layers >= 1):
            raise InvalidRequest(f"n_layers, the number of layers to remove, must be at least 1, got {self.n_layers!r}")
        if self.metric is None and self.layers is None:
            self.metric = "bi"
        if self.metric is not None:
            metric = METRICS.get_or_refuse(self.metric)
            if self.block_size != 1 and not metric.blocks:
                raise InvalidRequest(f"block_size > 1 is not defined for the {self.metric} metric")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise InvalidRequest(f"block_size must be a positive integer, got {self.block_size!r}")
        self.calibration = _calibration_sources(self.calibration)
        for name in ("seq_len", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("calibration_tokens", "recovery_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequest(f"{name} must be a positive integer or None, got {value!r}")
        self.recovery = self._recovery_steps(self.recovery)

    def _recovery_steps(self, recovery: Any) -> list[dict[str, Any]] | None:
        """The requested recovery as ``[{"method": name, **options}, ...]``, checked against the registry."""
        if recovery is None or recovery == "none" or recovery == []:
            return None
        items = [recovery] if isinstance(recovery, (str, dict)) else list(recovery)
        steps = []
        for item in items:
            step = {"method": item} if isinstance(item, str) else dict(item)
            if not isinstance(step.get("method"), str):
                raise InvalidRequest(f"a recovery step is a method name or a dict with a 'method', got {item!r}")
            _check_options(step)
            steps.append(step)
        fitted = [i for i, s in enumerate(steps) if RECOVERY_METHODS[s["method"]].needs_removed_layers]
        if fitted and fitted != [0]:
            raise InvalidRequest(
                f"recovery {steps[fitted[-1]]['method']!r} is fitted on the layers being removed, so it must be "
                "the first step, and only one such step can run"
            )
        if steps and self.mode == "prefill_skip":
            raise InvalidRequest("a prefill-skip model keeps every layer; it has nothing to recover")
        return steps

    def removal_count(self, num_layers: int) -> int:
        """How many of ``num_layers`` layers this request removes, refusing none, all, or a count
        that blocks of ``block_size`` layers cannot give (cheap: before anything is scored)."""
        if self.layers is not None:
            return len(check_layers(num_layers, self.layers))
        count = removal_count(num_layers, self.n_layers, self.ratio)
        if self.block_size > 1 and count != self.block_size:
            raise InvalidRequest(
                f"scores of blocks of {self.block_size} layers remove one block, {self.block_size} layers; "
                f"this request removes {count} of {num_layers}"
            )
        return count

    def trained_steps(self) -> list[str]:
        """The requested recovery methods that train the pruned model (LoRA returns a PEFT model)."""
        return [s["method"] for s in self.recovery or [] if not RECOVERY_METHODS[s["method"]].needs_removed_layers]

    def request_dict(self) -> dict[str, Any]:
        """The request fields as given (what a record keeps under ``request``)."""
        return {k: getattr(self, k) for k in REQUEST_FIELDS}

    @property
    def kept_layers(self) -> list[int]:
        """Original indices of the layers still present, in order."""
        removed = set(self.removed_layers)
        return [i for i in range(self.original_num_hidden_layers) if i not in removed]

    @property
    def num_hidden_layers(self) -> int:
        return self.original_num_hidden_layers - len(self.removed_layers)

    def to_dict(self) -> dict[str, Any]:
        """A request's fields, or a record's (its request kept whole under ``request``), as JSON-ready values."""
        data = dataclasses.asdict(self)
        if self.is_request:
            return {k: data[k] for k in (*REQUEST_FIELDS, "library_version", "config_type")}
        return {k: v for k, v in data.items() if k not in REQUEST_FIELDS or k in _SHARED_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShortGPTConfig:
        """Build from a dict, warning about (not failing on) keys from newer versions."""
        if not isinstance(data, dict):
            raise InvalidRequest(f"a ShortGPT config must be a JSON object, got {type(data).__name__}")
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
            raise InvalidRequest(f"invalid ShortGPT config: {e}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> ShortGPTConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"ShortGPT config is not valid JSON: {e}") from None
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
            raise InvalidRequest(f"{source.describe()} is not a ShortGPT recipe (it has no {CONFIG_NAME})")
        return cls.from_json_string(source.read_text(CONFIG_NAME))

    @classmethod
    def from_model(cls, model: Any) -> ShortGPTConfig | None:
        """The config recorded on a model by `prune`, or None for an unpruned model."""
        data = getattr(model.config, "shortgpt", None)
        return None if data is None else cls.from_dict(data)


def hub_tags(record: ShortGPTConfig) -> list[str]:
    """The Hub tags of a pruned model: on its card, and on anything transformers' own ``push_to_hub`` uploads."""
    return ["shortgpt", "layer-pruning", "pruned"] + (["prefill-skip"] if record.mode == "prefill_skip" else [])


def tag_pruned(model: Any) -> None:
    """Tag a pruned model through transformers' ``add_model_tags``, so its own
    ``push_to_hub`` / ``save_pretrained(push_to_hub=True)`` tag the repo too."""
    record = ShortGPTConfig.from_model(model)
    if record is None or not hasattr(model, "add_model_tags"):
        return
    model.model_tags = list(model.model_tags or [])  # a fresh list: a snapshot taken before may share the old one
    model.add_model_tags(hub_tags(record))


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
