"""The CPUs this process may use (its CPU affinity and the cgroup v2 quota a container limit sets) and torch's thread pool.

Reads OS state only, never environment variables. torch's own default is the host's physical core count, which
oversubscribes a container limited to a few CPUs. The default is the usable CPUs, with small steps on one thread
(see `set_torch_threads` and `StepThreads`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def num_usable_cpus(cpu_max_path: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup CPU quota (rounded up), at least 1."""
    try:
        num_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        num_cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cpu_max_path)
    if quota is not None:
        num_cpus = min(num_cpus, quota)
    return max(1, num_cpus)


def cgroup_cpu_quota(cpu_max_path: Path = CGROUP_CPU_MAX) -> int | None:
    """Whole CPUs the cgroup v2 quota allows (a Kubernetes CPU limit of 1500m gives 2), or None without a quota."""
    try:
        fields = cpu_max_path.read_text().split()
    except OSError:  # no cgroup v2 file (cgroup v1, not Linux, no container)
        return None
    if not fields or fields[0] == "max":
        return None
    try:
        quota_us = int(fields[0])
        period_us = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


# A CPU step of fewer tokens than this runs on one thread: at 1-3 rows a layer's matmul is about 0.1 ms, about what
# waking a sleeping worker costs. Served on the 2-CPU box (bench/cpu_peers.py, bench/results/cpu-peers-threads.md):
# 2 threads lost at concurrency 1 (31 and 28 against 42 and 35 tok/s) and won at 8 and 32 (152/117 against 112/110,
# 245/224 against 165/174).
SMALL_STEP_TOKENS = 4


def default_num_threads(num_cpus: int) -> int:
    """All the usable CPUs: workers sleep between parallel regions (engine/__init__.py) and small steps run on one thread
    (StepThreads), so the team no longer takes a CPU from the server's event loop while it waits."""
    return max(1, num_cpus)


def set_torch_threads(num_threads: int | None) -> int:
    """Size torch's intra-op pool for the calling thread (OpenMP's thread count is per thread); returns the count.

    num_threads, or default_num_threads(num_usable_cpus()). Every parallel op waits for its slowest worker. With
    libgomp's default wait policy the workers spin between ops, so when another runnable thread took a worker's CPU (the
    server's own event loop doing HTTP and detokenizing, the benchmark's clients, any busy process on a shared host),
    each op waited a scheduler time slice: a team as large as the CPU count served 2-12x slower than one thread on the
    2-CPU box (bench/results/cpu-peers-threads.md) and ran the offline API 7x slower on a busy one (bench/busy_cpu.py),
    and the default was one thread fewer than the CPUs. With OMP_WAIT_POLICY=PASSIVE (engine/__init__.py) a worker
    sleeps as soon as an op ends, and StepThreads keeps small steps, whose ops are too short to pay for waking it, on
    one thread.
    """
    count = num_threads if num_threads is not None else default_num_threads(num_usable_cpus())
    torch.set_num_threads(count)
    return count


class StepThreads:
    """torch's team for each CPU step, on the stepping thread: one thread below SMALL_STEP_TOKENS tokens, the whole
    team from there (torch.set_num_threads costs 0.2 us, and is called only when the size changes)."""

    def __init__(self, num_threads: int) -> None:
        self.num_threads = num_threads

    def fit(self, num_tokens: int) -> int:
        wanted = 1 if num_tokens < SMALL_STEP_TOKENS else self.num_threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        return wanted
