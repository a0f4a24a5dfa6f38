"""Model cards for pruned models, rendered with huggingface_hub's ``ModelCard``.

The card is how others judge a pruned model: what was removed from which base,
why (the per-layer scores), what it saved, and what it cost. The template is
``model_cards/shortgpt_model_card.md.j2`` (shipped as ``shortgpt_hf.model_cards``).
Only Hub ids ever appear in a card, never local paths.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .builtin import BUILTINS
from .config import ShortGPTConfig, hub_tags
from .domains import DOMAINS
from .errors import InvalidRequest
from .families import auto_class, is_vision_language
from .layers import count_parameters
from .scoring import bar_chart
from .sources import hub_file, hub_id_of

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

TEMPLATE = "shortgpt_model_card.md.j2"
CHART = "layer_scores.png"
START, END = "<!-- shortgpt:start -->", "<!-- shortgpt:end -->"
KINDS = ("full", "recipe", "adapter")


def split_adapter(model: nn.Module) -> tuple[nn.Module, Any]:
    """(the pruned transformers model, the PEFT config or None)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model(), model.peft_config[model.active_adapter]
    return model, None


def base_license(record: ShortGPTConfig) -> str | None:
    """The base model's licence, from the built-in table or the base's own card (cache or Hub)."""
    name = record.base_model_name_or_path
    if name in BUILTINS:
        return BUILTINS[name].license
    base = hub_id_of(name)
    if base is None:
        return None
    from huggingface_hub import ModelCard

    try:
        readme = hub_file(base, "README.md")  # the cache only, at once, when the Hub cannot be reached
        return ModelCard.load(readme).data.license if readme is not None else None
    except Exception:  # no card, a gated repo, an unreadable card...: the licence is simply unknown
        return None


def scores_chart(record: ShortGPTConfig, path: str | Path) -> Path | None:
    """Bar chart of the recorded scores per ORIGINAL layer, removed ones in red."""
    if not record.layer_scores:
        return None
    values = {i: v for i, v in enumerate(record.layer_scores) if v is not None}
    status = "skipped in prefill" if record.mode == "prefill_skip" else "removed"
    return bar_chart(
        values,
        set(record.removed_layers),
        path,
        xlabel="layer (original index)",
        ylabel=record.metric or "score",
        title=f"{record.metric} per layer; red: {status}",
    )


def _eval_rows(eval_results: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    rows = []
    for r in eval_results or []:
        missing = {"task", "metric", "pruned"} - set(r)
        if missing:
            raise InvalidRequest(f"each eval result needs task, metric and pruned (missing {sorted(missing)} in {r})")
        fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        rows.append(
            {
                "task": r["task"],
                "dataset": r.get("dataset", "-"),
                "metric": r["metric"],
                "dense": fmt(r.get("dense")),
                "pruned": fmt(r["pruned"]),
                "value": r["pruned"],
                "settings": r.get("settings"),
            }
        )
    return rows


def _suite_order(domains: dict[str, Any]) -> list[tuple[str, Any]]:
    """A record's genres in the suite's order (a saved config.json sorts its keys), unknown ones last."""
    order = [d.name for d in DOMAINS]
    return sorted(domains.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0]))


def model_card(
    model: nn.Module,
    eval_results: list[dict[str, Any]] | None = None,
    *,
    repo_id: str = "<repo_id>",
    kind: str | None = None,
    chart: str | None = CHART,
) -> ModelCard:
    """Render the card of a pruned model (or of a PEFT adapter on one).

    ``eval_results``: dicts with ``task``, ``metric``, ``pruned`` and optionally
    ``dataset``, ``dense`` (the base's value, shown side by side) and
    ``settings`` (how it was measured, shown under the table).
    ``kind``: "full", "recipe" or "adapter" (default: adapter for a PeftModel,
    else full) decides the loading instructions.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    pruned, peft_config = split_adapter(model)
    record = ShortGPTConfig.from_model(pruned)
    if record is None:
        raise InvalidRequest("this model has not been pruned: there is nothing for a ShortGPT card to describe")
    kind = kind or ("adapter" if peft_config is not None else "full")
    if kind not in KINDS:
        raise InvalidRequest(f"kind must be one of {KINDS}, got {kind!r}")
    rows = _eval_rows(eval_results)
    base = hub_id_of(record.base_model_name_or_path)
    loader = auto_class(pruned.config).__name__
    pipeline_tag = "image-text-to-text" if is_vision_language(pruned.config) else "text-generation"
    card_data = ModelCardData(
        base_model=base,
        library_name="peft" if kind == "adapter" else "transformers",
        license=base_license(record),
        pipeline_tag=pipeline_tag,
        tags=hub_tags(record) + (["lora"] if peft_config is not None else []),
        model_name=repo_id.split("/")[-1],
        eval_results=[
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=r["dataset"],
                dataset_name=r["dataset"],
                metric_type=r["metric"],
                metric_value=r["value"],
            )
            for r in rows
        ]
        or None,
    )
    params_after = count_parameters(pruned)
    params_before = record.original_num_parameters
    removed = set(record.removed_layers)
    layer_rows = [
        {
            "index": i,
            "score": f"{v:.5f}",
            "status": ("skipped in prefill" if record.mode == "prefill_skip" else "removed") if i in removed else "",
        }
        for i, v in enumerate(record.layer_scores or [])
        if v is not None
    ]
    recovery = [dict(step) for step in record.recovery or []]
    if peft_config is not None:
        if not recovery or recovery[-1].get("method") != "lora":  # an adapter trained outside `heal`
            recovery.append({"method": "lora"})
        recovery[-1]["adapter"] = f"{peft_config.peft_type.value} (PEFT)"
        recovery[-1]["rank / alpha"] = f"{peft_config.r} / {peft_config.lora_alpha}"
        recovery[-1]["target modules"] = ", ".join(sorted(peft_config.target_modules or []))
    template = files("shortgpt_hf.model_cards").joinpath(TEMPLATE).read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=repo_id.split("/")[-1],
        base_display=base or "a local base model",
        base_revision=record.base_revision,
        mode=record.mode,
        boundary=record.prefill_boundary is not False,
        metric=record.metric,
        n_original=record.original_num_hidden_layers,
        n_removed=len(record.removed_layers),
        removed_pct=round(100 * len(record.removed_layers) / record.original_num_hidden_layers, 1),
        removed_layers=record.removed_layers,
        params_before=params_before,
        params_after=params_after if record.mode == "remove" else params_before,
        params_saved_pct=round(100 * (1 - params_after / params_before), 1) if params_before else None,
        layer_rows=layer_rows,
        chart=chart if record.layer_scores else None,
        calibration=record.calibration,
        eval_rows=rows,
        eval_settings=list(
            dict.fromkeys(  # fidelity is measured on the perplexity's own windows: one note says how
                f"{r['metric']} on {r['dataset']}: {r['settings']}"
                for r in rows
                if r["settings"] and not r["task"].startswith("fidelity:")
            )
        ),
        recovery=recovery,
        fidelity=record.fidelity if record.mode == "remove" else None,
        fidelity_rows=_suite_order((record.fidelity or {}).get("domains", {})),
        kind=kind,
        loader=loader,
        processor="AutoProcessor" if pipeline_tag == "image-text-to-text" else "AutoTokenizer",
        repo_id=repo_id,
        library_version=record.library_version,
    )


def merge_into_existing(new: ModelCard, existing_text: str | None) -> ModelCard:
    """Update a card already on the Hub in place: our marked section is replaced
    and everything else the user wrote is kept. In the metadata our keys take
    the new values, except that tags and eval results are added to the user's:
    a result for the same task, dataset and metric takes the new value, as
    huggingface_hub's ``metadata_update`` merges them."""
    from huggingface_hub import ModelCard

    if not existing_text:
        return new
    old = ModelCard(existing_text)
    section = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    ours = section.search(new.text).group(0)
    text = (
        section.sub(lambda _: ours, old.text, count=1)
        if section.search(old.text)
        else old.text.rstrip() + "\n\n" + ours + "\n"
    )
    results = list(old.data.eval_results or [])
    for result in new.data.eval_results or []:
        same = [i for i, kept in enumerate(results) if result.is_equal_except_value(kept)]
        if same:
            results[same[0]] = result
        else:
            results.append(result)
    data = {**old.data.to_dict(), **new.data.to_dict()}
    for key in ("model-index", "eval_results", "model_name"):
        data.pop(key, None)
    data["tags"] = list(dict.fromkeys([*(old.data.tags or []), *(new.data.tags or [])]))
    merged = ModelCard("---\n---\n" + text)
    merged.data = type(new.data)(
        **data, eval_results=results or None, model_name=new.data.model_name or old.data.model_name
    )
    return merged
