"""num_usable_cpus: the affinity mask capped by a cgroup v2 CPU quota (read from a fake cpu.max file); the team size of a
step; the OpenMP wait policy the engine package sets."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from engine.threads import (
    SMALL_STEP_TOKENS,
    StepThreads,
    cgroup_cpu_quota,
    default_num_threads,
    num_usable_cpus,
    set_torch_threads,
)


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
        assert [default_num_threads(n) for n in (1, 2, 16)] == [1, 2, 16]
    finally:
        torch.set_num_threads(before)


def test_small_steps_run_on_one_thread_and_the_others_on_the_team() -> None:
    before = torch.get_num_threads()
    try:
        threads = StepThreads(2)
        assert threads.fit(1) == 1 and torch.get_num_threads() == 1  # a single decode
        assert threads.fit(SMALL_STEP_TOKENS - 1) == 1
        assert threads.fit(SMALL_STEP_TOKENS) == 2 and torch.get_num_threads() == 2  # a batch or a prefill chunk
        assert threads.fit(1) == 1 and torch.get_num_threads() == 1  # and back
        assert StepThreads(1).fit(512) == 1  # never more than the team
    finally:
        torch.set_num_threads(before)


def test_the_engine_package_makes_openmp_workers_sleep_unless_told_otherwise() -> None:
    """libgomp reads OMP_WAIT_POLICY when torch loads it, so the engine package sets it first; a user's value wins."""
    import subprocess
    import sys

    script = "import os, engine; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert (
        subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True
        ).stdout.strip()
        == "PASSIVE"
    )
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert (
        subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True
        ).stdout.strip()
        == "ACTIVE"
    )


def test_the_engine_sizes_the_team_for_each_step(tiny_mistral_dir: pathlib.Path) -> None:
    """A prompt's prefill runs on the whole team, the decodes after it alone (offline: the stepping thread is this one)."""
    from engine import LLM, SamplingParams

    before = torch.get_num_threads()
    try:
        llm = LLM(model=str(tiny_mistral_dir), num_threads=2, kv_cache_gib=0.01, max_model_len=128)
        seen: list[tuple[int, int]] = []  # (tokens of the step, threads it ran on)
        assert llm.engine.step_threads is not None
        fit = llm.engine.step_threads.fit

        def spy(num_tokens: int) -> int:
            seen.append((num_tokens, fit(num_tokens)))
            return seen[-1][1]

        llm.engine.step_threads.fit = spy  # type: ignore[method-assign]
        llm.generate(["one two three four five six seven eight"], SamplingParams(max_tokens=3, temperature=0.0))
        assert seen[0][0] >= SMALL_STEP_TOKENS and seen[0][1] == 2  # the prefill
        assert seen[1:] and all(step == (1, 1) for step in seen[1:])  # the decodes
    finally:
        torch.set_num_threads(before)
