"""Serving benchmark: bench/offline.py's workload sent through `sirocco serve` by AsyncOpenAI clients at several concurrencies.

One process, in order (never two at once):
  1. engine only: engine.LLM in this process runs the offline workload (bench.offline.run_sirocco, after
     bench.offline.warm_up_sirocco); then it is freed (del + gc);
  2. served: a `sirocco serve` subprocess on 127.0.0.1 with the same engine settings (max_num_seqs,
     max_num_batched_tokens, the same number of KV blocks, prefix caching) and the same torch thread count; one
     warm-up request, then each concurrency level streams its requests through /v1/completions (token-id prompts,
     temperature 0, ignore_eos, max_tokens = the request's own);
  3. engine only again, on a fresh engine of the same size, once the server has exited.
Prints one JSON line per engine-only run, one per concurrency (TTFT and inter-token latency p50/p99, output
tokens/s) and one comparing served throughput at the highest concurrency with the mean of the two engine-only runs on
the same requests (the offline workload with --seed). Lower levels use the same generator with their own seeds, so no
level finds another's prompts in the prefix cache (each line reports the prefix-cache hits it caused).

    python -m bench.serve --out bench/results/serve-cpu.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.common import describe_device, emit, free_memory, set_threads, versions
from bench.offline import BenchRequest, make_workload, run_sirocco, warm_up_sirocco
from engine import LLM

# The same request as bench.offline.warm_up_sirocco: token ids 1..8 are special tokens in SmolLM2 (never in a workload
# prompt, which draws from the normal vocabulary) and 8 tokens fill no KV block, so nothing of it is prefix-cached.
WARM_UP = BenchRequest([1, 2, 3, 4, 5, 6, 7, 8], 4)


@dataclass
class Timing:
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks that carry text
    num_chunks: int = 0
    num_tokens: int = 0  # completion_tokens from the final usage chunk


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def _one(client: openai.AsyncOpenAI, model: str, request: BenchRequest) -> Timing:
    timing = Timing()
    start_s = last_s = time.perf_counter()
    stream = await client.completions.create(
        model=model,
        prompt=request.prompt_token_ids,
        max_tokens=request.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now_s = time.perf_counter()
        if chunk.usage is not None:
            timing.num_tokens = chunk.usage.completion_tokens
        if not chunk.choices or not chunk.choices[0].text:
            continue
        if timing.num_chunks == 0:
            timing.ttft_s = now_s - start_s
        else:
            timing.itl_s.append(now_s - last_s)
        timing.num_chunks += 1
        last_s = now_s
    if timing.num_tokens != request.max_tokens:
        raise RuntimeError(f"the server generated {timing.num_tokens} tokens for a request of {request.max_tokens}")
    return timing


async def run_level(base_url: str, model: str, workload: list[BenchRequest], concurrency: int) -> dict[str, Any]:
    limit = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=1800) as client:

        async def bounded(request: BenchRequest) -> Timing:
            async with limit:
                return await _one(client, model, request)

        start_s = time.perf_counter()
        timings = await asyncio.gather(*(bounded(request) for request in workload))
        wall_s = time.perf_counter() - start_s
    ttft = [t.ttft_s for t in timings]
    itl = [gap for t in timings for gap in t.itl_s]
    num_tokens = sum(t.num_tokens for t in timings)
    return {
        "bench": "serve",
        "concurrency": concurrency,
        "requests": len(workload),
        "ttft_p50_s": round(percentile(ttft, 0.5), 4),
        "ttft_p99_s": round(percentile(ttft, 0.99), 4),
        "itl_p50_s": round(percentile(itl, 0.5), 4),
        "itl_p99_s": round(percentile(itl, 0.99), 4),
        "output_tokens": num_tokens,
        "text_chunks": sum(t.num_chunks for t in timings),
        "seconds": round(wall_s, 3),
        "output_tok_per_s": round(num_tokens / wall_s, 2),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    env: dict[str, str],
    log_path: Path | None = None,
    ready_timeout_s: float = 600.0,
    peer_command: Callable[[int], list[str]] | None = None,
    ready_path: str = "/health",
) -> tuple[subprocess.Popen[bytes], str]:
    """`sirocco serve` (python -m gateway serve) on a free loopback port; returns once `ready_path` answers 200.
    `log_path`: append the server's output there (None: this process's stdout and stderr). `peer_command(port)`:
    another server's command line instead (bench/cpu_peers.py starts vLLM and llama.cpp with it)."""
    port = _free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command = peer_command(port) if peer_command is not None else command
    if log_path is None:
        process = subprocess.Popen(command, env=env)
    else:
        with log_path.open("ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}{ready_path}", timeout=1).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    process.wait()
    where = f"; its log: {log_path}" if log_path is not None else ""
    raise RuntimeError(f"the server did not become ready (exit {process.returncode}){where}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()  # SIGTERM drains: nothing is in flight by now
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def prefix_cache_hits(base_url: str) -> float:
    """The server's sirocco_prefix_cache_hits counter (prompt tokens found in the prefix cache)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    match = re.search(r"^sirocco_prefix_cache_hits(?:_total)?\s+(\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def settings_env(settings: dict[str, Any]) -> dict[str, str]:
    """This environment without any SIROCCO_* variable but these settings (as SIROCCO_<NAME>), logging warnings only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIROCCO_")}
    for name, value in settings.items():
        env[f"SIROCCO_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["SIROCCO_LOG_LEVEL"] = "warning"
    return env


def server_env(engine_settings: dict[str, Any], threads: int, model: str | None, cache_dir: str | None) -> dict[str, str]:
    """settings_env(engine_settings) with the torch threads pinned, and the model and cache when given."""
    env = settings_env(engine_settings) | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if model:
        env["SIROCCO_MODEL"] = model
    if cache_dir:
        env["SIROCCO_CACHE_DIR"] = cache_dir
    return env


def run_engine_only(llm: LLM, workload: list[BenchRequest], settings: dict[str, Any], phase: str, out: str | None) -> float:
    """bench.offline's Sirocco run of the workload (after its warm-up); emits the line, returns useful tokens/s."""
    warm_up_sirocco(llm)
    hits_before = llm.engine.stats().prefix_cache_hits
    record = run_sirocco(llm, workload)
    record |= {"bench": "serve_engine_only", "phase": phase, "engine_settings": dict(settings)}
    record["prefix_cache_hit_tokens"] = llm.engine.stats().prefix_cache_hits - hits_before
    emit(record, out)
    return float(record["useful_tok_per_s"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local directory or Hub id; default: the embedded SmolLM2")
    parser.add_argument("--cache-dir", default=None, help="Sirocco's cache (the converted embedded model)")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--requests-at-1", type=int, default=8, help="requests at concurrency 1 only (0: --requests)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels; the highest is compared")
    parser.add_argument("--seed", type=int, default=0, help="workload seed of the highest level and the engine-only run")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="engine setting, both sides")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine setting, both sides")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="lower the load generator's CPU priority by this much once the server runs (the server keeps its own): "
        "on a small box the clients otherwise take CPU from the engine they measure",
    )
    args = parser.parse_args(argv)
    levels = sorted({int(level) for level in args.concurrency.split(",") if level.strip()})
    top = levels[-1]
    load_at_start = round(os.getloadavg()[0], 2)
    threads = set_threads()

    # 1. Engine only, in this process. The server gets this engine's KV block count, so both caches are the same size.
    settings: dict[str, Any] = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": True,
        "num_threads": threads,  # the same on both sides (Sirocco's default leaves a CPU free for the HTTP work)
    }
    llm = LLM(model=args.model, cache_dir=args.cache_dir, **settings)
    settings["num_kv_blocks"] = llm.engine.block_manager.num_blocks
    device = llm.engine.device
    workloads: dict[int, list[BenchRequest]] = {}
    for i, level in enumerate(levels):
        seed = args.seed if level == top else args.seed + 1 + i  # own prompts per level: no prefix-cache reuse
        workloads[level] = make_workload(llm.tokenizer, args.requests, seed)
    if 1 in workloads and args.requests_at_1 and top != 1:
        workloads[1] = workloads[1][: args.requests_at_1]
    engine_only = [run_engine_only(llm, workloads[top], settings, "before", args.out)]
    del llm
    free_memory(device)

    # 2. Served, in a subprocess started only now.
    process, base_url = start_server(server_env(settings, threads, args.model, args.cache_dir))
    if args.client_nice:
        os.nice(args.client_nice)  # this process only: the server subprocess is already running at normal priority
    served: dict[int, float] = {}
    try:
        model = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(run_level(base_url, model, [WARM_UP], 1))
        for level in levels:
            hits_before_level = prefix_cache_hits(base_url)
            record = asyncio.run(run_level(base_url, model, workloads[level], level))
            record["prefix_cache_hit_tokens"] = prefix_cache_hits(base_url) - hits_before_level
            record["workload_seed"] = args.seed if level == top else args.seed + 1 + levels.index(level)
            if len(workloads[level]) < args.requests:
                record["note"] = f"concurrency 1 ran the first {len(workloads[level])} requests of its workload (--requests-at-1)"
            record |= {"device": describe_device(device), "load_avg_1m": round(os.getloadavg()[0], 2)}
            served[level] = record["output_tok_per_s"]
            emit(record, args.out)
    finally:
        stop_server(process)

    # 3. Engine only again, a fresh engine of the same size: the box's drift between phases shows as a gap between the
    # two engine-only lines, and the ratio uses their mean, so neither phase order nor a noisy minute decides it.
    llm = LLM(model=args.model, cache_dir=args.cache_dir, **settings)
    engine_only.append(run_engine_only(llm, workloads[top], settings, "after", args.out))
    del llm
    free_memory(device)

    engine_only_rate = sum(engine_only) / len(engine_only)
    overhead: dict[str, Any] = {
        "bench": "serve_overhead",
        "client_nice": args.client_nice,
        "concurrency": top,
        "requests": len(workloads[top]),
        "served_tok_per_s": served[top],
        "engine_only_tok_per_s": round(engine_only_rate, 2),
        "engine_only_before_after_tok_per_s": engine_only,
        "ratio": round(served[top] / engine_only_rate, 3),
        "engine_settings": settings,
        "torch_threads": threads,
        "load_avg_1m_at_start": load_at_start,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        **versions(),
    }
    emit(overhead, args.out)


if __name__ == "__main__":
    main()
