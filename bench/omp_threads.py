"""Why AsyncEngine loads the model on its loop thread: torch on a second thread, after another thread ran torch.

Each variant runs in a fresh process with the same decode-shaped matmuls (SmolLM2's layer GEMMs at 32 rows):
  main          every torch call on the main thread
  thread-only   every torch call on one worker thread; the main thread never touches torch
  thread-after  the main thread runs torch first (as loading a model does), then a worker thread runs the matmuls
On a machine with few cores the last one is slower: each thread that ran a parallel op keeps an OpenMP team, and once
libgomp manages more threads than there are cores it stops spin-waiting between ops. Prints one JSON line per variant
and round (seconds for the same work; lower is better).

    python -m bench.omp_threads
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import torch

from bench.common import emit, num_cores, versions

VARIANTS = ("main", "thread-only", "thread-after")


def work(repeats: int = 200) -> float:
    weights = [torch.randn(2880, 576), torch.randn(576, 576), torch.randn(3072, 576), torch.randn(576, 1536)]
    inputs = [torch.randn(32, w.shape[1]) for w in weights]
    for x, w in zip(inputs, weights, strict=True):  # warm-up
        torch.nn.functional.linear(x, w)
    start_s = time.perf_counter()
    for _ in range(repeats):
        for x, w in zip(inputs, weights, strict=True):
            torch.nn.functional.linear(x, w)
    return time.perf_counter() - start_s


def run_variant(variant: str) -> float:
    torch.set_num_threads(num_cores())
    if variant == "main":
        return work()
    if variant == "thread-after":
        work(repeats=5)  # the main thread now has an OpenMP team of its own
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(work()))
    worker.start()
    worker.join()
    return result[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's side
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps({"seconds": run_variant(args.variant)}))
        return
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            child = [sys.executable, "-m", "bench.omp_threads", "--variant", variant]
            out = subprocess.run(child, capture_output=True, text=True, check=True, timeout=600).stdout
            seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
            record = {"bench": "omp_threads", "round": round_, "variant": variant, "seconds": round(seconds, 3)}
            emit(record | {"threads": num_cores(), **versions()}, args.out)


if __name__ == "__main__":
    main()
