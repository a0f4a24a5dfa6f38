"""Training-free linear repair: each removed gap becomes a least-squares map folded into weights the model already has.

Removing a run of consecutive layers (a gap) hands the next kept layer the
wrong hidden state: what the last kept layer before the gap produced, instead
of what the gap's last layer produced. ReplaceMe (Shopkhoev et al., 2025) and
LinearPatch (2025) close much of that difference with no training: one linear
map per gap, estimated from calibration activations and folded into existing
weights, so the repaired model is still an ordinary checkpoint of its own
architecture and any transformers loader reads it.

For a gap after kept layer ``p`` (a Llama-style block, ``h_out = h_mid + m``,
``m`` the MLP output), over calibration tokens:

- ``M``: what ``p`` adds to the residual stream last (its MLP output),
- ``L``: the output of the gap's last layer,
- ``B = L - h_mid``: what ``p`` would have to add for its output to be ``L``.

``T = argmin ||M T - B||²`` (plus an optional ridge term), accumulated as
``MᵀM`` and ``MᵀB`` in float64, so memory stays ``d × d`` per gap whatever the
number of tokens. ``T`` is folded where the family's table entry says
(`families.Fold`): into every ``down_proj`` (dense, each expert, any shared
expert: the router's weighting commutes with a map on the output), or, for a
block that ends in a norm (Gemma's ``post_feedforward_layernorm``), as the best
per-channel map into that norm's weight. A gap that starts at layer 0 has no
kept layer before it: its map goes into the input embeddings (``B = L``), or
the gap is left unrepaired, with a warning, when the embeddings are tied to
the output head.

Maps are fitted on the unpruned model, so `prune` runs this method
(``prune(..., recovery="linear")``) while the layers still exist. The fitted
maps stay with the model (`linear_maps`) so that a recipe can carry them
(`MAPS_FILE`) and re-fold them when a loader builds the model from only the
kept layers of its base.

The equations are gathered through the `drivers` protocol, so the same code
fits a model in memory (hooks) and one larger than memory (the layer walk,
``streaming.fit_linear_sequentially``), with the same numbers; what it fits
is a `LinearRepair`, which ``streaming.materialize`` folds into the few
tensors it changes with the same `fold_maps`. The same statistics score
candidate removals: the ``linear_residual`` metric (`repair_aware_order`)
picks layers greedily by the error left after each gap's best map.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import TokenWindows
from ..config import ShortGPTConfig
from ..drivers import Driver, LayerObserver
from ..errors import InvalidRequest, ShortGPTError, SourceUnavailable, UnsupportedModel
from ..families import Fold, describe, family_of, is_vision_language
from ..layers import find_decoder_layers, text_config
from ..metrics import Metric, Scored, register_metric
from .base import RecoveryMethod, keyword_options, register

if TYPE_CHECKING:
    from ..sources import Source

logger = logging.getLogger("shortgpt_hf")
T = TypeVar("T")

# In a subfolder, out of the weights' namespace: engines such as vLLM load every *.safetensors file at the top
# of a checkpoint folder as weights, and would refuse tensors that are not the model's.
MAPS_FILE = "shortgpt/linear_maps.safetensors"
LEGACY_MAPS_FILE = "shortgpt_maps.safetensors"  # where folders written before kept them; still read
_MAPS_ATTR = "_shortgpt_linear_maps"
_PASS_MEMORY = 2 * 2**30  # float64 bytes of normal equations gathered in one calibration pass


@dataclass(frozen=True)
class Gap:
    """Consecutive removed layers ``first..last`` (current indices of the model being fitted)."""

    first: int
    last: int

    @property
    def before(self) -> int:
        """The kept layer whose update takes the map; -1 is the input embeddings."""
        return self.first - 1


def gaps_of(removing: list[int]) -> list[Gap]:
    """Split sorted layer indices into runs of consecutive layers."""
    gaps: list[Gap] = []
    for i in sorted(removing):
        if gaps and gaps[-1].last == i - 1:
            gaps[-1] = Gap(gaps[-1].first, i)
        else:
            gaps.append(Gap(i, i))
    return gaps


def fold_rule(model: nn.Module) -> Fold:
    """The family's `Fold`, or a one-line refusal naming the family."""
    fold = family_of(text_config(model)).fold
    if fold is None:
        raise UnsupportedModel(
            f"linear repair does not know where to fold a map in {describe(model)}: it is supported for families "
            "whose MLP output is added straight to the residual stream (Llama, Mistral, Qwen, Phi-3, MoE) and Gemma 2/3"
        )
    return fold


def embeddings_foldable(model: nn.Module) -> bool:
    """Whether a gap at layer 0 can take its map in the input embeddings: they must not be the
    output head's too, and every position must be a token embedding (no image features)."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    return not tied and not is_vision_language(model.config)


class NormalEquations:
    """Running sums for ``min_T ||M T - B||²`` over tokens, in float64.

    Full maps keep ``MᵀM`` and ``MᵀB`` (d × d each); diagonal maps keep their
    diagonals. ``||B||²`` and ``||L||²`` are kept too, so the error left after
    a map, relative to the size of the state it repairs, costs nothing extra.
    """

    def __init__(self, diagonal: bool, keep_rows: bool = False):
        self.diagonal, self.keep_rows = diagonal, keep_rows
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (M, B, L) when keep_rows
        self.mm: torch.Tensor | float = 0.0
        self.mb: torch.Tensor | float = 0.0
        self.bb = 0.0
        self.ll = 0.0
        self.tokens = 0
        self.held: NormalEquations | None = None  # a held-out slice of the calibration, when one is kept

    def merged(self) -> NormalEquations:
        """These equations with their held-out slice added back: all of the calibration."""
        if self.held is None:
            return self
        whole = NormalEquations(self.diagonal, self.keep_rows)
        for part in (self, self.held):
            whole.rows += part.rows
            whole.mm, whole.mb = whole.mm + part.mm, whole.mb + part.mb
            whole.bb, whole.ll, whole.tokens = whole.bb + part.bb, whole.ll + part.ll, whole.tokens + part.tokens
        return whole

    def add(self, m: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> None:
        if self.keep_rows:  # an objective with no closed form needs the rows themselves
            self.rows.append((m.float(), b.float(), target.float()))
        m, b = m.double(), b.double()
        if self.diagonal:
            self.mm = self.mm + (m * m).sum(0)
            self.mb = self.mb + (m * b).sum(0)
        else:
            self.mm = self.mm + m.T @ m
            self.mb = self.mb + m.T @ b
        self.bb += float((b * b).sum())
        self.ll += float(target.double().pow(2).sum())
        self.tokens += m.shape[0]

    def solve(self, ridge: float, where: str, shrinkage: float = 0.0) -> torch.Tensor:
        """The least-squares map; ``ridge`` pulls it toward 0 and ``shrinkage`` toward the identity
        (plain removal), both relative to the mean of ``diag(MᵀM)``."""
        if self.diagonal:
            scale = self.mm.mean()
            denom = self.mm + (ridge + shrinkage) * scale
            return torch.where(
                denom > 0, (self.mb + shrinkage * scale) / denom.clamp_min(1e-300), torch.ones_like(denom)
            )  # a silent channel keeps its scale
        d = self.mm.shape[0]
        if ridge + shrinkage == 0 and self.tokens < d:
            raise ShortGPTError(
                f"{self.tokens} calibration tokens cannot determine a {d}x{d} map for {where}; "
                f"give at least {d} tokens or a ridge term (ridge=1e-3)"
            )
        eye = torch.eye(d, dtype=self.mm.dtype, device=self.mm.device) * self.mm.diagonal().mean()
        factor, info = torch.linalg.cholesky_ex(self.mm + (ridge + shrinkage) * eye)
        if int(info) != 0:
            raise ShortGPTError(
                f"the activations feeding {where} are rank-deficient over {self.tokens} tokens; "
                "give a ridge term (ridge=1e-3) or more varied calibration text"
            )
        return torch.cholesky_solve(self.mb + shrinkage * eye, factor)

    def residual(self, t: torch.Tensor | None) -> float:
        """``||M T - B||² / ||L||²``; ``t=None`` is plain removal (``T = I``)."""
        if t is None:
            mb = self.mb.sum() if self.diagonal else self.mb.diagonal().sum()
            mm = self.mm.sum() if self.diagonal else self.mm.diagonal().sum()
            err = self.bb - 2 * float(mb) + float(mm)
        elif self.diagonal:
            err = self.bb - 2 * float((t * self.mb).sum()) + float((t * t * self.mm).sum())
        else:
            err = self.bb - 2 * float((t * self.mb).sum()) + float((t * (self.mm @ t)).sum())
        return max(err, 0.0) / max(self.ll, 1e-300)


def check_finite(t: torch.Tensor, where: str) -> torch.Tensor:
    """``t``, or a one-line error: one NaN or Inf would make every map of the repair meaningless."""
    if not torch.isfinite(t).all():
        raise ShortGPTError(
            f"NaN or Inf in the activations of {where}; linear repair needs finite activations "
            "(load the model in float32 or bfloat16 rather than float16, or check the calibration data)"
        )
    return t


def token_rows(hidden: Any, mask: torch.Tensor) -> torch.Tensor:
    """A layer's (or submodule's) output as one row per real token: padding dropped, batch flattened."""
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden.reshape(-1, hidden.shape[-1])[mask.to(hidden.device)]


class _GapEquations(LayerObserver):
    """The normal equations of each gap in ``gaps``, gathered in one pass of either driver.

    Per batch: each kept layer ``p``'s update ``M`` (its fold output) and output
    ``Y`` wait until the gap's last output ``L`` arrives; then ``B = L - Y + M``.
    Padding is dropped. NaN or Inf in any of them stops the pass with a
    one-line error, before anything is changed. Several gaps may start at the
    same kept layer (candidate removals of `repair_aware_order`): its rows wait
    for the deepest of them. Once every batch has passed a gap's last layer,
    ``solve`` turns its equations into what the caller keeps (a map, a cost) and
    they are freed: layer by layer, one gap's ``d x d`` system is held at a time.
    """

    def __init__(
        self,
        gaps: list[Gap],
        fold: Fold,
        where: str,
        parked: torch.device | None,
        solve: Callable[[Gap, NormalEquations], Any],
        held_every: int | None = None,
        keep_rows: bool = False,
    ):
        self.where, self.parked, self.solve, self.held_every = where, parked, solve, held_every
        self.solved: dict[Gap, Any] = {}
        self.through = max(g.last for g in gaps)
        self.taps = {g.before: fold.output for g in gaps if g.before >= 0}
        self.ending = {last: [g for g in gaps if g.last == last] for last in {g.last for g in gaps}}
        self.deepest = {p: max(g.last for g in gaps if g.before == p) for p in {g.before for g in gaps}}
        self.open: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (batch, p) -> (M, Y) rows
        self.equations = {gap: NormalEquations(fold.diagonal and gap.before >= 0, keep_rows) for gap in gaps}

    def _rows(self, t: Any, mask: torch.Tensor, what: str) -> torch.Tensor:
        rows = check_finite(token_rows(t, mask), f"{self.where} ({what})")
        return rows if self.parked is None else rows.to(self.parked)

    def observe(self, layer: int, batch: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, tap: Any) -> None:
        if layer == 0 and -1 in self.deepest:  # the embeddings' output is layer 0's input: M = Y, so B = L
            embedded = self._rows(x, mask, "the embeddings")
            self.open[batch, -1] = (embedded, embedded)
        if layer in self.taps:
            self.open[batch, layer] = (
                self._rows(tap, mask, f"layer {layer} {self.taps[layer]}"),
                self._rows(y, mask, f"layer {layer} output"),
            )
        for gap in self.ending.get(layer, []):
            target = check_finite(token_rows(y, mask), f"{self.where} (layer {layer} output)")
            m, y_before = (t.to(target.device) for t in self.open[batch, gap.before])
            equations = self.equations[gap]
            if self.held_every and batch % self.held_every == self.held_every - 1:  # the held-out slice
                equations.held = equations.held or NormalEquations(equations.diagonal, equations.keep_rows)
                equations = equations.held
            equations.add(m, target - y_before + m, target)
            if self.deepest[gap.before] == layer:
                del self.open[batch, gap.before]

    def finish(self, layer: int) -> None:
        for gap in self.ending.get(layer, []):
            self.solved[gap] = self.solve(gap, self.equations.pop(gap))


def gather(
    driver: Driver,
    gaps: list[Gap],
    solve: Callable[[Gap, NormalEquations], T],
    progress: bool = True,
    held_every: int | None = None,
    keep_rows: bool = False,
) -> dict[Gap, T]:
    """One calibration pass of ``driver`` over every gap in ``gaps``: ``solve(gap, equations)`` of each.
    With ``held_every`` k, every k-th batch goes to the equations' held-out slice instead; with
    ``keep_rows`` the equations also keep every token's ``(M, B, L)`` rows (float32: memory grows
    with the calibration)."""
    where = describe(driver.model)
    observer = _GapEquations(gaps, fold_rule(driver.model), where, driver.parked, solve, held_every, keep_rows)
    driver.run(observer, f"linear repair: activations ({driver.how})", progress)
    return observer.solved


@dataclass
class LinearMap:
    """One fitted gap: ORIGINAL indices, where the map goes, the map, and how much it repairs."""

    removed: list[int]
    after: int | None  # the kept layer whose update takes the map; None: the input embeddings
    map: torch.Tensor | None  # float32, d × d or d; None: left unrepaired
    diagonal: bool
    residual_plain: float
    residual: float
    shrinkage: float = 0.0  # how far the map was pulled toward plain removal (the identity)

    def describe(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "folded_into": "input embeddings" if self.after is None else f"layer {self.after}",
            "map": None if self.map is None else ("diagonal" if self.diagonal else "full"),
            "relative_error_plain": round(self.residual_plain, 6),
            "relative_error_repaired": round(self.residual, 6),
            "shrinkage": self.shrinkage,
        }


def fold_targets(model: nn.Module, layer_index: int, fold: Fold) -> list[tuple[nn.Module, str]]:
    """``(module, parameter name)`` pairs that carry the map of the gap after current layer ``layer_index``."""
    if layer_index < 0:
        return [(model.get_input_embeddings(), "weight")]
    output = find_decoder_layers(model).layers[layer_index].get_submodule(fold.output)
    if fold.diagonal:
        return [(output, fold.weights)]
    targets = []
    for name, module in output.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] == fold.weights:
            targets += [(module, "weight")] + ([(module, "bias")] if module.bias is not None else [])
        elif (
            isinstance(module._parameters.get(fold.weights), nn.Parameter)
            and module._parameters[fold.weights].dim() == 3
        ):
            targets.append((module, fold.weights))  # stacked experts, [experts, out, in]
    if not targets:
        raise UnsupportedModel(
            f"{describe(model)}: found no {fold.weights!r} under layer {layer_index}'s {fold.output} to fold a map into"
        )
    return targets


def _folded(param: torch.Tensor, t: torch.Tensor, fold: Fold, name: str, embeddings: bool) -> torch.Tensor:
    """``param`` with map ``t`` folded in, computed in float64 and returned in ``param``'s dtype."""
    w, t = param.detach().double(), t.to(param.device, torch.float64)
    if embeddings:  # rows are the states themselves: x T
        new = w * t if t.dim() == 1 else w @ t
    elif fold.diagonal:  # the norm scales by (offset + w)
        new = (fold.norm_offset + w) * t - fold.norm_offset
    elif name == "bias":
        new = w @ t
    else:  # out = x Wᵀ, so out T = x (Tᵀ W)ᵀ; stacked experts broadcast over the first axis
        new = t.T @ w
    return new.to(param.dtype)


def fold_maps(model: nn.Module, maps: list[LinearMap]) -> None:
    """Fold fitted maps into the kept weights of a pruned model, all or nothing.

    Every new tensor is computed before the first one is installed, and each
    is installed as a new parameter (never written into the old one), so a
    failure leaves the model as it was and `prune`'s snapshot can undo it.
    """
    fold = fold_rule(model)
    record = ShortGPTConfig.from_model(model)
    current = {old: new for new, old in enumerate(record.kept_layers)}
    updates: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}  # two steps may fold into one weight
    for linear_map in maps:
        if linear_map.map is None:
            continue
        if linear_map.after is not None and linear_map.after not in current:
            continue  # the layer that carried this map was removed later, and the map with it
        index = -1 if linear_map.after is None else current[linear_map.after]
        for module, name in fold_targets(model, index, fold if index >= 0 else Fold(diagonal=linear_map.diagonal)):
            param = module._parameters[name]
            if param.device.type == "meta" or not param.dtype.is_floating_point or param.dtype.itemsize < 2:
                raise UnsupportedModel(
                    f"cannot fold a map into {describe(model)}'s {type(module).__name__}.{name}: "
                    "it is offloaded or quantized"
                )
            current_value = updates.get((id(module), name), (None, None, param))[2]
            updates[id(module), name] = (module, name, _folded(current_value, linear_map.map, fold, name, index < 0))
    for module, name, tensor in updates.values():
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def linear_maps(model: nn.Module) -> dict[str, torch.Tensor]:
    """The maps folded into this model, by the key its ``config.shortgpt`` record names them under.

    A native checkpoint does not need them (its weights already carry them)
    but keeps them in `MAPS_FILE`, so a recipe can still be written from it;
    a recipe needs them to refold."""
    return dict(getattr(model, _MAPS_ATTR, {}))


def attach_maps(model: nn.Module, maps: dict[str, torch.Tensor]) -> None:
    setattr(model, _MAPS_ATTR, {**linear_maps(model), **maps})


def map_keys(record: ShortGPTConfig) -> list[str]:
    """The keys of the stored maps a record's training-free steps name (empty when it has none)."""
    return [gap["key"] for step in record.recovery or [] for gap in step.get("gaps", []) if gap.get("key")]


def save_maps(maps: dict[str, torch.Tensor], record: ShortGPTConfig, folder: Path) -> None:
    """Write the maps ``record`` names to ``folder/MAPS_FILE`` (nothing when it names none)."""
    from safetensors.torch import save_file

    keys = map_keys(record)
    if not keys:
        return
    missing = [k for k in keys if k not in maps]
    if missing:
        raise ShortGPTError(
            f"this model's record names linear repair maps {missing} that are not in memory: save the recipe from the "
            "model that was repaired, or from one loaded with PrunedForCausalLM from a folder that has them"
        )
    (folder / MAPS_FILE).parent.mkdir(exist_ok=True)
    save_file({k: maps[k].contiguous() for k in keys}, str(folder / MAPS_FILE), metadata={"format": "pt"})


def load_maps(source: Source, record: ShortGPTConfig) -> dict[str, torch.Tensor]:
    """The maps a record names, from the folder or repo's `MAPS_FILE` (which must exist when it names any)."""
    from safetensors.torch import load_file

    if not map_keys(record):
        return {}
    file = source.file(MAPS_FILE) or source.file(LEGACY_MAPS_FILE)
    if file is None:
        raise SourceUnavailable(f"{source.describe()} records a linear repair but has no {MAPS_FILE} with its maps")
    return load_file(str(file))


def maps_from_record(record: ShortGPTConfig, tensors: dict[str, torch.Tensor]) -> list[LinearMap]:
    """The maps a record's training-free steps name, in order, rebuilt from stored tensors (for a loader)."""
    maps = []
    for step in record.recovery or []:
        for gap in step.get("gaps", []):
            key = gap.get("key")
            if key is None:
                continue
            if key not in tensors:
                raise SourceUnavailable(f"the recipe's linear repair names map {key!r}, which its maps file lacks")
            t = tensors[key]
            maps.append(
                LinearMap(
                    gap["removed"],
                    gap["after"],
                    t,
                    t.dim() == 1,
                    gap["relative_error_plain"],
                    gap["relative_error_repaired"],
                    gap.get("shrinkage", 0.0),
                )
            )
    return maps


def unrepairable(model: nn.Module, gaps: list[Gap], original: list[int]) -> list[Gap]:
    """The gaps no map can repair (one at layer 0 whose embeddings cannot take it), each announced in a warning."""
    if embeddings_foldable(model):
        return []
    skipped = [g for g in gaps if g.before < 0]
    for gap in skipped:
        logger.warning(
            "linear repair: the gap at layers %s has no kept layer before it and the input embeddings are tied to the "
            "output head (or carry image features), so it is left unrepaired",
            [original[i] for i in range(gap.first, gap.last + 1)],
        )
    return skipped


SHRINKAGES = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # what shrinkage="auto" chooses from
HELD_EVERY = 5  # shrinkage="auto" holds every fifth calibration batch out to choose on


def _held_error(eq: NormalEquations, held: NormalEquations, ridge: float, where: str, shrinkage: float) -> float:
    """The error a map fitted without the held-out slice leaves on it; a shrinkage the fitting part
    alone cannot solve for (too few tokens for an unshrunk map) is never chosen."""
    try:
        return held.residual(eq.solve(ridge, where, shrinkage))
    except ShortGPTError:
        return math.inf


def fitted_map(
    gap: Gap,
    eq: NormalEquations,
    original: list[int],
    ridge: float,
    skip: bool = False,
    shrinkage: float | str = 0.0,
) -> LinearMap:
    """The gap's map solved from its normal equations, under ORIGINAL layer indices (``skip``: left unrepaired).

    ``shrinkage="auto"`` picks, from `SHRINKAGES`, the one whose map, fitted without the held-out
    slice, leaves the least error on it; the map is then solved again on all of the calibration."""
    removed = [original[i] for i in range(gap.first, gap.last + 1)]
    after = None if gap.before < 0 else original[gap.before]
    where = f"the gap at layers {removed}"
    if shrinkage == "auto":
        held = eq.held
        if held is None:  # too few batches to hold any out: no evidence for shrinking
            shrinkage = 0.0
        else:
            shrinkage = min(SHRINKAGES, key=lambda s: _held_error(eq, held, ridge, where, s))
    eq = eq.merged()
    plain = eq.residual(None)
    if skip:
        return LinearMap(removed, after, None, eq.diagonal, plain, plain)
    t = eq.solve(ridge, where, shrinkage).float()
    return LinearMap(removed, after, t, eq.diagonal, plain, eq.residual(t.double()), float(shrinkage))


def recovery_entry(
    fitted: list[LinearMap], step: int, ridge: float, tokens: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What a linear step records in ``config.shortgpt["recovery"][step]``, and its maps by the keys it names."""
    gaps, tensors = [], {}
    for m in fitted:
        entry = {**m.describe(), "after": m.after, "key": None}
        if m.map is not None:
            entry["key"] = f"recovery.{step}.gap.{m.removed[0]}"
            tensors[entry["key"]] = m.map.detach().cpu().contiguous()
        gaps.append(entry)
    diagonal = any(m.diagonal for m in fitted if m.map is not None and m.after is not None)
    details = {
        "map": "diagonal (folded into the norm after the MLP)"
        if diagonal
        else "full (folded into the MLP output projections)",
        "ridge": float(ridge),
        "tokens": tokens,
        "gaps": gaps,
    }
    return details, tensors


@dataclass
class LinearRepair:
    """What a training-free method fitted for one removal: a map per gap (ORIGINAL indices),
    ready to fold into a model in memory, into the few tensors a checkpoint written
    tensor by tensor changes (``streaming.materialize``), or to travel in a recipe."""

    method: str
    removed_layers: list[int]
    maps: list[LinearMap]
    ridge: float
    tokens: int
    data: str

    def record(self, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What ``config.shortgpt["recovery"][step]`` records, and the maps under the keys it names."""
        details, tensors = recovery_entry(self.maps, step, self.ridge, self.tokens)
        return {"method": self.method, **details, "data": self.data}, tensors

    @property
    def entry(self) -> dict[str, Any]:
        """The record of the first recovery step of a dense model (what layer-by-layer pruning writes)."""
        return self.record(0)[0]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.record(0)[1]


def fit_gaps(
    method: str,
    driver: Driver,
    removing: list[int],
    ridge: float,
    progress: bool,
    shrinkage: float | str = 0.0,
    refine: Callable[[NormalEquations, torch.Tensor, str], torch.Tensor] | None = None,
) -> LinearRepair:
    """Fit a least-squares map for each gap of removing ``removing`` (current indices) from the driver's model.

    ``refine(equations, map, where)``, when given, takes each least-squares map as its starting
    point and returns the map another objective prefers; the equations then keep their rows."""
    record = ShortGPTConfig.from_model(driver.model)
    original = record.kept_layers if record is not None else list(range(driver.num_layers))
    gaps = gaps_of(removing)
    skipped = unrepairable(driver.model, gaps, original)
    held_every = HELD_EVERY if shrinkage == "auto" else None

    def solve(gap: Gap, eq: NormalEquations) -> LinearMap:
        fitted = fitted_map(gap, eq, original, ridge, gap in skipped, shrinkage)
        if refine is None or fitted.map is None:
            return fitted
        t = refine(eq, fitted.map, f"the gap at layers {fitted.removed}").detach()
        return replace(fitted, map=t, residual=eq.residual(t.double()))

    fitted = gather(driver, gaps, solve, progress, held_every, keep_rows=refine is not None)
    maps = [fitted[gap] for gap in gaps]
    windows = driver.windows
    return LinearRepair(method, [original[i] for i in removing], maps, ridge, windows.num_tokens, windows.description)


def fold_repair(model: nn.Module, fitted: LinearRepair | None, method: str) -> tuple[nn.Module, dict[str, Any]]:
    """What a training-free method's ``apply`` does: fold the maps fitted before removal, keep them
    for a recipe, and return what the step records."""
    if fitted is None:
        raise InvalidRequest(f"{method} repair needs maps fitted before removal: use prune(..., recovery={method!r})")
    fold_maps(model, fitted.maps)
    step = len((model.config.shortgpt or {}).get("recovery") or [])
    entry, tensors = fitted.record(step)
    attach_maps(model, tensors)
    return model, {k: v for k, v in entry.items() if k not in ("method", "data")}


class FoldedRepair(RecoveryMethod):
    """A training-free repair: maps fitted on the layers being removed (`fit`), folded into the kept
    weights (`apply`, the same for every such method). The keyword parameters of `fit` are the
    method's options, in that one place."""

    needs_removed_layers = True

    def option_names(self) -> set[str]:
        return keyword_options(self.fit)

    def check(self, model: nn.Module, *, ridge: Any = 0.0, **options: Any) -> None:
        """Refusals every least-squares-based method shares: a family with nowhere to fold, a bad
        ridge, a model that skips layers in prefill."""
        fold_rule(model)
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise InvalidRequest(f"ridge must be a non-negative number, got {ridge!r}")
        record = ShortGPTConfig.from_model(model)
        if record is not None and record.mode == "prefill_skip":
            raise InvalidRequest(
                "this model skips layers during prefill; call disable_prefill_skip(model) before pruning and "
                "repairing it"
            )

    def apply(
        self, model: nn.Module, windows: TokenWindows, tokenizer: Any, *, fitted: LinearRepair | None = None, **_: Any
    ) -> tuple[nn.Module, dict[str, Any]]:
        return fold_repair(model, fitted, self.name)


@register
class LinearRecovery(FoldedRepair):
    """A least-squares linear map per removed gap, folded into native weights; no training.

    ``shrinkage="auto"`` by default: on the held-out suite it gave the best mean over the genres no
    calibration reads of every training-free variant measured (least squares unshrunk, ReplaceMe's
    cosine objective, the repair-aware selection), if by little; ``shrinkage=0`` is plain least squares."""

    name = "linear"
    summary = "a least-squares map per removed gap, folded into the kept weights; no training"

    def check(self, model: nn.Module, *, shrinkage: Any = "auto", **options: Any) -> None:
        super().check(model, **options)
        if shrinkage != "auto" and not (
            isinstance(shrinkage, (int, float)) and math.isfinite(shrinkage) and shrinkage >= 0
        ):
            raise InvalidRequest(f"shrinkage must be a non-negative number or 'auto', got {shrinkage!r}")

    def fit(
        self,
        driver: Driver,
        removing: list[int],
        *,
        ridge: float = 0.0,
        shrinkage: float | str = "auto",
        batch_size: int = 8,
        progress: bool = True,
    ) -> LinearRepair:
        return fit_gaps(self.name, driver, removing, float(ridge), progress, shrinkage)


def repair_aware_order(
    driver: Driver, steps: int, *, ridge: float = 0.0, progress: bool = True
) -> tuple[list[int], list[float]]:
    """Choose ``steps`` layers greedily by the error that remains after linear repair.

    A removal's cost is the sum over its gaps of ``||M T - B||² / ||L||²``
    with each gap's best map ``T`` (the family's full or diagonal kind; plain
    removal for a gap at layer 0 whose embeddings cannot take a map). Each
    step removes the layer that adds least to that cost. A gap's cost
    depends only on the unpruned model's activations, so it is computed once,
    and each step after the first needs one calibration pass for the few gaps
    it has not seen (the ones that grow an existing gap).

    Returns the layers in the order chosen and, per layer, the cost it added
    when chosen (or, for a layer never chosen, would have added next).
    """
    model = driver.model
    fold = fold_rule(model)
    n = driver.num_layers
    embeddings_ok = embeddings_foldable(model)
    d = text_config(model).hidden_size
    per_pass = max(1, _PASS_MEMORY // (1 if fold.diagonal else 16 * d * d))
    cost: dict[Gap, float] = {}

    def residual(gap: Gap, eq: NormalEquations) -> float:
        if gap.before < 0 and not embeddings_ok:
            return eq.residual(None)
        return eq.residual(eq.solve(ridge, f"the gap at layers {gap.first}..{gap.last}"))

    def measure(gaps: list[Gap]) -> None:
        for start in range(0, len(gaps), per_pass):
            cost.update(gather(driver, gaps[start : start + per_pass], residual, progress))

    def gap_with(i: int, removed: set[int]) -> Gap:
        first, last = i, i
        while first - 1 in removed:
            first -= 1
        while last + 1 in removed:
            last += 1
        return Gap(first, last)

    removed: set[int] = set()
    order: list[int] = []
    added = [0.0] * n
    for _ in tqdm(range(steps), desc="repair-aware selection", disable=not progress):
        candidates = [i for i in range(n) if i not in removed]
        grown = {i: gap_with(i, removed | {i}) for i in candidates}
        measure(sorted({g for g in grown.values() if g not in cost}, key=lambda g: (g.first, g.last)))
        for i in candidates:
            merged = [g for g in gaps_of(sorted(removed)) if grown[i].first <= g.first and g.last <= grown[i].last]
            added[i] = cost[grown[i]] - sum(cost[g] for g in merged)
        best = min(candidates, key=lambda i: (added[i], i))
        removed.add(best)
        order.append(best)
    return order, added


@register_metric
class LinearResidual(Metric):
    """The selection made for linear repair: greedily, the layer whose removal leaves the
    least error after each gap's best least-squares map (`repair_aware_order`)."""

    name = "linear_residual"
    summary = "greedy: the layers whose removal leaves the least error after linear repair (one pass per layer)"
    greedy = True

    def score(self, driver: Driver, *, block_size: int, seed: int, max_layers: int, progress: bool) -> Scored:
        order, added = repair_aware_order(driver, max_layers, progress=progress)
        return Scored(added, order)
