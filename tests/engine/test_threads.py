"""num_usable_cpus: the affinity mask capped by a cgroup v2 CPU quota (read from a fake cpu.max file)."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from engine.threads import cgroup_cpu_quota, default_num_threads, num_usable_cpus, set_torch_threads


@pytest.mark.parametrize(
    ("content", "expected"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None)],
)
def test_cgroup_quota_is_rounded_up_to_whole_cpus(tmp_path: pathlib.Path, content: str, expected: int | None) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(content)
    assert cgroup_cpu_quota(cpu_max) == expected


def test_usable_cpus_are_the_affinity_capped_by_the_quota(tmp_path: pathlib.Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert num_usable_cpus(tmp_path / "missing") == affinity  # no cgroup v2 file: the affinity alone
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")  # a Kubernetes limit of one CPU
    assert num_usable_cpus(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 8) * 100000} 100000\n")  # a quota above the affinity does not add CPUs
    assert num_usable_cpus(cpu_max) == affinity


def test_set_torch_threads_uses_the_override_or_the_usable_cpus() -> None:
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_torch_threads(None) == default_num_threads(num_usable_cpus()) == torch.get_num_threads()
        assert [default_num_threads(n) for n in (1, 2, 16)] == [1, 1, 15]
    finally:
        torch.set_num_threads(before)
