"""Serving benchmark: the offline workload sent through `sirocco serve` by AsyncOpenAI clients at several concurrencies.

Prints one JSON line per concurrency (TTFT and inter-token latency p50/p99, output tokens/s) and one line comparing
served throughput at the highest concurrency with engine-only throughput (engine.LLM) on the same workload, same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from bench.common import emit, num_cores

MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Timing:
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    num_tokens: int = 0


def make_workload(num_requests: int, seed: int, vocab_size: int, min_prompt: int = 32, max_prompt: int = 384) -> list[Request]:
    """Seeded random-token prompts of 32..384 tokens, 16..128 output tokens each (EOS ignored): the offline workload."""
    rng = random.Random(seed)
    return [
        Request([rng.randrange(vocab_size) for _ in range(rng.randint(min_prompt, max_prompt))], rng.randint(16, 128))
        for _ in range(num_requests)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _one(client: openai.AsyncOpenAI, request: Request) -> Timing:
    timing = Timing()
    start_s = last_s = time.perf_counter()
    stream = await client.completions.create(
        model=MODEL,
        prompt=request.prompt_ids,
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
        if timing.ttft_s == 0.0:
            timing.ttft_s = now_s - start_s
        else:
            timing.itl_s.append(now_s - last_s)
        last_s = now_s
    return timing


async def run_level(base_url: str, workload: list[Request], concurrency: int) -> dict[str, Any]:
    limit = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=600) as client:

        async def bounded(request: Request) -> Timing:
            async with limit:
                return await _one(client, request)

        start_s = time.perf_counter()
        timings = await asyncio.gather(*(bounded(request) for request in workload))
        wall_s = time.perf_counter() - start_s
    ttft = [t.ttft_s for t in timings]
    itl = [gap for t in timings for gap in t.itl_s]
    num_tokens = sum(t.num_tokens for t in timings)
    return {
        "bench": "serve",
        "concurrency": concurrency,
        "num_requests": len(workload),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5),
        "itl_p99_s": percentile(itl, 0.99),
        "output_tokens": num_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": num_tokens / wall_s,
    }


def engine_only_throughput(workload: list[Request], engine_kwargs: dict[str, Any]) -> float:
    """Output tokens/s of engine.LLM running the same workload, all requests submitted at once."""
    from engine import LLM, SamplingParams

    llm = LLM(**engine_kwargs)
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in workload]
    llm.generate([workload[0].prompt_ids], params[:1])  # warm-up
    start_s = time.perf_counter()
    outputs = llm.generate([r.prompt_ids for r in workload], params)
    wall_s = time.perf_counter() - start_s
    return sum(len(choice.token_ids) for output in outputs for choice in output.outputs) / wall_s


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, **env})
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model directory or repo id (default: the embedded model)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: 2 x concurrency, at least 8")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    env = {"SIROCCO_MAX_NUM_SEQS": str(args.max_num_seqs), "SIROCCO_LOG_LEVEL": "warning"}
    if args.model:
        env["SIROCCO_MODEL"] = args.model
    vocab_size = 32000  # below every Mistral-family vocabulary (and SmolLM2's 49152)
    workloads = {c: make_workload(args.requests_per_level or max(8, 2 * c), args.seed + c, vocab_size) for c in levels}

    engine_tps = engine_only_throughput(workloads[max(levels)], {"model": args.model, "max_num_seqs": args.max_num_seqs})
    process, base_url = start_server(env)
    try:
        served: dict[int, float] = {}
        for concurrency in levels:
            asyncio.run(run_level(base_url, workloads[concurrency][:1], 1))  # warm-up
            record = asyncio.run(run_level(base_url, workloads[concurrency], concurrency))
            record["num_cores"] = num_cores()
            served[concurrency] = record["output_tokens_per_s"]
            emit(record, args.out)
    finally:
        process.terminate()
        process.wait(timeout=60)
    top = max(levels)
    overhead = {"bench": "serve_overhead", "concurrency": top, "served_tokens_per_s": served[top]}
    overhead |= {"engine_only_tokens_per_s": engine_tps, "ratio": served[top] / engine_tps}
    emit(overhead, args.out)


if __name__ == "__main__":
    main()
