"""Sirocco beside vLLM's CPU build and llama.cpp's server on the same chat workload, one server at a time.

Each server, in the run's order (default: the Sirocco variants, the peers, then the first Sirocco variant again, so
Sirocco brackets the peers A-B-A), is started on a free loopback port, warmed up with one short request, and sent each
level's requests by AsyncOpenAI clients streaming /v1/chat/completions ("Write a long, detailed story about <topic>",
a topic per request, temperature 0.7, a seed per request, --max-tokens with EOS ignored where the server allows it);
then stopped, and the next starts only once it and its children have exited and its port is free. Peers are
installed into their own virtual environments (bench/peer_servers.py) on first use. Appends one JSON line per server
and level: output tok/s, TTFT p50/p99, the commit, the load average and the versions.

    python -m bench.cpu_peers --out bench/results/cpu-peers.jsonl
    python -m bench.cpu_peers --peers none --sirocco default --sirocco 2t:SIROCCO_NUM_THREADS=2     # A-B-A, Sirocco only
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psutil

from bench.common import emit, num_cores, versions
from bench.peer_servers import (
    PEER_ENV,
    PEER_KINDS,
    ServerSpec,
    ensure_peer,
    model_path,
    parse_sirocco,
    peer_command,
    peer_versions,
)
from bench.serve import percentile, settings_env, start_server, stop_server

SUBJECTS = ("a lighthouse keeper", "a retired astronaut", "a young cartographer", "a clockmaker", "a street musician",
            "a marine biologist", "a chess prodigy", "a night-shift baker", "a lost robot", "a beekeeper",
            "a train conductor", "an old dragon")  # fmt: skip
PLACES = ("on a distant moon", "in a flooded city", "in the Sahara", "aboard a night train", "in a mountain village",
          "under the sea", "in a busy harbour", "at the edge of the world")  # fmt: skip
TOPICS = [f"{subject} {place}" for place, subject in itertools.product(PLACES, SUBJECTS)]  # 96, consecutive differ
REQUEST_TIMEOUT_S = 600.0
LEVEL_TIMEOUT_S = 1800.0
EXIT_TIMEOUT_S = 60.0


@dataclass
class Level:
    concurrency: int
    num_requests: int


@dataclass
class Reply:
    ttft_s: float
    num_tokens: int
    is_counted_by_usage: bool


def parse_levels(text: str) -> list[Level]:
    """`1:16,8:16,32:64`: concurrency:requests pairs."""
    pairs = (item.split(":") for item in text.split(",") if item.strip())
    return [Level(int(concurrency), int(num_requests)) for concurrency, num_requests in pairs]


def prompts(offset: int, count: int) -> list[str]:
    """count prompts from topic `offset` on (levels take consecutive topics, so no two levels send the same prompt)."""
    return [f"Write a long, detailed story about {TOPICS[(offset + i) % len(TOPICS)]}." for i in range(count)]


async def one_request(client: openai.AsyncOpenAI, spec: ServerSpec, prompt: str, seed: int, max_tokens: int) -> Reply:
    # llama-cpp-python's server has no ignore_eos but min_tokens (EOS masked until then); it may send no usage in
    # streams, and then its tokens are counted as its text chunks (one per token)
    extra = {"min_tokens": max_tokens} if spec.kind == "llama-cpp" else {"ignore_eos": True}
    start_s = time.perf_counter()
    ttft_s, num_chunks, usage_tokens = 0.0, 0, None
    stream = await client.chat.completions.create(
        model=spec.name,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.7,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if num_chunks == 0:
                ttft_s = time.perf_counter() - start_s
            num_chunks += 1
    if usage_tokens is None:
        return Reply(ttft_s, num_chunks, is_counted_by_usage=False)
    return Reply(ttft_s, usage_tokens, is_counted_by_usage=True)


async def run_level(base_url: str, spec: ServerSpec, level: Level, offset: int, seed: int, max_tokens: int) -> dict[str, Any]:
    limit = asyncio.Semaphore(level.concurrency)
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=REQUEST_TIMEOUT_S) as client:

        async def bounded(prompt: str, seed: int) -> Reply:
            async with limit:
                return await one_request(client, spec, prompt, seed, max_tokens)

        requests = [bounded(p, seed + offset + i) for i, p in enumerate(prompts(offset, level.num_requests))]
        start_s = time.perf_counter()
        replies = await asyncio.wait_for(asyncio.gather(*requests), LEVEL_TIMEOUT_S)
        wall_s = time.perf_counter() - start_s
    num_tokens = sum(r.num_tokens for r in replies)
    ttft = [r.ttft_s for r in replies if r.num_tokens > 0]  # a reply with no text has no first token
    return {
        "concurrency": level.concurrency,
        "requests": level.num_requests,
        "max_tokens": max_tokens,
        "output_tokens": num_tokens,
        "requests_short": sum(r.num_tokens < max_tokens for r in replies),
        "tokens_counted_by": "usage" if all(r.is_counted_by_usage for r in replies) else "text_chunks",
        "seconds": round(wall_s, 3),
        "output_tok_per_s": round(num_tokens / wall_s, 2),
        "ttft_p50_s": round(percentile(ttft, 0.5), 4),
        "ttft_p99_s": round(percentile(ttft, 0.99), 4),
    }


def wait_exited(process: subprocess.Popen[bytes], base_url: str) -> None:
    """Stop the server, then make sure it and every process it started have exited and its port is free."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop_server(process)
    _, alive = psutil.wait_procs(children, timeout=EXIT_TIMEOUT_S)
    for child in alive:
        child.kill()
    _, alive = psutil.wait_procs(alive, timeout=EXIT_TIMEOUT_S)
    if alive:
        raise RuntimeError(f"processes {[p.pid for p in alive]} of the server on {base_url} did not exit")
    port = int(base_url.rsplit(":", 1)[1])
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} still busy {EXIT_TIMEOUT_S:.0f} s after its server exited") from None
        time.sleep(0.5)


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    is_dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "engine", "gateway"], check=False).returncode != 0
    return f"{head}+dirty" if is_dirty else head


def start(spec: ServerSpec, args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    if spec.kind == "sirocco":
        env = settings_env({"model": spec.model, "served_model_name": spec.name}) | spec.env
        return start_server(env, log_path, args.ready_timeout_s)
    peer_dir = Path(args.peer_dir) / spec.kind
    env = dict(os.environ) | spec.env
    return start_server(
        env, log_path, args.ready_timeout_s, lambda port: peer_command(spec, peer_dir, port, args.peer_threads), "/v1/models"
    )


def bench_server(spec: ServerSpec, run_index: int, args: argparse.Namespace, shared: dict[str, Any]) -> None:
    """Start one server, warm it up, run every level, stop it; one line per level."""
    log_path = Path(args.log_dir) / f"cpu-peers-{run_index}-{spec.name}.log"
    log_path.unlink(missing_ok=True)  # start_server appends: this run's log only
    if spec.kind == "sirocco":
        server_versions = {"sirocco": shared["commit"], **versions()}
    else:
        server_versions = peer_versions(spec.kind, Path(args.peer_dir) / spec.kind)
    start_s = time.perf_counter()
    process, base_url = start(spec, args, log_path)
    startup_s = time.perf_counter() - start_s
    try:
        asyncio.run(run_level(base_url, spec, Level(1, 1), len(TOPICS) - 1, args.seed, 4))  # warm-up
        offset = 0
        for level in args.levels:
            load_before = round(os.getloadavg()[0], 2)
            record = asyncio.run(run_level(base_url, spec, level, offset, args.seed, args.max_tokens))
            offset += level.num_requests
            emit({
                "bench": "cpu_peers", "server": spec.name, "kind": spec.kind, "run_index": run_index, **record,
                "model": spec.model, "env": spec.env, "startup_s": round(startup_s, 1), "load_avg_1m_before": load_before,
                "load_avg_1m_after": round(os.getloadavg()[0], 2), "cpus": shared["cpus"], "commit": shared["commit"],
                "versions": server_versions,
            } | ({"peer_threads": args.peer_threads} if spec.kind == "llama-cpp" else {}), args.out)  # fmt: skip
    finally:
        wait_exited(process, base_url)


def server_order(args: argparse.Namespace) -> list[ServerSpec]:
    variants = [parse_sirocco(text, args.cache_dir) for text in args.sirocco or ["sirocco"]]
    kinds = [] if args.peers == "none" else [kind.strip() for kind in args.peers.split(",") if kind.strip()]
    peers = [
        ServerSpec(kind, kind, model_path("gguf" if kind == "llama-cpp" else "float32", args.cache_dir), dict(PEER_ENV[kind]))
        for kind in kinds
    ]
    by_name = {spec.name: spec for spec in [*variants, *peers]}
    if args.order:
        names = [name.strip() for name in args.order.split(",") if name.strip()]
        if unknown := sorted(set(names) - set(by_name)):
            raise SystemExit(f"--order names {unknown}, which are neither --sirocco variants nor --peers: {sorted(by_name)}")
        return [by_name[name] for name in names]
    return [*variants, *peers, variants[0]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sirocco", action="append", help="a Sirocco variant NAME[:model=float32|gguf|PATH,ENV=VALUE...] "
                        "(repeatable; default: one named sirocco with the defaults a user gets)")  # fmt: skip
    parser.add_argument("--peers", default=",".join(PEER_KINDS), help="comma-separated peers to run, or none")
    parser.add_argument("--order", default=None, help="comma-separated server names to run in this order (repeats allowed)")
    parser.add_argument("--levels", type=parse_levels, default=parse_levels("1:16,8:16,32:64"), help="concurrency:requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="request i of a run gets seed + i")
    parser.add_argument("--cache-dir", default=".cache/sirocco", help="Sirocco's cache holding the converted embedded model")
    parser.add_argument("--peer-dir", default=".cache/peers", help="one virtual environment per peer kind under it")
    parser.add_argument("--peer-threads", type=int, default=2, help="llama.cpp's --n_threads")
    parser.add_argument("--ready-timeout-s", type=float, default=900.0, help="bound on a server's start (vLLM compiles)")
    parser.add_argument("--log-dir", default="/tmp", help="each server's output goes to a file here")
    parser.add_argument("--out", default=None, help="append the JSON lines here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    order = server_order(args)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    for kind in sorted({spec.kind for spec in order} - {"sirocco"}):
        ensure_peer(kind, Path(args.peer_dir) / kind, Path(args.log_dir) / f"cpu-peers-install-{kind}.log")
    shared = {"commit": git_commit(), "cpus": num_cores()}
    for run_index, spec in enumerate(order):
        bench_server(spec, run_index, args, shared)


if __name__ == "__main__":
    main()
