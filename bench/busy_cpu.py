"""The offline LLM API on a busy CPU: a torch thread per usable CPU, one thread, and the default, side by side.

Each variant runs in a fresh process on the same short seeded workload, first on the machine as it is (a shared box is
rarely idle: see load_avg_1m) and then beside a CPU hog: one process spinning on one core for the whole timed run,
killed afterwards. The default is engine/threads.py's default_num_threads.
Prints one JSON line per variant and a summary line with the ratios.

    python -m bench.busy_cpu --out bench/results/busy-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import emit, versions
from engine.threads import default_num_threads, num_usable_cpus

HOG = "while True: pass"
CHILD_TIMEOUT_S = 150.0  # a variant slower than this is reported as timed out


def run_child(num_threads: int | None, num_requests: int, cache_dir: str | None) -> None:
    """In the child process: load, warm up, time the workload, print one JSON object."""
    import torch

    from bench.offline import BenchRequest, make_workload, run_sirocco, warm_up_sirocco
    from engine import LLM

    llm = LLM(cache_dir=cache_dir, kv_cache_gib=0.25, num_threads=num_threads)
    warm_up_sirocco(llm)
    # short: prompts cut to 64 tokens, at most 16 output tokens
    workload = [
        BenchRequest(r.prompt_token_ids[:64], min(r.max_tokens, 16)) for r in make_workload(llm.tokenizer, num_requests, seed=0)
    ]
    record = run_sirocco(llm, workload)
    threads = torch.get_num_threads()
    print(json.dumps({"seconds": record["seconds"], "tokens": record["useful_output_tokens"], "threads": threads}))


def run_variant(num_threads: int | None, is_busy: bool, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.busy_cpu", "--child", "--requests", str(args.requests)]
    command += ["--threads", str(num_threads)] if num_threads is not None else []
    command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    hog = subprocess.Popen([sys.executable, "-c", HOG]) if is_busy else None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        result: dict[str, Any] = {"seconds": None, "timed_out_after_s": CHILD_TIMEOUT_S}
    else:
        if done.returncode != 0:
            raise RuntimeError(f"variant failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    variant = f"{'busy' if is_busy else 'as-is'}-{'default' if num_threads is None else f'{num_threads}-thread'}"
    return {"bench": "busy_cpu", "variant": variant, **result, "load_avg_1m": round(os.getloadavg()[0], 2), **versions()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--cache-dir", default=None, help="Sirocco's cache holding the converted embedded model")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.threads, args.requests, args.cache_dir)
        return
    num_cpus = num_usable_cpus()
    seconds: dict[str, float | None] = {}
    for is_busy in (False, True):
        for num_threads in [*sorted({num_cpus, 1}, reverse=True), None]:
            record = run_variant(num_threads, is_busy, args)
            seconds[record["variant"]] = record["seconds"]
            emit(record, args.out)
            time.sleep(1.0)  # let the hog's core settle before the next variant loads

    def ratio(slow: str, fast: str) -> float | None:
        a, b = seconds.get(slow), seconds.get(fast)
        return round(a / b, 2) if a and b else None

    summary = {
        "bench": "busy_cpu",
        "variant": "summary",
        "usable_cpus": num_cpus,
        "default_threads": default_num_threads(num_cpus),
        "busy_all_cpus_over_busy_1_thread": ratio(f"busy-{num_cpus}-thread", "busy-1-thread"),
        "as_is_all_cpus_over_as_is_1_thread": ratio(f"as-is-{num_cpus}-thread", "as-is-1-thread"),
        "busy_default_over_busy_1_thread": ratio("busy-default", "busy-1-thread"),
        "note": "seconds null: timed out (slower than timed_out_after_s)",
    }
    emit(summary, args.out)


if __name__ == "__main__":
    main()
