"""How much of this benchmark's CPU other processes took while it was timing.

Shared by the benchmarks that report "quiet" ratios: contention slows small
multi-threaded ops far more than large ones, so on a shared machine it
distorts ratios, not only adds noise. Timing sets with a share under `QUIET`
are the ones to read.
"""

from __future__ import annotations

import os
import time

import torch

QUIET = 0.05


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
