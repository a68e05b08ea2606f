"""The CPUs this process may use (its CPU affinity and the cgroup v2 quota a container limit sets) and torch's thread pool.

Reads OS state only, never environment variables. torch's own default is the host's physical core count, which
oversubscribes a container limited to a few CPUs; see `set_torch_threads` for why the default is what it is.
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


def set_torch_threads(num_threads: int | None) -> int:
    """Size torch's intra-op pool for the calling thread (OpenMP's thread count is per thread): num_threads, or every usable CPU.

    One thread per usable CPU is fastest when the CPUs are ours; on a CPU shared with other busy processes, OpenMP's
    spin-waiting workers lose their core and every parallel op waits a scheduler slice for them (bench/busy_cpu.py),
    so a busy host should set num_threads (1 is the safe choice there).
    """
    count = num_threads if num_threads is not None else num_usable_cpus()
    torch.set_num_threads(count)
    return count
