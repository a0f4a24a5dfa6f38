"""Faults a user can cause or meet: each ends in one ``shortgpt: error:`` line,
exit status 2, and nothing half-written (no output folder, no temporary folder)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli
from tiny_models import tiny_model, tiny_tokenizer

from shortgpt_hf import ShortGPTError, prune, save_pruned


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "pruned"
    model = tiny_model("llama")
    prune(model, layers=[1])
    save_pruned(model, folder, tiny_tokenizer())
    return folder


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``shortgpt ARGS`` in a fresh process, with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "shortgpt_hf.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=os.environ | env,
        timeout=300,
    )


def nothing_left(parent: Path, *names: str) -> bool:
    """No output and no temporary sibling (``.<name>.tmp-*``) in ``parent``."""
    return not any((parent / n).exists() for n in names) and not [p for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process may not create files in. Permission bits do not stop
    root, so as root a path under /sys (a file system where nothing can be made) stands in."""
    if os.geteuid() != 0:
        tmp_path.chmod(0o555)
        yield tmp_path
        tmp_path.chmod(0o755)
    elif Path("/sys/kernel").is_dir():
        yield Path("/sys/kernel")
    else:
        pytest.skip("no read-only location to write to as root")


@pytest.mark.slow  # the CLI in its own process
def test_hub_unreachable_is_one_line_at_once(pruned_dir, tmp_path):
    env = dict(
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
        HF_HUB_OFFLINE="0",
        HF_TOKEN="hf_x",
        HF_HOME=str(tmp_path / "home"),
    )
    result = cli("push", pruned_dir, "me/pruned", **env)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "cannot push to me/pruned: the Hub at http://127.0.0.1:")
    result = cli("prune", "someone/some-model", "--layers", "1", "--out", tmp_path / "out", **env)
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr, "no model, recipe or adapter was found in the local Hugging Face cache (the Hub at"
    )
    assert nothing_left(tmp_path, "out")


@pytest.mark.slow  # the CLI in its own process
def test_offline_mode_is_one_line(pruned_dir, tmp_path):
    env = dict(HF_HUB_OFFLINE="1", HF_TOKEN="hf_x", HF_HOME=str(tmp_path / "home"))
    result = cli("push", pruned_dir, "me/pruned", **env)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "cannot push to me/pruned: HF_HUB_OFFLINE is set")
    result = cli("eval", "someone/some-model", **env)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "(HF_HUB_OFFLINE is set)")


def test_unwritable_output_folder(dense_dir, unwritable, tmp_path, capsys, monkeypatch):
    out = unwritable / "shortgpt-out"
    code, _, err = run_cli(capsys, monkeypatch, "prune", dense_dir, "--layers", "1", "--out", out)
    assert code == 2
    assert_one_line_error(err, f"cannot write {out}:")
    assert not out.exists()
    code, _, err = run_cli(
        capsys, monkeypatch, "score", dense_dir, "--calibration", __file__, "--seq-len", "16", "--json", out / "s.json"
    )
    assert code == 2
    assert_one_line_error(err, "cannot write")
    model = tiny_model("llama")
    prune(model, layers=[1])
    with pytest.raises(ShortGPTError, match="cannot write"):
        save_pruned(model, out)


def _interrupt_inside_the_write(monkeypatch, error: BaseException) -> None:
    """Fail the checkpoint's weights file half-way through: bytes on disk, then ``error``."""
    import transformers.modeling_utils as modeling_utils

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise error

    monkeypatch.setattr(modeling_utils, "safe_save_file", half_written)


@pytest.mark.parametrize(
    "error, message",
    [
        (KeyboardInterrupt(), "interrupted; no output was left half-written"),
        (
            __import__("safetensors").SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            ),
            "no space left on device; nothing was written",
        ),
        (PermissionError(13, "Permission denied"), "permission denied; nothing was written"),
    ],
    ids=["ctrl-c", "disk-full", "permission"],
)
def test_a_save_that_fails_half_way_leaves_nothing(dense_dir, tmp_path, capsys, monkeypatch, error, message):
    _interrupt_inside_the_write(monkeypatch, error)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, monkeypatch, "prune", dense_dir, "--layers", "1", "--out", out)
    assert code == 2
    assert_one_line_error(err, message)
    assert nothing_left(tmp_path, "out")
    # Replacing a folder the same way keeps the old one.
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    code, _, err = run_cli(capsys, monkeypatch, "prune", dense_dir, "--layers", "1", "--out", out, "--overwrite")
    assert code == 2 and [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ctrl_c_in_python_propagates_and_leaves_nothing(tmp_path, monkeypatch):
    _interrupt_inside_the_write(monkeypatch, KeyboardInterrupt())
    model = tiny_model("llama")
    prune(model, layers=[1])
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, tmp_path / "out", verify=False)
    assert nothing_left(tmp_path, "out")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "1.5"], "--layers must be comma-separated integers, got '1.5'"),
        (
            ["--calibration", "{bin}", "--n-layers", "1", "--seq-len", "8"],
            "is not UTF-8 text (byte 128 cannot be decoded)",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(dense_dir, tmp_path, capsys, monkeypatch, args, message):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    args = [a.replace("{bin}", str(binary)) for a in args]
    code, _, err = run_cli(capsys, monkeypatch, "prune", dense_dir, *args, "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, message)
    assert nothing_left(tmp_path, "out")
    with pytest.raises(ShortGPTError, match="layer indices must be integers, got 1.5"):
        prune(tiny_model("llama"), layers=[1.5])


def test_a_failed_measurement_gives_the_model_back_in_training_mode():
    from shortgpt_hf import perplexity, score_layers

    model = tiny_model("llama").train()

    def broken(*args, **kwargs):
        raise RuntimeError("broken layer")

    model.model.layers[2].forward = broken
    text = [" ".join(f"t{3 + i % 100}" for i in range(64))]
    for measure in (
        lambda: perplexity(model, tiny_tokenizer(), text, seq_len=16),
        lambda: score_layers(model, text, tokenizer=tiny_tokenizer(), seq_len=16),
    ):
        with pytest.raises(RuntimeError, match="broken layer"):
            measure()
        assert model.training and all(m.training for m in model.modules())


@pytest.fixture
def immutable(tmp_path):
    """An existing, empty destination folder that cannot be renamed or replaced (``chattr +i``;
    permission bits do not stop root)."""
    folder = tmp_path / "out"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("immutable folders cannot be made here (chattr needs root and ext4-like file systems)")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_destination_that_cannot_be_replaced_is_refused_first_and_leaves_nothing(
    dense_dir, immutable, tmp_path, capsys, monkeypatch
):
    import shortgpt_hf.atomic
    from shortgpt_hf.atomic import atomic_folder

    code, _, err = run_cli(capsys, monkeypatch, "prune", dense_dir, "--layers", "1", "--out", immutable)
    assert code == 2
    assert_one_line_error(err, f"cannot write {immutable}: operation not permitted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # A folder that becomes impossible to replace only after that check: the write fails with nothing left behind.
    monkeypatch.setattr(shortgpt_hf.atomic, "check_destination", lambda out_dir, overwrite: Path(out_dir))
    with pytest.raises(ShortGPTError, match="operation not permitted.*; nothing was written"):
        with atomic_folder(immutable, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any(immutable.iterdir())


def test_written_files_are_readable_by_others_as_usual(tmp_path):
    """safetensors writes 0600; a checkpoint in a shared cache or served by another account must be readable."""
    model = tiny_model("llama")
    prune(model, layers=[1])
    old = os.umask(0o022)
    try:
        save_pruned(model, tmp_path / "out", tiny_tokenizer(), verify=False)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
