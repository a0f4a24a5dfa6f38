"""What the benchmarks share: the machine, timing, peak memory, contention, results.

The benchmarks run on shared 2-core machines, where other jobs come and go
while a measurement runs. Two things follow, and this module owns both:

- Variants are compared in interleaved sets (`Interleaved`): every variant
  runs once per set, back to back, the order rotating from set to set.
  Load from elsewhere comes in bursts of seconds to minutes, so a burst hits
  all variants of a set alike, and the ratio within a set (a paired ratio)
  cancels the drift that a ratio of separately taken medians keeps; the
  rotation cancels any advantage of running first or last in a set.
- Each set records its contention (`Contention`): how much of the cores this
  run's threads need other processes took meanwhile. Contention slows small
  multi-threaded ops far more than large ones, so on a shared machine it
  distorts ratios, not only adds noise. Sets with a share under `QUIET` are
  the ones to read.

Peak memory is measured in a fresh child process (`run_child`, `peak_rss`,
`report`): a process's peak counter only grows, and freed memory stays in
its heap, so in a process that has already run other variants a peak says
more about what ran before than about the variant. The parent should start
its children before it grows itself: a child's ``ru_maxrss`` starts from its
parent's peak (the kernel carries it across fork and exec).

Scripts import this as a sibling module (``from harness import ...``): they
run as ``python benchmarks/bench_x.py``, which puts this folder on
``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QUIET = 0.05
RESULT = "RESULT "  # prefix of the line a child reports its numbers on
# glibc raises its mmap threshold after freeing a large block, after which
# freed few-MiB temporaries stay in the heap; how much stays varies run to run
# (bench_scoring's A, default glibc: +77..+204 MiB over several runs; fixed:
# +56 +-1). A fixed threshold measures what a variant holds, reproducibly.
MMAP_THRESHOLD = "131072"


def machine_info() -> dict[str, Any]:
    """Python, torch and transformers versions, CPU model, core count and torch's thread count."""
    import transformers

    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: when another job holds one core for a whole run, one thread measures on the other."""
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's, one per core); 1 leaves a core to another job on a shared machine",
    )


def set_threads(threads: int | None) -> None:
    """Limit torch to ``threads`` threads; None or 0 keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def command_line() -> str:
    """How this process was started, for the record: ``python benchmarks/bench_x.py --option ...``."""
    return " ".join([Path(sys.executable).name] + sys.argv)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, ending in a newline."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class Seconds:
    """Wall-clock seconds and CPU seconds (process time: all of this process's threads)."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def timing(into: Seconds | None = None) -> Iterator[Seconds]:
    """Add the wall and CPU seconds of the block to ``into`` (a new `Seconds` if None), yielded."""
    spent = Seconds() if into is None else into
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield spent
    finally:
        spent.wall += time.perf_counter() - wall
        spent.cpu += time.process_time() - cpu


def _busy_cpu_s() -> float:
    """CPU seconds used by everything on the machine since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Contention:
    """From creation to ``share()``: the share of this run's cores that other processes took.

    Their CPU time (``/proc/stat`` busy time minus this process's) beyond the
    cores this run leaves free: with 2 threads on 2 cores, any use; with
    ``--threads 1`` on 2 cores, use beyond one core.
    """

    def __init__(self) -> None:
        self.busy, self.own, self.wall = _busy_cpu_s(), time.process_time(), time.perf_counter()

    def share(self) -> float:
        other_cpu = _busy_cpu_s() - self.busy - (time.process_time() - self.own)
        threads = torch.get_num_threads()
        free_cores = max(0, os.cpu_count() - threads)
        return max(0.0, other_cpu / (time.perf_counter() - self.wall) - free_cores) / threads


def rotated(names: Sequence[str], k: int) -> list[str]:
    """``names`` starting at position ``k`` (modulo their number): the running order of set ``k``."""
    k %= len(names)
    return list(names[k:]) + list(names[:k])


class Interleaved:
    """Variants measured in sets: each once per set, back to back, in an order rotating from set to set.

    ``values[name][i]`` is what ``measure`` returned for ``name`` in set ``i``
    (a time or a rate) and ``contention[i]`` that set's `Contention` share.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.values: dict[str, list[float]] = {name: [] for name in self.names}
        self.contention: list[float] = []

    def run(self, measure: Callable[..., float], *args: Any) -> None:
        """One set: ``measure(name, *args)`` for every variant, in this set's order."""
        meter = Contention()
        for name in rotated(self.names, len(self.contention)):
            self.values[name].append(measure(name, *args))
        self.contention.append(meter.share())

    def medians(self) -> dict[str, float]:
        """Each variant's median over the sets."""
        return {name: statistics.median(v) for name, v in self.values.items()}

    def ratios(self, num: str, den: str) -> list[float]:
        """``num / den`` within each set (the paired ratios)."""
        return [a / b for a, b in zip(self.values[num], self.values[den], strict=True)]

    def quiet(self) -> list[int]:
        """The sets during which other processes took under `QUIET` of this run's cores."""
        return [i for i, share in enumerate(self.contention) if share < QUIET]

    def paired(self, num: str, den: str, quiet: bool = False) -> float | None:
        """Median paired ratio ``num / den``, over all sets or over the quiet ones (None if there are none)."""
        ratios = self.ratios(num, den)
        if quiet:
            ratios = [ratios[i] for i in self.quiet()]
        return statistics.median(ratios) if ratios else None


def _status_kib(field: str) -> int:
    """A KiB field of ``/proc/self/status`` (Linux): VmRSS is the current resident set, VmHWM its peak."""
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM, which ru_maxrss also reads); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Peak:
    """Resident memory around a block of work, in MiB (see `peak_rss`)."""

    before_mib: float  # VmRSS as the block began
    reset: bool  # whether the peak counter could be reset then
    maxrss_before_mib: float  # ru_maxrss as the block began, after the reset
    maxrss_mib: float = 0.0  # ru_maxrss after the block
    vmhwm_mib: float = 0.0  # VmHWM after the block

    @property
    def extra_mib(self) -> float:
        """Peak (``ru_maxrss``) over the resident memory at the start: what the block needed on top."""
        return self.maxrss_mib - self.before_mib

    @property
    def extra_vmhwm_mib(self) -> float:
        """The same by VmHWM, which the reset lowers even where ``ru_maxrss`` keeps the parent's peak."""
        return self.vmhwm_mib - self.before_mib


@contextmanager
def peak_rss() -> Iterator[Peak]:
    """Measure the peak resident memory of the block over the memory resident when it starts.

    Subtracting the start (the interpreter, torch, a loaded model) leaves what
    the block itself needs, so that a ratio of two variants is not diluted by
    what both share. The kernel's peak counter is reset first where allowed;
    ``ru_maxrss`` still starts from the parent's peak, hence `run_child` early.
    """
    peak = Peak(_status_kib("VmRSS") / 1024, _reset_peak(), _maxrss_kib() / 1024)
    try:
        yield peak
    finally:
        peak.maxrss_mib = _maxrss_kib() / 1024
        peak.vmhwm_mib = _status_kib("VmHWM") / 1024


def report(result: dict[str, Any]) -> None:
    """In a child: print ``result`` on the line `run_child` reads."""
    print(RESULT + json.dumps(result), flush=True)


def run_child(script: str, *args: str, fixed_malloc: bool = False, cgroup: Path | None = None) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process and return the dict it passed to `report`.

    ``fixed_malloc`` sets ``MALLOC_MMAP_THRESHOLD_`` to `MMAP_THRESHOLD` in the
    child (unless already set), so that its peak does not depend on how much
    freed memory glibc happened to keep. ``cgroup``: a memory cgroup
    (`memory_cgroup`) the child runs in from its first instruction.
    """
    env = dict(os.environ)
    if fixed_malloc:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    argv = [sys.executable, os.path.abspath(script), *args]

    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, check=False, preexec_fn=enter if cgroup else None
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    raise RuntimeError(f"{' '.join(argv[1:])} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


@contextmanager
def memory_cgroup(limit_bytes: int, name: str = "shortgpt-bench") -> Iterator[Path]:
    """A memory cgroup (v2, or v1's memory controller) limited to ``limit_bytes``, for
    `run_child`. The page cache a process fills is charged to its cgroup, so a
    checkpoint larger than the limit cannot stay cached: its reads are real reads,
    as on a machine whose RAM is smaller than the model. Needs root; removed on exit."""
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    if (v2 / "cgroup.controllers").is_file():
        folder, limit = v2 / name, "memory.max"
    elif v1.is_dir():
        folder, limit = v1 / name, "memory.limit_in_bytes"
    else:
        raise SystemExit("no memory cgroup controller on this machine: --memory-limit cannot be used")
    try:
        folder.mkdir(exist_ok=True)
        (folder / limit).write_text(str(limit_bytes))
    except OSError as e:
        raise SystemExit(f"cannot create a memory cgroup ({e}); --memory-limit needs root") from None
    try:
        yield folder
    finally:
        folder.rmdir()


def drop_page_cache() -> None:
    """Empty the kernel's page cache (root only), so the next child starts with its files on disk only."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
