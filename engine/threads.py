"""The CPUs this process may use (its CPU affinity and the cgroup v2 quota a container limit sets) and torch's thread pool.

Reads OS state only, never environment variables. torch's own default is the host's physical core count, which
oversubscribes a container limited to a few CPUs. The default leaves one usable CPU free (see `set_torch_threads`).
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


def default_num_threads(num_cpus: int) -> int:
    """One thread fewer than the usable CPUs (at least 1): the spare CPU is for everything else, see set_torch_threads."""
    return max(1, num_cpus - 1)


def set_torch_threads(num_threads: int | None) -> int:
    """Size torch's intra-op pool for the calling thread (OpenMP's thread count is per thread); returns the count.

    num_threads, or default_num_threads(num_usable_cpus()). torch's OpenMP workers spin-wait between ops, and every
    parallel op waits for its slowest worker: when another runnable thread takes a worker's CPU (the server's own event
    loop doing HTTP and detokenizing, or any other busy process on a shared host), each op waits a scheduler time slice
    for it. A team as large as the CPU count ran the offline API more than 7x slower than one thread on a busy 2-CPU box
    (bench/busy_cpu.py); leaving one CPU free costs a team little when the CPUs are idle and keeps that stall away.
    """
    count = num_threads if num_threads is not None else default_num_threads(num_usable_cpus())
    torch.set_num_threads(count)
    return count
