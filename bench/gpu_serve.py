"""Served against engine-only on the GPU: bench/gpu.py's checkpoint and request mix through `sirocco serve`.

In order, one thing at a time on the device:
  1. engine only: an LLMEngine in this process runs the workload (bench.gpu.run_workload), then is freed;
  2. for each engine layout in --modes (`thread`: the step loop on a thread of the server process; `process`: the step
     loop in its own process, SIROCCO_ENGINE_PROCESS=true): a `sirocco serve` subprocess on 127.0.0.1 with the same
     engine settings and the same KV block count; the workload streamed by --concurrency clients spread over
     --client-procs load-generator processes (plain httpx, /v1/completions, token-id prompts, greedy, ignore_eos,
     each request's own max_tokens), then time to first token at low load: --ttft-clients clients sending
     --ttft-requests fresh prompt-len prompts (another seed: nothing of them is in the prefix cache).
Prints one JSON line per engine-only run, per served run, per TTFT run, and one `gpu_serve_ratio` per mode: served
output tok/s over engine-only output tok/s on the same requests.

    python -m bench.gpu_serve --model /tmp/sirocco-7b --out bench/results/gpu.jsonl      # after bench.gpu wrote it
    python -m bench.gpu_serve --smoke                                                       # CPU, tiny, end to end
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import describe_device, emit, free_memory, versions
from bench.gpu import BenchRequest, add_engine_size_args, make_workload, run_workload
from bench.serve import percentile, settings_env, start_server, stop_server
from engine import EngineConfig
from engine.llm_engine import LLMEngine

READY_TIMEOUT_S = 900.0  # loading 14 GB of weights and capturing the CUDA graphs
REQUEST_TIMEOUT_S = 1800.0


# --- load generator (its own processes) ----------------------------------------------------------------------


async def _stream(client: httpx.AsyncClient, model: str, request: BenchRequest) -> tuple[float, int]:
    """One streamed completion -> (seconds to its first text chunk, completion tokens from the usage chunk)."""
    body = {
        "model": model, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    start_s = time.monotonic()
    ttft_s, tokens = -1.0, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft_s < 0 and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft_s = time.monotonic() - start_s
    if tokens != request.max_tokens:
        raise RuntimeError(f"the server generated {tokens} tokens for a request of {request.max_tokens}")
    return ttft_s, tokens


async def _drive(base_url: str, model: str, requests: list[BenchRequest], concurrency: int) -> dict[str, Any]:
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:

        async def bounded(request: BenchRequest) -> tuple[float, int]:
            async with limit:
                return await _stream(client, model, request)

        start_s = time.monotonic()  # CLOCK_MONOTONIC: comparable across this machine's processes
        results = await asyncio.gather(*(bounded(r) for r in requests))
        end_s = time.monotonic()
    return {"start_s": start_s, "end_s": end_s, "ttfts": [r[0] for r in results], "tokens": sum(r[1] for r in results)}


def _client_proc(base_url: str, model: str, requests: list[BenchRequest], concurrency: int, go: Any, out: Any) -> None:
    go.wait()  # every load-generator process starts together
    try:
        out.put(asyncio.run(_drive(base_url, model, requests, concurrency)))
    except Exception as exc:  # reported to the parent, which fails the run with it
        out.put({"error": repr(exc)})


def stream_workload(base_url: str, model: str, workload: list[BenchRequest], concurrency: int, procs: int) -> dict[str, Any]:
    """The workload through the server by `concurrency` streams over `procs` processes -> tokens/s and TTFT figures."""
    procs = max(1, min(procs, concurrency, len(workload)))
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    workers = []
    for p in range(procs):
        share = concurrency // procs + (1 if p < concurrency % procs else 0)
        worker = ctx.Process(target=_client_proc, args=(base_url, model, workload[p::procs], share, go, out), daemon=True)
        worker.start()
        workers.append(worker)
    go.set()
    parts = [out.get(timeout=REQUEST_TIMEOUT_S) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    errors = [part["error"] for part in parts if "error" in part]
    if errors:
        raise RuntimeError(f"load generator failed: {errors[0]}")
    wall_s = max(p["end_s"] for p in parts) - min(p["start_s"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    ttfts = [t for p in parts for t in p["ttfts"]]
    return {
        "requests": len(workload), "concurrency": concurrency, "client_procs": procs, "output_tokens": tokens,
        "seconds": round(wall_s, 3), "output_tok_per_s": round(tokens / wall_s, 2),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 4), "ttft_p90_s": round(percentile(ttfts, 0.9), 4),
    }  # fmt: skip


# --- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny checkpoint bench.gpu --smoke writes, tiny load")
    p.add_argument("--model", default=None, help="the checkpoint directory bench.gpu wrote (its --work-dir)")
    p.add_argument("--modes", default="thread,process", help="engine layouts to serve: thread, process")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--min-output", type=int, default=128)
    p.add_argument("--max-output", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--client-procs", type=int, default=4, help="load-generator processes sharing the streams")
    p.add_argument("--ttft-clients", type=int, default=4)
    p.add_argument("--ttft-requests", type=int, default=16)
    add_engine_size_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="server logs (default: the system temp dir)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.prompt_len, args.min_output, args.max_output = 8, 16, 4, 8
        args.concurrency, args.client_procs, args.ttft_requests, args.ttft_clients = 4, 2, 2, 2
        args.max_num_seqs, args.max_num_batched_tokens = 8, 256
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model is None:
        from bench.gpu import default_work_dir

        args.model = str(default_work_dir(args.smoke))
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {model_dir}: run bench.gpu (--smoke) first, or pass --model")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    device = "cpu" if args.smoke else "cuda"
    log_dir = Path(args.log_dir) if args.log_dir else Path(os.environ.get("TMPDIR", "/tmp"))
    settings: dict[str, Any] = {
        "model": str(model_dir), "device": device, "dtype": "float32" if args.smoke else "bfloat16",
        "max_model_len": args.prompt_len + args.max_output + 16, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_waiting_requests": max(1024, args.num_requests + args.ttft_requests + 1),
        "gpu_memory_utilization": args.gpu_memory_utilization, "seed": args.seed,
    }  # fmt: skip
    if args.smoke:
        settings["kv_cache_gib"] = 0.25
    base = {"bench": "gpu_serve", "is_smoke": args.smoke, **versions()}

    # 1. Engine only; the servers get its KV block count, so every run has the same cache.
    engine = LLMEngine(EngineConfig(**settings))
    settings.pop("kv_cache_gib", None)
    settings["num_kv_blocks"] = engine.block_manager.num_blocks
    base["device"] = describe_device(engine.device)
    vocab = engine.model_config.vocab_size
    workload = make_workload(args.num_requests, args.prompt_len, args.min_output, args.max_output, vocab, args.seed)
    warm_up = make_workload(2, 8, 2, 2, vocab, args.seed + 100)
    run_workload(engine, warm_up, float("inf"))
    only = run_workload(engine, workload, float("inf"))
    engine_rate = only["output_tok_per_s"]
    emit({**base, "section": "engine_only", **only}, args.out)
    engine.runner.decode_graphs = None  # the graphs hold GPU memory too
    engine.close()
    del engine
    free_memory(torch.device(device))

    # 2. Served, one engine layout at a time.
    for i, mode in enumerate(modes):
        server_settings = {**settings, "engine_process": mode == "process"}
        log_path = log_dir / f"sirocco-gpu-serve-{mode}.log"
        process, base_url = start_server(settings_env(server_settings), log_path, READY_TIMEOUT_S)
        try:
            model = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]
            stream_workload(base_url, model, warm_up, 2, 1)
            served = stream_workload(base_url, model, workload, args.concurrency, args.client_procs)
            emit({**base, "section": "served", "mode": mode, **served}, args.out)
            fresh = make_workload(args.ttft_requests, args.prompt_len, 16, 16, vocab, args.seed + 10 + i)
            ttft = stream_workload(base_url, model, fresh, args.ttft_clients, 1)
            emit({**base, "section": "ttft_low_load", "mode": mode, **ttft}, args.out)
        finally:
            stop_server(process)
        ratio = served["output_tok_per_s"] / engine_rate
        emit({**base, "section": "gpu_serve_ratio", "mode": mode, "ratio": round(ratio, 3),
              "served_tok_per_s": served["output_tok_per_s"], "engine_only_tok_per_s": engine_rate,
              "ttft_p50_s_at_low_load": ttft["ttft_p50_s"]}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
