import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Fixtures that hand a test the real converted model: a test using one (directly or
# through another fixture) is marked slow, and only slow tests may reach a real model.
REAL_MODEL_FIXTURES = {"smollm2_path", "smollm2"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# The fast tier runs tiny models, whose ops are far too small to gain from intra-op threads; on
# a busy machine torch's thread pool makes every one of them wait for a descheduled thread (a
# tiny forward measured 15-30x slower with 2 threads than with 1 on 2 busy cores; the fast tier
# took 12 minutes instead of 1.3). Slow tests, on real models, keep torch's default. Set before
# any fixture of the test is built, so that module fixtures follow the tier of the first test
# that needs them.
DEFAULT_THREADS = torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    torch.set_num_threads(DEFAULT_THREADS if item.get_closest_marker("slow") else 1)


@pytest.fixture(autouse=True)
def _fast_tests_stay_fast(request, monkeypatch):
    """Keep the fast tier (``pytest -m "not slow"``) fast for good: a test that is not
    marked slow fails at once if it asks for a built-in real model or starts a Python process."""
    if request.node.get_closest_marker("slow"):
        return
    import shortgpt_hf.builtin
    import shortgpt_hf.sources

    def refuse(name: str):
        raise AssertionError(f"{request.node.nodeid} loads the real model {name}: mark it @pytest.mark.slow")

    monkeypatch.setattr(shortgpt_hf.builtin, "builtin_path", refuse)
    monkeypatch.setattr(shortgpt_hf.sources, "builtin_path", refuse)

    class NoPythonProcesses(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            if starts_python(args):
                raise AssertionError(
                    f"{request.node.nodeid} starts a Python process (a fresh interpreter, the console script, "
                    "accelerate launch: seconds each, imports included): mark it @pytest.mark.slow"
                )
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", NoPythonProcesses)


def starts_python(args) -> bool:
    """Whether a command runs Python: an interpreter, or a console script of this environment
    (shortgpt, accelerate, torchrun); small system tools (chattr) are not refused."""
    program = os.fsdecode(args if isinstance(args, (str, bytes, os.PathLike)) else args[0]).split()[0]
    found, scripts = Path(shutil.which(program) or program), Path(sys.executable).parent
    in_scripts = os.sep not in program and (scripts / program).is_file()  # even when PATH lacks the folder
    return found.name.startswith("python") or found.parent == scripts or in_scripts


def run_python(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (used to prove that nothing of ours is needed)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(err: str, message: str) -> None:
    """Progress bars may precede it, but the error is one final line and no traceback."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("shortgpt: error:") and message in last, err
    assert "Traceback" not in err and err.count("shortgpt: error:") == 1


def run_cli(capsys, monkeypatch, *args):
    """Run ``shortgpt ARGS`` in this process: (exit code, stdout, stderr)."""
    from shortgpt_hf.cli import main

    monkeypatch.setattr(sys, "argv", ["shortgpt", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M, converted once into the shared cache and reused by every test
    (about 20 s the first time on 2 cores, 0.3 s per load afterwards)."""
    from shortgpt_hf import builtin_path

    return builtin_path("smollm2-135m")


@pytest.fixture
def smollm2(smollm2_path):
    """A fresh fp32 copy per test, since pruning works in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture
def tensor_reads(monkeypatch):
    """The checkpoint keys transformers materialises while loading (it opens
    safetensors through ``transformers.modeling_utils.safe_open``)."""
    import transformers.modeling_utils as modeling_utils

    real_open, read = modeling_utils.safe_open, set()

    class Slice:
        def __init__(self, key, inner):
            self._key, self._inner = key, inner

        def __getitem__(self, item):
            read.add(self._key)
            return self._inner[item]

        def __getattr__(self, name):
            return getattr(self._inner, name)

    class File:
        def __init__(self, *args, **kwargs):
            self._inner = real_open(*args, **kwargs)

        def get_slice(self, key):
            return Slice(key, self._inner.get_slice(key))

        def get_tensor(self, key):
            read.add(key)
            return self._inner.get_tensor(key)

        def __enter__(self):
            self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(modeling_utils, "safe_open", File)
    return read


def removed_keys(keys, removed):
    return sorted(k for k in keys if any(k.startswith(f"model.layers.{i}.") for i in removed))


def stray_weight_files(folder: Path) -> list[str]:
    """Top-level ``*.safetensors`` files that are not the checkpoint's weights
    (``model.safetensors``, or the shards its index names): engines such as vLLM
    load every such file as weights and refuse tensors the model does not have."""
    import json

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    weights = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    return sorted(f.name for f in folder.glob("*.safetensors") if f.name not in weights)


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory) -> Path:
    """A tiny dense Llama saved with its tokenizer, for commands that take a folder (read-only)."""
    from tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("dense") / "dense"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
