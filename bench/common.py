"""Helpers shared by the benchmarks: thread setup, the machine's description, JSON-line output, a matmul peak."""

from __future__ import annotations

import functools
import gc
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from engine.threads import num_usable_cpus

REPO_ROOT = Path(__file__).resolve().parents[1]


def num_cores() -> int:
    """CPU cores this process may run on (its affinity, capped by a cgroup CPU quota): the engine's own count."""
    return num_usable_cpus()


def set_threads() -> int:
    """Use every core for intra-op parallelism, explicitly (torch's default can differ under cgroup limits)."""
    cores = num_cores()
    torch.set_num_threads(cores)
    return cores


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str | None]:
    """Library versions and the source tree's commit: every record says what code produced it."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "commit": commit()}


@functools.cache  # read once: a commit made while a bench runs does not change what the bench runs
def commit() -> str | None:
    """The short hash of the checked-out commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def emit(record: dict[str, Any], out_path: str | None) -> None:
    """Print one JSON line, and append it to out_path when given."""
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def free_memory(device: torch.device) -> None:
    """Collect what was just deleted and give cached CUDA memory back, so the next engine finds it free."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best observed FLOP/s of a square [size x size] @ [size x size] matmul: the machine's practical compute peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)  # [size, size]
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)  # warm-up
    synchronize(device)
    best_s = float("inf")
    for _ in range(repeats):
        start_s = time.perf_counter()
        torch.matmul(a, b, out=c)
        synchronize(device)
        best_s = min(best_s, time.perf_counter() - start_s)
    return 2 * size**3 / best_s
