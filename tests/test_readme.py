"""The README's Python snippets run as a reader would run them: as written, in
order, in one fresh process, in an empty folder, on the real built-in model.

Nothing is stood in or patched, and no file is made for them beforehand: a
snippet that reads a file (training text, a local lm-eval task) writes it
itself, and the others read what an earlier snippet saved. The one thing the
test provides is the Hub that the two pushes write to: HF_ENDPOINT and
HF_TOKEN point at the local Hub-API server (`hub_server.py`), as a reader's
token points at huggingface.co; the client is the real huggingface_hub. What
the snippets print and write is checked against what the README says.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer

from shortgpt_hf import BUILTINS
from shortgpt_hf.recovery.linear import MAPS_FILE

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
TOKEN = "hf_readme_token"
BI_LAYERS = [12, 13, 14, 15, 16, 17, 25, 26]  # SmolLM2-135M's 8 lowest-BI layers, as the README states
PUSHED = ("your-name/smollm2-135m-shortgpt", "me/smollm2-shortgpt")


def code_of(block: str) -> str:
    """A snippet without its comment lines (where the Hub alternatives are shown)."""
    return "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#"))


def test_every_snippet_prints_and_needs_no_hub_to_read_a_model():
    assert len(BLOCKS) == 8, "the README's Python examples changed; update this test's expectations"
    hub_ids = {spec.hub_id for spec in BUILTINS.values()} | {"HuggingFaceTB/SmolLM2-135M"}
    for i, block in enumerate(BLOCKS, 1):
        code = code_of(block)
        assert "print(" in code, f"README block {i} prints nothing of what it computes"
        named = [hub_id for hub_id in hub_ids if hub_id in code]
        assert not named, f"README block {i} reads {named} from the Hub: run a built-in, show the Hub id in a comment"


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_python_snippets_run_as_written(tmp_path):
    from shortgpt_hf.builtin import cache_home

    program = "".join(f"\nprint('--- README block {i}', flush=True)\n{block}" for i, block in enumerate(BLOCKS, 1))
    work = tmp_path / "work"
    work.mkdir()
    with HubServer(token=TOKEN) as hub:
        env = os.environ | dict(
            HF_ENDPOINT=hub.endpoint,
            HF_TOKEN=TOKEN,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(tmp_path / "hf_home"),  # the client's caches; the converted built-in stays where it is
            SHORTGPT_HF_HOME=str(cache_home()),
        )
        result = subprocess.run(
            [sys.executable, "-c", program], cwd=work, env=env, capture_output=True, text=True, timeout=1800
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        pushed = {repo: hub.files(repo) for repo in PUSHED}

    parts = re.split(r"^--- README block (\d+)$", result.stdout, flags=re.M)
    printed = {int(n): lines_of(text) for n, text in zip(parts[1::2], parts[2::2], strict=True)}
    assert sorted(printed) == list(range(1, len(BLOCKS) + 1)), result.stdout[-3000:]
    assert all(printed.values()), f"a README block printed nothing: {printed}"

    # 1: the front door prunes the same 8 lowest-BI layers on load and saves them with save_pretrained;
    # step by step: scores, held-out perplexity 150.5; a checkpoint and a recipe
    assert ast.literal_eval(printed[1][0]) == BI_LAYERS
    front = json.loads((work / "smollm2-front-door" / "config.json").read_text())
    assert front["shortgpt"]["removed_layers"] == BI_LAYERS and front["shortgpt"]["request"]["ratio"] == 0.25
    lowest, scores = printed[1][1].split("] [")
    assert ast.literal_eval(lowest + "]") == BI_LAYERS and len(ast.literal_eval("[" + scores)) == 30
    plain = float(printed[1][2])
    assert plain == pytest.approx(150.5, abs=0.1)
    config = json.loads((work / "smollm2-pruned" / "config.json").read_text())
    assert config["shortgpt"]["removed_layers"] == BI_LAYERS and config["num_hidden_layers"] == 22
    assert (work / "smollm2-pruned" / "model.safetensors").stat().st_size > 400e6
    recipe = work / "smollm2-recipe"
    assert (recipe / "shortgpt_config.json").stat().st_size < 2048 and not (recipe / "model.safetensors").exists()
    assert round(folder_mib(recipe), 1) == 3.4  # the size the README gives, nearly all of it the tokenizer

    # 2: the recipe generates through pipeline; prune on load keeps 27 of 30 layers
    assert printed[2][0].startswith("To be, or not to be,") and len(printed[2][0]) > len("To be, or not to be,")
    assert printed[2][-1] == "27"

    # 3: linear repair on 4,096 tokens of the default mixture: 99.7, against 150.5 for plain removal
    repaired = float(printed[3][0])
    assert repaired == pytest.approx(99.7, abs=1.0) and repaired < 0.7 * plain
    config = json.loads((work / "smollm2-repaired" / "config.json").read_text())
    assert [step["method"] for step in config["shortgpt"]["recovery"]] == ["linear"]
    assert (work / "smollm2-repaired-recipe" / MAPS_FILE).exists() and (work / "smollm2-repaired" / MAPS_FILE).exists()
    assert round(folder_mib(work / "smollm2-repaired-recipe"), 1) == 5.9

    # 4: healing writes its own text files, records perplexity before and after, saves an adapter
    before, after = (float(x) for x in printed[4][0].split(" -> "))
    assert before == pytest.approx(171.6, abs=0.1) and after < before  # unhealed as in "Measured", then lower
    assert (work / "train.txt").stat().st_size > 100_000 and (work / "heldout.txt").stat().st_size > 100_000
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (work / "smollm2-healed").iterdir()}

    # 5: the pushed checkpoint, with its card
    assert "/your-name/smollm2-135m-shortgpt/commit/" in printed[5][0]
    files = pushed["your-name/smollm2-135m-shortgpt"]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert b"150.5" in files["README.md"]

    # 6: generation with prefill skipping
    generated = " ".join(printed[6])
    assert generated.startswith("Once upon a time") and len(generated.split()) > 10

    # 7: dense evaluation, a two-run ablation, lm-eval on the snippet's own task, the pushed card
    dense = {(task, metric): value for task, metric, value in ast.literal_eval(printed[7][0])}
    assert dense["perplexity", "perplexity"] == pytest.approx(51.76, abs=0.01)
    runs = {method: (layers, ppl) for method, layers, ppl in ast.literal_eval(printed[7][1])}
    assert runs["bi"] == (BI_LAYERS, pytest.approx(150.5, abs=0.1)) and runs["random"][1] > 10 * runs["bi"][1]
    assert len(json.loads((work / "ablation.json").read_text())["runs"]) == 2
    assert (work / "plots" / "perplexity.png").exists()
    rows = ast.literal_eval(printed[7][2])
    assert {row["task"] for row in rows} >= {"perplexity", "mc:general_knowledge", "lm_eval:my_task"}
    assert next(row for row in rows if row["task"] == "perplexity")["dense"] == pytest.approx(51.76, abs=0.01)
    assert "/me/smollm2-shortgpt/commit/" in printed[7][3]
    files = pushed["me/smollm2-shortgpt"]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert b"my_task" in files["README.md"]

    # 8: layer by layer, the same layers; the materialized checkpoint
    layers, folder = printed[8][0].split("] ")
    assert ast.literal_eval(layers + "]") == BI_LAYERS
    assert Path(folder).resolve() == (work / "smollm2-materialized").resolve()
    config = json.loads((work / "smollm2-materialized" / "config.json").read_text())
    assert config["shortgpt"]["removed_layers"] == BI_LAYERS
    assert [step["method"] for step in config["shortgpt"]["recovery"]] == ["linear"]
