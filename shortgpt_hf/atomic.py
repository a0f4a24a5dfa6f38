"""Writing folders and files so that a failure, a full disk or Ctrl-C never
leaves anything half-written, and a user's folder is never replaced unasked.

Every output is built under a temporary name beside its destination and put
in place with one ``os.replace``; on any exception, KeyboardInterrupt
included, the temporary copy is deleted and the destination is as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ShortGPTError, fault

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def check_destination(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty destination unless ``overwrite``, and one we could not
    put the result in, before any work is done. Both are real tests, not
    permission bits, which do not tell a read-only file system, an immutable
    folder or a mount point apart when we are root: a probe folder is created
    beside the destination, and an existing destination is renamed and renamed
    back, as the final rename will need to move it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ShortGPTError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ShortGPTError(
            f"{out} exists and is not empty; choose another folder, or let it be replaced "
            "(--overwrite, or overwrite=True in Python)"
        )
    parent = next(p for p in out.absolute().parents if p.exists())
    try:
        tempfile.TemporaryDirectory(prefix=".shortgpt-probe-", dir=parent).cleanup()
        if out.is_dir():
            _rename_and_back(out)
    except OSError as e:
        raise ShortGPTError(f"cannot write {out}: {fault(e)}") from None
    return out


def _rename_and_back(folder: Path) -> None:
    probe = folder.with_name(f".{folder.name}.probe-{os.getpid()}")
    try:
        os.rename(folder, probe)
    finally:  # also on Ctrl-C just after the first rename
        if probe.exists():
            os.rename(probe, folder)


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``out_dir``
    in one rename, on any exception it is deleted and ``out_dir`` is untouched.
    Write faults (no space left, permission denied) become one `ShortGPTError` line."""
    out = check_destination(out_dir, overwrite).resolve()
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become the output's permissions
        yield tmp
        _usual_permissions(tmp)
        if out.exists():
            _replace_folder(tmp, out)
        else:
            os.replace(tmp, out)
    except Exception as e:
        reason = fault(e)
        if reason is None:
            raise
        raise ShortGPTError(f"could not write {out}: {reason}; nothing was written") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _usual_permissions(folder: Path) -> None:
    """Give what was written the permissions a plain write would (0644 and 0755 under
    the common umask): safetensors writes its files 0600, which would hide a
    checkpoint from the other users of a shared cache or a server's account."""
    mask = _umask()
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _replace_folder(new: Path, out: Path) -> None:
    """Put ``new`` in place of the folder ``out``: the old one is moved into a
    hidden trash folder first (a folder cannot be replaced in one rename), and
    moved back if the new one cannot take its place. The trash folder is removed
    whatever happens, so a failed replace leaves the destination as it was and
    nothing else behind."""
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, trash / out.name)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(trash / out.name, out)
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def write_file(path: str | Path, data: str | bytes) -> Path:
    """Write one file atomically (JSON results, charts): a full disk leaves the old file, or none."""
    path = Path(path)
    if path.is_dir():
        raise ShortGPTError(f"{path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise ShortGPTError(f"cannot write {path}: {fault(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise ShortGPTError(f"could not write {path}: {fault(e)}; nothing was written") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render a matplotlib figure (format from the file name, PNG by default) and write it atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix[1:] or "png", dpi=120)
    return write_file(path, buffer.getvalue())
