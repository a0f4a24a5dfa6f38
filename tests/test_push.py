"""push_to_hub end to end over HTTP: the real huggingface_hub client, through
HF_ENDPOINT, against the local Hub-API server in hub_server.py (127.0.0.1)."""

import json
import os
import subprocess
import sys

import pytest
from hub_server import HubServer
from tiny_models import tiny_model

from shortgpt_hf import EvalReport, EvalResult, ShortGPTError, prune, push_to_hub

TOKEN = "hf_test_token"

CLIENT = r"""
import json, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from huggingface_hub import EvalResult, HfApi, ModelCard
from transformers import AutoModelForCausalLM
from tiny_models import tiny_model
from shortgpt_hf import PrunedForCausalLM, ShortGPTConfig, prune, push_to_hub, score_layers

out, work = {}, Path(tempfile.mkdtemp())
ids = torch.arange(3, 15).reshape(2, 6)
base = tiny_model("llama")
base.save_pretrained(work / "base")
api = HfApi()
api.create_repo("tester/tiny-base")
api.upload_folder(repo_id="tester/tiny-base", folder_path=work / "base")

model = AutoModelForCausalLM.from_pretrained("tester/tiny-base")
calibration = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
prune(model, n_layers=2, scores=score_layers(model, calibration, seq_len=16, progress=False))
record = ShortGPTConfig.from_model(model)
out["recorded_base"] = [record.base_model_name_or_path, record.base_revision]
expected = model(input_ids=ids).logits
model.save_pretrained(work / "local")  # what the full push must upload, byte for byte
out["full_url"] = push_to_hub(model, "tester/tiny-pruned")
out["recipe_url"] = push_to_hub(model, "tester/tiny-recipe", kind="recipe")

cache = tempfile.mkdtemp()
loaded = {
    "auto_full": AutoModelForCausalLM.from_pretrained("tester/tiny-pruned", cache_dir=cache),
    "pruned_full": PrunedForCausalLM.from_pretrained("tester/tiny-pruned"),
    "pruned_recipe": PrunedForCausalLM.from_pretrained("tester/tiny-recipe"),
    "auto_recipe": AutoModelForCausalLM.from_pretrained("tester/tiny-recipe", cache_dir=cache),
}
out["max_diff"] = {k: (m(input_ids=ids).logits - expected).abs().max().item() for k, m in loaded.items()}
out["layers"] = {k: m.config.num_hidden_layers for k, m in loaded.items()}
card = ModelCard.load("tester/tiny-pruned")
out["card"] = {"base_model": card.data.base_model, "tags": card.data.tags, "library_name": card.data.library_name}

again = push_to_hub(
    loaded["pruned_recipe"],
    "tester/tiny-recipe",
    kind="recipe",
    eval_results=[{"task": "perplexity", "metric": "perplexity", "dense": 10.0, "pruned": 12.5}],
)
out["again_url"] = again

# The user edits the card on the Hub (a tag and a result of their own); our next push adds to them.
card = ModelCard.load("tester/tiny-pruned")
card.data.tags = card.data.tags + ["my-tag"]
card.data.eval_results = [
    EvalResult(
        task_type="text-generation",
        dataset_type="my-set",
        dataset_name="my-set",
        metric_type="accuracy",
        metric_value=0.5,
    )
]
card.text = card.text + "\n\nNotes of my own.\n"
card.push_to_hub("tester/tiny-pruned")
push_to_hub(model, "tester/tiny-pruned", eval_results=[{"task": "perplexity", "metric": "perplexity", "pruned": 12.5}])
merged = ModelCard.load("tester/tiny-pruned", ignore_metadata_errors=True)
out["merged"] = {
    "tags": merged.data.tags,
    "results": sorted((r.dataset_name, r.metric_type, r.metric_value) for r in merged.data.eval_results),
    "notes": "Notes of my own." in merged.text,
}

# A recipe named by its Hub id is pushed on as a recipe.
push_to_hub("tester/tiny-recipe", "tester/recipe-copy")

# transformers' own push_to_hub tags a pruned model through add_model_tags.
model.push_to_hub("tester/plain-push")
out["plain_tags"] = ModelCard.load("tester/plain-push").data.tags
out["pr_url"] = push_to_hub(model, "tester/tiny-pruned", create_pr=True, commit_message="propose")
out["local"] = str(work / "local")
print(json.dumps(out))
"""


@pytest.fixture
def hub(tmp_path):
    with HubServer(token=TOKEN) as server:
        home = tmp_path / "hf_home"  # the client also writes xet logs and a registry cache under HF_HOME
        server.env = dict(
            os.environ,
            HF_ENDPOINT=server.endpoint,
            HF_TOKEN=TOKEN,
            HF_HOME=str(home),
            HF_HUB_CACHE=str(home / "hub"),
            HF_HUB_OFFLINE="0",
        )
        yield server


@pytest.mark.slow  # the client in its own process, for HF_ENDPOINT to be read at import
def test_push_and_load_back_over_http(hub, tmp_path):
    tests_dir = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, tests_dir], capture_output=True, text=True, env=hub.env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    base_sha = hub.commits("tester/tiny-base")[-1].sha
    assert out["recorded_base"] == ["tester/tiny-base", base_sha]

    full = hub.files("tester/tiny-pruned")
    assert {"config.json", "model.safetensors", "README.md"} <= set(full)
    assert (
        full["layer_scores.png"][:4] == b"\x89PNG" and "![bi per layer](layer_scores.png)" in full["README.md"].decode()
    )
    for name in ("config.json", "model.safetensors"):
        assert full[name] == open(os.path.join(out["local"], name), "rb").read(), f"{name} must arrive byte for byte"
    # the repo's initial commit, then one commit per push: ours, the user's card edit, ours again (a PR is not on main)
    assert [c.message.split(" (")[0] for c in hub.commits("tester/tiny-pruned")] == [
        "initial commit",
        "Upload ShortGPT-pruned model",
        "Upload README.md with huggingface_hub",
        "Upload ShortGPT-pruned model",
    ]
    recipe = hub.files("tester/tiny-recipe")
    assert "shortgpt_config.json" in recipe and "model.safetensors" not in recipe
    assert json.loads(recipe["config.json"])["model_type"] == "shortgpt_recipe", (
        "a recipe's config.json only marks it for AutoConfig"
    )

    assert out["max_diff"] == {"auto_full": 0.0, "pruned_full": 0.0, "pruned_recipe": 0.0, "auto_recipe": 0.0}
    assert set(out["layers"].values()) == {4}
    assert out["card"]["base_model"] == "tester/tiny-base" and out["card"]["library_name"] == "transformers"
    assert {"shortgpt", "layer-pruning", "pruned"} <= set(out["card"]["tags"])
    assert out["full_url"].startswith(hub.endpoint) and "/commit/" in out["full_url"]

    readme = hub.files("tester/tiny-recipe")["README.md"].decode()
    assert readme.count("<!-- shortgpt:start -->") == 1 and "| perplexity | - | perplexity | 10 | 12.5 |" in readme
    assert len(hub.commits("tester/tiny-recipe")) == 3
    assert out["pr_url"].startswith(f"{hub.endpoint}/tester/tiny-pruned/discussions/")

    merged = out["merged"]
    assert "my-tag" in merged["tags"] and {"shortgpt", "layer-pruning", "pruned"} <= set(merged["tags"])
    assert merged["results"] == [["-", "perplexity", 12.5], ["my-set", "accuracy", 0.5]], (
        "our result is added to the user's"
    )
    assert merged["notes"], "text the user added outside our section stays"
    assert {"shortgpt", "layer-pruning", "pruned"} <= set(out["plain_tags"])
    copy = hub.files("tester/recipe-copy")
    assert (
        json.loads(copy["shortgpt_config.json"])["removed_layers"]
        == json.loads(recipe["shortgpt_config.json"])["removed_layers"]
    )
    assert "model.safetensors" not in copy


def test_bad_input_is_refused(tmp_path, monkeypatch):
    model = tiny_model("llama")
    prune(model, layers=[1])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(ShortGPTError, match="no Hugging Face token"):
        push_to_hub(model, "tester/x")
    for bad in ("no spaces allowed/x", "a/b/c", "nonamespace", "tester/" + "x" * 200):
        with pytest.raises(ShortGPTError, match="repo id"):
            push_to_hub(model, bad, token=TOKEN)
    with pytest.raises(ShortGPTError, match="not been pruned"):
        push_to_hub(tiny_model("llama"), "tester/x", token=TOKEN)


@pytest.mark.slow  # the CLI in its own process, for HF_ENDPOINT to be read at import
def test_server_failure_and_bad_eval_report(hub, tmp_path):
    model = tiny_model("llama")
    prune(model, layers=[1])
    model.save_pretrained(tmp_path / "pruned")
    hub.fail_commits, hub.fail_status = 1, 507  # 507: not retried by upload_folder (5xx like 500 are, up to 5 times)
    cli = [sys.executable, "-m", "shortgpt_hf.cli", "push", str(tmp_path / "pruned"), "tester/broken"]
    result = subprocess.run(cli, capture_output=True, text=True, env=hub.env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("shortgpt: error: upload to tester/broken failed")
    assert hub.files("tester/broken") == {}, "a failed commit must leave nothing behind"
    (tmp_path / "bad_eval.json").write_text("[1, 2]")
    result = subprocess.run(
        cli + ["--eval", str(tmp_path / "bad_eval.json")], capture_output=True, text=True, env=hub.env
    )
    assert (
        result.returncode == 2
        and result.stderr.strip().splitlines()[-1].startswith("shortgpt: error:")
        and "not an evaluation report" in result.stderr
    )
    # The retry succeeds, with a `shortgpt eval --with-base` report in the card.
    dense = EvalReport("base", [EvalResult("perplexity", "shakespeare-heldout", "perplexity", 51.76, False, 8191)])
    EvalReport(
        "pruned", [EvalResult("perplexity", "shakespeare-heldout", "perplexity", 150.5, False, 8191)], baseline=dense
    ).to_json(tmp_path / "eval.json")
    result = subprocess.run(cli + ["--eval", str(tmp_path / "eval.json")], capture_output=True, text=True, env=hub.env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config.json" in hub.files("tester/broken")
    assert (
        "| perplexity | shakespeare-heldout | perplexity | 51.76 | 150.5 |"
        in hub.files("tester/broken")["README.md"].decode()
    )
