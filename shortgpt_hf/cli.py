"""The ``shortgpt`` command line: score layers, prune and save.

User mistakes (a mistyped option included), faults of the machine or the
network, and Ctrl-C all end in one ``shortgpt: error:`` line on stderr with
exit status 2 (see `main`); no output folder is created before all checks
pass, and none is left half-written.

What a command prints is written as it is (`say`), never re-wrapped to the
terminal's width, so ``shortgpt generate > out.txt`` keeps the generated text
and paths whole; help is plain click help, wrapped at word boundaries.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core

from .ablation import default_metrics, recovery_choices
from .builtin import DEFAULT_MODEL
from .calibration import read_text_file
from .errors import InvalidRequest, ShortGPTError, fault
from .evaluation import DEFAULT_TASKS, HEADLINE, SUMMARY_TOKENS
from .registry import METRICS, RECOVERY_METHODS
from .tables import ablation_tables, eval_table, score_table, show

# The click that typer uses (typer vendors its own copy since 0.2x): its usage errors are ours to word.
_click = importlib.import_module(typer.BadParameter.__module__)

app = typer.Typer(
    help="ShortGPT layer pruning for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def say(text: str) -> None:
    """Print one line of output exactly as given (no wrapping, markup or tab expansion)."""
    print(text, flush=True)


def _print_version(value: bool) -> None:
    if value:
        say(f"shortgpt_hf {importlib.metadata.version('shortgpt_hf')}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """ShortGPT layer pruning for Hugging Face causal LMs."""


def command(**options: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``app.command``, with Ctrl-C turned into our one-line error: typer would
    otherwise exit 130 without a word, and the user could not tell whether the
    output was written (it never is half-written: every write is atomic)."""

    def register(function: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                function(*args, **kwargs)
            except KeyboardInterrupt:
                raise ShortGPTError("interrupted; no output was left half-written") from None

        return app.command(**options)(run)

    return register


ModelArg = Annotated[
    str,
    typer.Argument(
        help="Built-in name (smollm2-135m, gemma3-270m), or a folder or Hub id holding a dense model, "
        "a pruned checkpoint or a recipe."
    ),
]
DTYPES = ("auto", "float32", "bfloat16", "float16")
DtypeOption = Annotated[
    str,
    typer.Option(
        help="Load and compute in this dtype: auto (the checkpoint's own, as transformers does), float32, bfloat16 or "
        "float16. What a command saves is saved in it."
    ),
]
DeviceMapOption = Annotated[Optional[str], typer.Option(help="accelerate device_map, e.g. auto.")]


def _from_pretrained_kwargs(dtype: str, device_map: Optional[str]) -> dict:
    import torch

    if dtype not in DTYPES:
        raise InvalidRequest(f"--dtype must be one of {', '.join(DTYPES)}")
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    return kwargs


def _load(model: str, dtype: str, device_map: Optional[str], adapters: bool = False, revision: Optional[str] = None):
    from .loading import load_model

    return load_model(model, adapters=adapters, revision=revision, **_from_pretrained_kwargs(dtype, device_map))


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidRequest(f"--layers must be comma-separated integers, got {text!r}") from None


def _score(
    model,
    tokenizer,
    metric: str,
    calibration: Optional[Path],
    seq_len: int,
    max_tokens: int,
    batch_size: int,
    block_size: int = 1,
    max_layers: Optional[int] = None,
):
    from .scoring import score_layers

    return score_layers(
        model,
        calibration,
        metric,
        tokenizer=tokenizer,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        block_size=block_size,
        max_layers=max_layers,
    )


def _calibration_sources(given: Optional[list[str]]) -> Any:
    """``--calibration`` as a request holds it: one source as it is, several (or any weight) as a mixture."""
    if not given:
        return None
    sources: dict[str, float] = {}
    for item in given:
        path, colon, weight = item.rpartition(":")
        try:
            sources[path if colon else item] = float(weight) if colon else 1.0
        except ValueError:  # the colon belongs to the path
            sources[item] = 1.0
    if len(sources) == 1 and next(iter(sources.values())) == 1.0:
        return next(iter(sources))
    return sources


def _training_free_methods() -> list[str]:
    return [name for name, method in RECOVERY_METHODS.items() if method.needs_removed_layers]


@command()
def score(
    model: ModelArg = DEFAULT_MODEL,
    calibration: Annotated[
        Optional[Path],
        typer.Option(help="UTF-8 text file (default: the packaged mixture of plays, Wikipedia articles and code)."),
    ] = None,
    metric: Annotated[str, typer.Option(help=f"One of: {', '.join(METRICS)}.")] = "bi",
    lowest: Annotated[int, typer.Option(help="How many lowest-scoring layers to mark.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Calibration window length in tokens.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Calibration tokens to use.")] = 8192,
    batch_size: int = 8,
    block_size: Annotated[int, typer.Option(help="Score blocks of n consecutive layers (angular metric).")] = 1,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the scores as JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG bar chart here.")] = None,
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Score every decoder layer (Block Influence by default) and mark the lowest."""
    from .config import ShortGPTConfig

    if calibration is not None:
        read_text_file(calibration)
    m, tok = _load(model, dtype, device_map)
    greedy = lowest if metric in METRICS and METRICS[metric].greedy and 0 < lowest else None  # as far as asked
    result = _score(m, tok, metric, calibration, seq_len, max_tokens, batch_size, block_size, max_layers=greedy)
    marked = set(result.lowest(lowest if block_size == 1 else block_size)) if 0 < lowest < result.num_layers else set()
    record = ShortGPTConfig.from_model(m)
    show(score_table(result, marked, record.kept_layers if record else None))
    if json_out:
        result.to_json(json_out)
        say(f"scores written to {json_out}")
    if plot:
        result.plot(plot, highlight=len(marked) if block_size == 1 else 0)
        say(f"chart written to {plot}")


@command()
def prune(
    model: ModelArg = DEFAULT_MODEL,
    n_layers: Annotated[Optional[int], typer.Option(help="Remove this many lowest-scoring layers.")] = None,
    ratio: Annotated[
        Optional[float],
        typer.Option(
            help="Remove this fraction of layers, rounded to the nearest layer, halves up (25% of 18 is 5). "
            "Default 0.25 when nothing else is given."
        ),
    ] = None,
    layers: Annotated[Optional[str], typer.Option(help="Remove exactly these current layers, e.g. 3,7,9.")] = None,
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder (default ./<model>-shortgpt).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    recipe: Annotated[
        bool,
        typer.Option(
            help="Write a recipe instead of a full checkpoint: the base's id and the removed layers (a few KB of "
            "JSON), plus the tokenizer files and any repair maps."
        ),
    ] = False,
    metric: Annotated[str, typer.Option(help=f"One of: {', '.join(METRICS)}.")] = "bi",
    calibration: Annotated[
        Optional[list[str]],
        typer.Option(
            help="UTF-8 text file, or folder of .txt files (default: the packaged mixture of plays, Wikipedia "
            "articles and code). Repeat it for a mixture, each as FILE or FILE:WEIGHT (e.g. --calibration "
            "news.txt:2 --calibration code/): each source gets its weight's share of the tokens."
        ),
    ] = None,
    seq_len: int = 256,
    max_tokens: int = 8192,
    batch_size: int = 8,
    recovery: Annotated[
        str,
        typer.Option(
            help="Repair the removal as part of it, with no training: none, linear (a least-squares map per "
            "removed gap, folded into the kept weights) or cosine (the same map fitted for cosine distance). "
            "Healing that trains is `shortgpt heal`."
        ),
    ] = "none",
    ridge: Annotated[
        float, typer.Option(help="Ridge term of the linear repair, relative to the mean activation energy (0: none).")
    ] = 0.0,
    recovery_tokens: Annotated[
        Optional[int],
        typer.Option(
            help="Calibration tokens for the repair (default: all of --calibration; the packaged mixture is about "
            "110k tokens of SmolLM2-135M, minutes on 2 CPU cores; 32768 take about 1)."
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            help="Check cache parity and the saved checkpoint's logits (layer by layer: the written checkpoint's "
            "logits against the base's with the layers skipped, reading each once more)."
        ),
    ] = True,
    measure: Annotated[
        bool,
        typer.Option(
            help="Measure the result against its base on every genre of the held-out suite (KL divergence, top-1 "
            f"agreement, perplexity ratio; the first {SUMMARY_TOKENS} tokens of each) and keep it in the record."
        ),
    ] = True,
    load: Annotated[
        str,
        typer.Option(
            help="full: hold the model in memory; layer-by-layer: score one layer at a time and write the checkpoint "
            "tensor by tensor from the base's safetensors (for models larger than memory); auto: layer-by-layer "
            "when the checkpoint is larger than 70% of the free memory."
        ),
    ] = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Score (if needed), remove layers (and repair them with --recovery linear), and save a native checkpoint."""
    from .config import ShortGPTConfig
    from .pipeline import LAYER_BY_LAYER, prune_to_folder

    if n_layers is not None and ratio is not None:
        raise InvalidRequest("give only one of --n-layers and --ratio")
    if layers is not None and (n_layers is not None or ratio is not None):
        raise InvalidRequest("--layers cannot be combined with --n-layers or --ratio")
    if load not in LOADS:
        raise InvalidRequest(f"--load must be one of {', '.join(LOADS)}, got {load!r}")
    if load == "layer-by-layer" and device_map:
        raise InvalidRequest("--load layer-by-layer places one layer at a time itself; give no --device-map")
    if recovery != "none" and recovery not in _training_free_methods():
        raise InvalidRequest(
            f"--recovery must be none or one of {', '.join(_training_free_methods())}, got {recovery!r} "
            "(healing that trains: shortgpt heal)"
        )
    config = ShortGPTConfig(
        layers=_parse_layers(layers) if layers is not None else None,
        n_layers=n_layers,
        ratio=ratio,
        metric=metric,
        calibration=_calibration_sources(calibration),
        calibration_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        recovery=None if recovery == "none" else [{"method": recovery, **({"ridge": ridge} if ridge else {})}],
        recovery_tokens=recovery_tokens,
        verify=verify,
        measure=measure,
    )
    result = prune_to_folder(
        model,
        config,
        out_dir or Path(f"{Path(model.rstrip('/')).name}-shortgpt"),
        recipe=recipe,
        overwrite=overwrite,
        layer_by_layer=LOADS[load],
        **_from_pretrained_kwargs(dtype, device_map),
    )
    record = result.config
    say(
        f"removed layers (original indices): {record.removed_layers}"
        + (f" by {record.metric}" if result.scores else "")
    )
    say(f"layers: {result.num_layers_before} -> {record.num_hidden_layers}")
    if record.fidelity is not None:
        _print_fidelity(record.fidelity)
    elif measure and result.kind == "checkpoint":
        say("fidelity not measured: a checkpoint written layer by layer is never built (shortgpt eval it --reference)")
    for step in result.recovery:
        say(f"{step['method']} repair on {step['tokens']:,} tokens: {_gaps(step)}")
        _print_perplexities(step)
    before, after = result.parameters_before, result.parameters_after
    say(f"parameters: {before:,} -> {after:,} ({100 * (1 - after / before):.1f}% fewer)")
    if result.kind == "recipe":
        built = " (verified: cache parity and reload logits)" if result.verified else ""
        never = " (not verified: a recipe written layer by layer is never built)"
        say(f"recipe saved to {result.folder}" + (never if result.path == LAYER_BY_LAYER else built))
    elif result.path == LAYER_BY_LAYER:
        checked = "verified: its logits, layer by layer, equal the base's with those layers removed" + (
            " and the maps applied" if result.recovery else ""
        )
        say(
            f"checkpoint written tensor by tensor to {result.folder} ({checked if result.verified else 'not verified'})"
        )
    else:
        checked = " (verified: cache parity and reload logits)" if result.verified else ""
        say(f"checkpoint saved to {result.folder}{checked}")


@command()
def materialize(
    model: Annotated[
        str, typer.Argument(help="A recipe, or a dense model with --layers: folder or Hub id, in safetensors.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder for the pruned checkpoint.")],
    layers: Annotated[
        Optional[str], typer.Option(help="For a dense model: the layers to remove (original indices), e.g. 3,7,9.")
    ] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard to write, as transformers reads it.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            help="Check, layer by layer, that the written checkpoint's logits equal the base's with the layers "
            "skipped (reads each once more)."
        ),
    ] = True,
) -> None:
    """Write a pruned checkpoint tensor by tensor from the base's safetensors shards, never holding the model:
    the same files save_pruned writes, for models larger than memory."""
    from .streaming import materialize as write

    chosen = _parse_layers(layers) if layers is not None else None
    saved = write(
        model, out_dir, removed_layers=chosen, max_shard_size=max_shard_size, verify=verify, overwrite=overwrite
    )
    say(f"checkpoint written tensor by tensor to {saved}" + (" (verified layer by layer)" if verify else ""))


LOADS = {"auto": None, "full": False, "layer-by-layer": True}  # --load: layer_by_layer of the pipeline


def _print_perplexities(step: dict[str, Any]) -> None:
    """A repair's held-out perplexity before and after, as its record holds them."""
    from .texts import HELDOUT_PLAYS

    if "perplexity_after" not in step:
        say("held-out perplexity not measured: a recipe written layer by layer is never built (shortgpt eval it)")
        return
    say(
        f"held-out perplexity {step['perplexity_before']:.2f} (plain removal) -> "
        f"{step['perplexity_after']:.2f} (repaired)"
    )
    say(f"  measured on {step['perplexity_settings']} of the held-out play {HELDOUT_PLAYS[0]}")


def _print_fidelity(fidelity: dict[str, Any]) -> None:
    """The record's drift from the base, genre by genre, then the means: what to judge a prune by first."""
    say(f"against the dense model, on the held-out suite ({fidelity['settings']} of each genre):")
    say(f"  {'genre':<20}{'ppl x dense':>12}{'KL mean':>9}{'KL p99':>8}{'top-1':>7}")
    unseen = fidelity["unseen"]
    rows = [(name, f) for name, f in fidelity["domains"].items()]
    rows += [("mean", fidelity["mean"]), ("unseen mean", fidelity["unseen_mean"])]
    for name, f in rows:
        label = f"{name} (unseen)" if name in unseen else name
        say(
            f"  {label:<20}{f['perplexity_ratio']:>12.3f}{f['kl_mean']:>9.3f}{f['kl_p99']:>8.2f}"
            f"{f['top1_agreement']:>7.3f}"
        )
    said = f"  unseen: {', '.join(unseen)}, genres the default calibration never reads"
    if not fidelity.get("default_calibration", True):
        said += " (this model was calibrated or healed on other text, which may be of those genres)"
    say(said)


def _gaps(step: dict[str, Any]) -> str:
    """A linear repair's gaps and where each map went, for one line of output."""
    return ", ".join(f"{g['removed']} -> {g['folded_into'] if g['map'] else 'unrepaired'}" for g in step["gaps"])


@command()
def load(
    model: Annotated[str, typer.Argument(help="Pruned checkpoint or recipe: folder or Hub id.")],
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Load a pruned checkpoint or a recipe and summarise it."""
    from collections import Counter

    from .config import ShortGPTConfig
    from .modeling import PrunedForCausalLM
    from .pruning import count_parameters

    m = PrunedForCausalLM.from_pretrained(model, **_from_pretrained_kwargs(dtype, device_map))
    record = ShortGPTConfig.from_model(m)
    say(f"{type(m).__name__}: {record.num_hidden_layers} of {record.original_num_hidden_layers} layers ({record.mode})")
    say(
        f"removed layers (original indices): {record.removed_layers}"
        + (f" by {record.metric}" if record.metric else "")
    )
    say(f"base: {record.base_model_name_or_path}" + (f" @ {record.base_revision}" if record.base_revision else ""))
    say(f"parameters: {count_parameters(m):,} ({m.dtype})")
    if getattr(m, "hf_device_map", None):
        say(
            "placement: "
            + ", ".join(f"{n} modules on {d}" for d, n in Counter(map(str, m.hf_device_map.values())).items())
        )


@command()
def generate(
    model: ModelArg = DEFAULT_MODEL,
    prompt: Annotated[str, typer.Option(help="The prompt text.")] = "Friends, Romans, countrymen, lend me your ears;",
    max_new_tokens: int = 64,
    prefill_skip: Annotated[Optional[int], typer.Option(help="Skip this many lowest-BI layers during prefill.")] = None,
    layers: Annotated[
        Optional[str], typer.Option(help="Skip exactly these layers during prefill, e.g. 12,13,14.")
    ] = None,
    boundary: Annotated[bool, typer.Option(help="Run the last prompt token through the full model (POP).")] = True,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Generate text, optionally with ShortGPT-gen prefill skipping; print the time to first token."""
    import time

    from transformers.generation.streamers import BaseStreamer

    from .layers import find_decoder_layers
    from .prefill_skip import check_prefill_skip, enable_prefill_skip
    from .selection import removal_count

    if prefill_skip is not None and layers is not None:
        raise InvalidRequest("give only one of --prefill-skip and --layers")
    chosen = _parse_layers(layers) if layers is not None else None
    m, tok = _load(model, dtype, device_map)
    if prefill_skip is not None:
        check_prefill_skip(m)  # before minutes of scoring
        count = removal_count(len(find_decoder_layers(m).layers), n_layers=prefill_skip)
        chosen = _score(m, tok, "bi", None, 256, 8192, 8).lowest(count)
    if chosen is not None:
        enable_prefill_skip(m, chosen, boundary=boundary)
        say(f"skipping layers {chosen} during prefill" + (" (last prompt token dense)" if boundary else ""))

    class FirstToken(BaseStreamer):
        """Timestamps the first generated token (generate's first put() is the prompt)."""

        def __init__(self) -> None:
            self.calls, self.first = 0, None

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    inputs = tok(prompt, return_tensors="pt").to(m.device)
    timer = FirstToken()
    start = time.perf_counter()
    ids = m.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        streamer=timer,
        pad_token_id=tok.pad_token_id or tok.eos_token_id,
    )
    total = time.perf_counter() - start
    new = ids.shape[1] - inputs.input_ids.shape[1]
    say(prompt + tok.decode(ids[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    say(
        f"time to first token: {timer.first - start:.3f}s; {new} tokens in {total:.2f}s "
        f"({inputs.input_ids.shape[1]}-token prompt)"
    )


def _split(text: Optional[str]) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@command(name="eval")
def eval_(
    models: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Models to evaluate side by side: built-in names, folders (checkpoints, recipes, PEFT adapters) "
            "or Hub ids. Default: smollm2-135m."
        ),
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated: suite (every genre of the held-out suite), ppl, ppl:FILE, mc, "
            "mc:general_knowledge+emoji_movie, mc:TASK.json."
        ),
    ] = ",".join(DEFAULT_TASKS),
    lm_eval_tasks: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated lm-evaluation-harness tasks (needs lm-eval and the tasks' data)."),
    ] = None,
    lm_eval_include: Annotated[Optional[Path], typer.Option(help="Folder of your own lm-eval task YAMLs.")] = None,
    limit: Annotated[
        Optional[int], typer.Option(help="At most this many questions per multiple-choice / lm-eval task.")
    ] = None,
    with_base: Annotated[
        bool, typer.Option(help="Also evaluate the pruned model's recorded base and show both.")
    ] = False,
    reference: Annotated[
        Optional[str],
        typer.Option(
            help="A dense model to measure fidelity to, on every perplexity text: KL(dense || model) per token "
            "(mean, 99th percentile), top-1 agreement and the perplexity ratio."
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Perplexity window in tokens.")] = HEADLINE.seq_len,
    stride: Annotated[
        Optional[int],
        typer.Option(
            help="Move each perplexity window by this many tokens "
            "(default: disjoint windows; smaller: more context per token, slower)."
        ),
    ] = HEADLINE.stride,
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity.")] = HEADLINE.max_tokens,
    batch_size: int = 8,
    json_out: Annotated[
        Optional[Path], typer.Option("--json", help="Write the results as JSON here (shortgpt push --eval reads it).")
    ] = None,
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Evaluate models, pruned checkpoints, recipes or adapters: perplexity, multiple choice, lm-eval tasks.

    Several models are evaluated one after another on the same data and shown
    side by side (e.g. plain removal, linear repair, LoRA healing and both)."""
    from .atomic import write_file
    from .config import ShortGPTConfig
    from .evaluation import check_tasks, evaluate

    models = models or [DEFAULT_MODEL]
    if lm_eval_include is not None and not lm_eval_include.is_dir():
        raise InvalidRequest(f"--lm-eval-include is not a folder: {lm_eval_include}")
    check_tasks(_split(tasks))
    if not _split(tasks) and not _split(lm_eval_tasks):
        raise InvalidRequest("nothing to evaluate: give --tasks and/or --lm-eval-tasks")
    if reference is not None:
        from .sources import resolve

        resolve(reference)  # a reference that is not there is refused before any model is loaded
    if with_base and len(models) > 1:
        raise InvalidRequest(
            "--with-base compares one model with its base; to compare several, list the base among them"
        )
    options = dict(
        tasks=_split(tasks),
        lm_eval_tasks=_split(lm_eval_tasks),
        lm_eval_include=lm_eval_include,
        lm_eval_limit=limit,
        seq_len=seq_len,
        stride=stride,
        max_tokens=max_tokens,
        mc_limit=limit,
        batch_size=batch_size,
    )
    if reference is not None:
        options["reference"] = _reference(reference, dtype, device_map)
    if len(models) > 1:
        reports = []
        for name in models:
            m, tok = _load(name, dtype, device_map, adapters=True)
            reports.append(evaluate(m, tok, name=name, **options))
            del m
        show(eval_table(reports))
        if json_out:
            write_file(json_out, json.dumps([r.to_dict() for r in reports], indent=2) + "\n")
            say(f"results written to {json_out}")
        return
    model = models[0]
    m, tok = _load(model, dtype, device_map, adapters=True)
    record = ShortGPTConfig.from_model(m)
    if with_base and record is None:
        raise InvalidRequest(f"--with-base needs a pruned model; {model!r} is not one")
    report = evaluate(m, tok, name=model, **options)
    if with_base:
        del m
        base, base_tok = _load(record.base_model_name_or_path, dtype, device_map, revision=record.base_revision)
        report.baseline = evaluate(base, base_tok, name=record.base_model_name_or_path, **options)
    show(eval_table([report]))
    if json_out:
        report.to_json(json_out)
        say(f"results written to {json_out}")


def _reference(name: str, dtype: str, device_map: Optional[str]) -> Any:
    """The dense model fidelity is measured against: in memory when it fits, else walked layer by layer
    from its shards (the same choice, said the same way, as a prune's)."""
    from .pipeline import choose_path
    from .sources import resolve
    from .streaming import WalkedReference

    kwargs = _from_pretrained_kwargs(dtype, device_map)
    streaming, why = choose_path(resolve(name), None, kwargs["dtype"], device_map)
    say(f"reference {name}: {'layer by layer, from the safetensors shards' if streaming else 'in memory'} ({why})")
    if streaming:
        return WalkedReference(name, dtype=None if dtype == "auto" else kwargs["dtype"])
    return _load(name, dtype, device_map)[0]


@command()
def ablate(
    model: ModelArg = DEFAULT_MODEL,
    ratios: Annotated[str, typer.Option(help="Comma-separated fractions of layers to remove.")] = "0.1,0.2,0.3",
    metrics: Annotated[str, typer.Option(help=f"Comma-separated, from: {', '.join(METRICS)}.")] = ",".join(
        default_metrics()
    ),
    recoveries: Annotated[
        str,
        typer.Option(help=f"Comma-separated ways to recover each removal, from: {', '.join(recovery_choices())}."),
    ] = "none",
    lora_steps: Annotated[int, typer.Option(help="LoRA healing steps for the lora recoveries.")] = 50,
    iterative: Annotated[
        bool, typer.Option(help="Also remove one layer at a time, re-scoring in between (hidden-state metrics).")
    ] = False,
    tasks: Annotated[str, typer.Option(help="Comma-separated evaluation tasks, as for shortgpt eval.")] = "ppl,mc",
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", help="Output folder for ablation.json and the plots (default ./<model>-ablation)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    calibration: Annotated[
        Optional[Path], typer.Option(help="UTF-8 text file (default: the packaged mixture of three genres).")
    ] = None,
    calibration_tokens: Annotated[int, typer.Option(help="Calibration tokens for scoring.")] = 8192,
    limit: Annotated[Optional[int], typer.Option(help="At most this many questions per multiple-choice task.")] = None,
    max_tokens: Annotated[
        int, typer.Option(help="Held-out tokens for perplexity (windows as in shortgpt eval).")
    ] = HEADLINE.max_tokens,
    seed: Annotated[int, typer.Option(help="Seed of the random baseline.")] = 0,
    fidelity: Annotated[
        bool,
        typer.Option(
            help="Also measure every run against the dense model on each perplexity text: KL(dense || run), top-1 "
            "agreement, perplexity ratio (a second copy of the model, or walked layer by layer if it does not fit)."
        ),
    ] = False,
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Prune with every metric at every ratio, evaluate each, and plot (the paper's Figures 4-5)."""
    from .ablation import ablate as run_ablation
    from .ablation import check_request
    from .atomic import atomic_folder, check_destination

    try:
        fractions = [float(r) for r in _split(ratios)]
    except ValueError:
        raise InvalidRequest(f"--ratios must be comma-separated numbers, got {ratios!r}") from None
    request = dict(
        ratios=fractions,
        metrics=_split(metrics),
        schedules=("one-shot", "iterative") if iterative else ("one-shot",),
        tasks=_split(tasks),
        recoveries=_split(recoveries),
    )
    check_request(**request)
    if calibration is not None:
        read_text_file(calibration)
    target = out_dir or Path(f"{Path(model.rstrip('/')).name}-ablation")
    check_destination(target, overwrite)
    m, tok = _load(model, dtype, device_map)
    reference = _reference(model, dtype, device_map) if fidelity else None
    result = run_ablation(
        m,
        tok,
        **request,
        calibration=calibration,
        calibration_tokens=calibration_tokens,
        recovery_options={"lora": {"steps": lora_steps}},
        seed=seed,
        name=model,
        mc_limit=limit,
        max_tokens=max_tokens,
        reference=reference,
    )
    with atomic_folder(target, overwrite) as tmp:
        result.to_json(tmp / "ablation.json")
        plots = result.plot(tmp)
    for table in ablation_tables(result):
        show(table)
    say(f"ablation.json and {len(plots)} plots written to {target}")


@command()
def push(
    folder: Annotated[
        str, typer.Argument(help="A pruned checkpoint or recipe (from shortgpt prune): folder or Hub id.")
    ],
    repo_id: Annotated[str, typer.Argument(help="Hub repo, e.g. your-name/smollm2-135m-shortgpt.")],
    private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
    recipe: Annotated[
        bool, typer.Option(help="Push only the recipe (base id + removed layers), not the weights.")
    ] = False,
    create_pr: Annotated[bool, typer.Option(help="Open a pull request instead of committing to main.")] = False,
    message: Annotated[Optional[str], typer.Option(help="Commit message.")] = None,
    eval_json: Annotated[
        Optional[Path],
        typer.Option(
            "--eval",
            help="Results JSON from shortgpt eval for the card: of this model with --with-base, or of several models "
            "(this one and its dense base give the side-by-side table).",
        ),
    ] = None,
) -> None:
    """Upload a pruned model with its model card in one commit (token: `hf auth login` or HF_TOKEN)."""
    from .evaluation import EvalReport
    from .push import push_to_hub

    rows = EvalReport.from_json(eval_json, model=folder).card_rows() if eval_json else None
    url = push_to_hub(
        folder,
        repo_id,
        "recipe" if recipe else "full",
        private=private,
        create_pr=create_pr,
        commit_message=message,
        eval_results=rows,
    )
    say(f"pushed {folder} to {repo_id}: {url}")


@command()
def heal(
    pruned: Annotated[
        str, typer.Argument(help="A saved pruned checkpoint or recipe (from shortgpt prune): folder or Hub id.")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to write the adapter (or, with --merge, the merged checkpoint).")
    ],
    data: Annotated[
        Optional[Path], typer.Option(help="Training text file (default: the packaged calibration mixture).")
    ] = None,
    teacher: Annotated[
        str,
        typer.Option(
            help="Dense model to distil from: base (the model the pruned one was cut from), a built-in name, "
            "folder or Hub id. --kd-weight 0 trains on cross-entropy instead and loads none."
        ),
    ] = "base",
    steps: int = 50,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: 2e-4).")] = None,
    r: int = 8,
    alpha: int = 16,
    layers: Annotated[str, typer.Option(help="all, adjacent, or post-pruning indices like 3,4,5.")] = "all",
    seq_len: int = 256,
    batch_size: int = 4,
    kd_weight: Annotated[
        float,
        typer.Option(help="Weight of KL to the teacher in the loss; the rest is cross-entropy on --data (0: none)."),
    ] = 1.0,
    merge: Annotated[bool, typer.Option(help="Merge the adapter and save a native checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    measure: Annotated[
        bool, typer.Option(help="Measure the healed model against its dense base on the held-out suite.")
    ] = True,
) -> None:
    """LoRA-heal a pruned model (PEFT + accelerate; runs under `accelerate launch` too).

    By default the adapters learn to match the dense model the pruned one was
    cut from (KL divergence, on the packaged calibration mixture): on genres
    no training text comes from, that kept the dense model's behaviour better
    than cross-entropy, which adapts the model to its training text instead.
    Then the healed model is measured against the dense model on the suite.

    Cost, for SmolLM2-135M on 2 idle CPU cores: about 5 s a step and a 4.4 GiB
    peak with the teacher (3 s and 3.6 GiB with --kd-weight 0); 50 steps take
    about 4.5 minutes (3 without a teacher), several times longer on shared cores."""
    from accelerate import PartialState

    from .atomic import check_destination
    from .config import ShortGPTConfig
    from .pipeline import record_fidelity
    from .recovery import heal as heal_model
    from .recovery import save_healed
    from .sources import resolve

    if data is not None:
        read_text_file(data)
    chosen = layers if layers in ("all", "adjacent") else _parse_layers(layers)
    if teacher != "base" and kd_weight > 0:
        resolve(teacher)  # a teacher that is not there is refused before the student is loaded
    check_destination(out_dir, overwrite)
    m, tok = _load(pruned, "auto", None)
    record = ShortGPTConfig.from_model(m)
    if record is None:
        raise InvalidRequest(
            f"{resolve(pruned).describe()} has no layers removed: prune it first (shortgpt prune {pruned}), "
            "then heal what it writes"
        )
    healed = heal_model(
        m,
        data,
        tokenizer=tok,
        steps=steps,
        lr=lr,
        r=r,
        alpha=alpha,
        layers=chosen,
        seq_len=seq_len,
        batch_size=batch_size,
        teacher=teacher,
        kd_weight=kd_weight,
    )
    step = healed.get_base_model().config.shortgpt["recovery"][-1]
    distilled = f", distilled from {step['teacher']}" if step["teacher"] else ", on cross-entropy"
    say(f"healed: {steps} step{'s' if steps != 1 else ''} ({step['tokens']:,} tokens{distilled})")
    if measure and PartialState().is_main_process:  # under accelerate launch, one process measures and says it
        if not record.base_model_name_or_path:
            say("fidelity not measured: this pruned model records no dense base")
        else:
            pruned_on_default = (record.fidelity or {}).get("default_calibration", True)
            record_fidelity(
                healed,
                tok,
                record.base_model_name_or_path,
                revision=record.base_revision,
                seq_len=seq_len,
                default_calibration=data is None and pruned_on_default,
            )
            fidelity = healed.get_base_model().config.shortgpt["fidelity"]
            if fidelity:
                _print_fidelity(fidelity)
    saved = save_healed(healed, out_dir, tok, merge=merge, overwrite=overwrite)
    say(f"{'merged checkpoint' if merge else 'adapter'} saved to {saved}")


def main() -> None:
    """Run the CLI: a mistake, a fault of the machine or the network, or Ctrl-C ends
    in one ``shortgpt: error:`` line and exit status 2. Every write is atomic
    (`shortgpt_hf.atomic`), so nothing half-written is left behind either way."""
    # From here on Ctrl-C is a KeyboardInterrupt again (the console script exits at
    # once while it imports), so that a write under way can remove what it began.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _show_library_messages()
    try:
        command = typer.main.get_command(app)
        _plain_placeholders(command)
        code = command.main(prog_name="shortgpt", standalone_mode=False)
    except ShortGPTError as e:
        _fail(str(e))
    except (KeyboardInterrupt, typer.Abort):  # typer turns Ctrl-C while parsing into Abort
        _fail("interrupted; nothing was written")
    except _click.UsageError as e:
        if isinstance(e, getattr(_click, "NoArgsIsHelpError", ())):
            e.show()  # plain `shortgpt`: the help, as a usage error
            sys.exit(2)
        where = e.ctx.command_path if e.ctx else "shortgpt"
        _fail(f"{' '.join(e.format_message().split()).rstrip('.')}; see {where} --help")
    except _click.ClickException as e:
        _fail(" ".join(e.format_message().split()))
    except Exception as e:
        reason = fault(e)
        if reason is None:
            raise  # a bug in shortgpt_hf: keep its traceback
        _fail(reason)
    if code == 130:  # typer's exit status for a Ctrl-C it caught itself
        _fail("interrupted; nothing was written")
    if code:
        sys.exit(code)


class _Said(logging.Handler):
    """The library's messages as the CLI's own: what it reports (the path a prune takes, and
    why) as a line of output, what it warns about on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            print(record.getMessage(), file=sys.stderr, flush=True)
        else:
            say(record.getMessage())


def _show_library_messages() -> None:
    logger = logging.getLogger("shortgpt_hf")
    if not any(isinstance(h, _Said) for h in logger.handlers):
        logger.addHandler(_Said(logging.INFO))
    logger.setLevel(logging.INFO)


def _plain_placeholders(group: typer.core.TyperGroup) -> None:
    """Help in the usual Unix style (``--out DIR``, ``--steps N``, flags bare,
    ``[MODEL]`` or ``MODEL`` on the usage line) instead of typer's ``<path>``,
    ``<int>`` and ``<bool>`` tags and its ``{MODEL}`` for a required argument."""
    for command in group.commands.values():
        for param in command.params:
            kind = param.type_descriptor
            if isinstance(param, typer.core.TyperArgument):
                param.metavar = param.name.upper()
                param.get_usage_pieces = lambda ctx, arg=param: [_usage_name(arg)]
                placeholder = None
            elif getattr(param, "is_flag", False):
                placeholder = None
            elif kind.is_path:
                placeholder = "DIR" if param.name.endswith(("dir", "include")) else "FILE"
            else:
                placeholder = {int: "N", float: "X"}.get(kind.annotation, "TEXT")
            param.display_type_rich = lambda ctx, text=placeholder: text
    for command in [group, *group.commands.values()]:  # click adds --help itself, when help is asked for
        command.get_help_option = lambda ctx, original=command.get_help_option: _bare(original(ctx))


def _usage_name(argument: typer.core.TyperArgument) -> str:
    name = argument.metavar if argument.required else f"[{argument.metavar}]"
    return name + ("..." if argument.nargs != 1 else "")


def _bare(option: typer.core.TyperOption | None) -> typer.core.TyperOption | None:
    if option is not None:
        option.display_type_rich = lambda ctx: None
    return option


def _fail(message: str) -> None:
    from tqdm import tqdm

    if getattr(tqdm, "_instances", None):  # a progress bar cut off mid-line: the error starts a line of its own
        sys.stderr.write("\n")
    print(f"shortgpt: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
