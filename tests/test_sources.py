"""What a name refers to (shortgpt_hf.sources): built-in names, local folders
(relative, absolute, with or without ./), one-word and org/name Hub ids served
from a huggingface_hub cache offline, and a Hub that cannot be reached."""

import json
import os
import subprocess
import sys
import time

import pytest
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from shortgpt_hf import ShortGPTConfig, ShortGPTError, model_card, prune, save_pruned, save_recipe
from shortgpt_hf.sources import hub_id_of, resolve

COMMIT = "d" * 40


def cached_repo(hub, repo_id, commit=COMMIT):
    """A repo in huggingface_hub's cache layout: refs/main -> snapshots/<commit>."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_local_folders_of_every_kind(tmp_path, monkeypatch):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    prune(model, layers=[1])
    save_pruned(model, tmp_path / "my-model")
    save_recipe(model, tmp_path / "recipe")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for name, kind, pruned in (
        ("dense", "model", False),
        ("my-model", "model", True),
        ("./recipe", "recipe", False),
        ("adapter", "adapter", False),
    ):
        for form in (name, str(tmp_path / name)):  # relative (with or without ./) and absolute
            source = resolve(form)
            assert (source.where, source.kind, source.pruned) == ("local", kind, pruned), form
            assert source.portable == str((tmp_path / name).resolve()), "records store a path that works from anywhere"
    assert (
        "recipe folder" in resolve("recipe").describe() and "pruned checkpoint folder" in resolve("my-model").describe()
    )
    (tmp_path / "empty").mkdir()
    for bad, message in (
        ("empty", "is a folder, but not a model, recipe or PEFT adapter"),
        ("./missing", "no such folder"),
        ("a/b/c", "no such folder"),
        ("~/surely-missing-folder", "no such folder"),
        ("bad name!", "nor a valid Hub id"),
    ):
        with pytest.raises(ShortGPTError, match=message):
            resolve(bad)


def test_builtin_names_and_card_base_ids():
    source = resolve("smollm2-135m")
    assert (source.where, source.kind, source.portable) == ("builtin", "model", "smollm2-135m")
    assert hub_id_of("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of("gpt2") == "gpt2" and hub_id_of("org/name") == "org/name"
    assert hub_id_of("/abs/path/model") is None and hub_id_of("./rel") is None and hub_id_of(None) is None

    model = tiny_model("llama")
    prune(model, layers=[1])
    record = ShortGPTConfig.from_model(model)
    model.config.shortgpt = {**record.to_dict(), "base_model_name_or_path": "gpt2"}
    assert model_card(model).data.base_model == "gpt2", "a one-word Hub id is a Hub id, not a local path"


OFFLINE = r"""
import json, sys
from shortgpt_hf.sources import resolve
out = {}
for name in sys.argv[1:]:
    s = resolve(name)
    out[name] = [s.where, s.kind, s.revision, s.pruned, s.portable]
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh interpreter, for HF_HUB_CACHE and HF_HUB_OFFLINE to be read at import
def test_hub_ids_from_the_cache_offline(tmp_path):
    hub = tmp_path / "hub"
    model = tiny_model("llama")
    model.save_pretrained(cached_repo(hub, "gpt2"))  # a one-word id
    prune(model, layers=[1])
    model.save_pretrained(cached_repo(hub, "org/pruned"))
    record = ShortGPTConfig(**{**ShortGPTConfig.from_model(model).to_dict(), "base_model_name_or_path": "gpt2"})
    save_recipe(record, cached_repo(hub, "org/recipe"))
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE, "gpt2", "org/pruned", "org/recipe"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {
        "gpt2": ["hub", "model", COMMIT, False, "gpt2"],
        "org/pruned": ["hub", "model", COMMIT, True, "org/pruned"],
        "org/recipe": ["hub", "recipe", COMMIT, False, "org/recipe"],
    }
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE, "org/absent"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode != 0 and "HF_HUB_OFFLINE is set" in result.stderr


@pytest.mark.slow  # the CLI in its own process, for HF_ENDPOINT to be read at import
def test_an_unreachable_hub_fails_fast_in_one_line(tmp_path):
    """A name that is neither built in nor a folder, with the Hub down (a closed local
    port): one line, exit 2, well before huggingface_hub's ~25 s of retries."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "shortgpt_hf.cli", "score", "my-model"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("shortgpt: error:")
        and "'my-model' is not a local folder" in last
        and f"127.0.0.1:{port} cannot be reached" in last
    )
    assert elapsed < 20, f"took {elapsed:.0f} s"
