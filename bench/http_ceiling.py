"""HTTP-side ceiling: streamed tokens/s through the real gateway app and uvicorn, with an engine that costs nothing.

A `serve` subprocess runs uvicorn on 127.0.0.1 with create_app(settings, engine=ZeroCostEngine(...)): every delta is
ready at once (the engine's only work is building the RequestOutput), so all the server's CPU is the HTTP side's:
parsing, pydantic, SSE framing, metrics, the event loop. This process is the load generator: `concurrency` httpx
clients stream requests back to back for a fixed window and count tokens from the SSE chunks; the server's CPU
seconds in the same window come from /proc/<pid>/stat, so `server_cpu_us_per_token` does not depend on how fast the
client is (on a small machine the client shares the cores). `ceiling_tokens_per_s` = 1e6 / that: one core's worth.
Extra runs: the zero-cost engine with several tokens per delta; and the REAL AsyncEngine (thread, queues, delta joining)
over PacedCore, a stand-in LLMEngine stepping at a target rate, to see whether the engine keeps its rate beside the HTTP
side in one process (engine_tokens_per_s against engine_target_tokens_per_s).

    python -m bench.http_ceiling --out bench/results/http-ceiling-cpu.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx

from bench.common import emit, num_cores
from bench.engine_stand_ins import PacedCore, ZeroCostEngine, paced_engine
from engine import EngineConfig, SamplingParams

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_MODEL = "ceiling"


# --- server subprocess ---------------------------------------------------------------------------------------


def serve(port: int, tokens_per_delta: int, step_s: float | None, profile_path: str | None) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.settings import Settings

    settings = Settings(served_model_name=_MODEL, port=port, log_level="warning")
    configure_logging(settings.log_level, settings.log_json)
    engine = ZeroCostEngine(tokens_per_delta) if step_s is None else paced_engine(step_s, _report_path(port))
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    profiler = None
    if profile_path is not None:
        import cProfile

        profiler = cProfile.Profile(time.process_time)  # CPU time: under load, wall time counts waiting
        profiler.enable()
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT that stopped it, once it has shut down
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)


def _report_path(port: int) -> str:
    """Where the paced server on `port` writes its step report."""
    return os.path.join(tempfile.gettempdir(), f"sirocco-paced-{port}.json")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # fields 14 and 15 of proc(5), counted after the name


class Server:
    """The `serve` subprocess on a free loopback port; stopped (SIGINT, then kill) on exit."""

    def __init__(self, tokens_per_delta: int, step_s: float | None = None, profile_path: str | None = None) -> None:
        self.port = _free_port()
        command = [sys.executable, "-m", "bench.http_ceiling", "serve", "--port", str(self.port)]
        command += ["--tokens-per-delta", str(tokens_per_delta)]
        if step_s is not None:
            command += ["--step-s", str(step_s)]
        if profile_path:
            command += ["--profile", profile_path]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server was not healthy within {timeout_s} s")

    def stop(self) -> None:
        self.process.send_signal(2)  # SIGINT: uvicorn exits cleanly (and a profile is written)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- load generator ------------------------------------------------------------------------------------------


@dataclass
class Counts:
    num_tokens: int = 0
    num_chunks: int = 0
    num_requests: int = 0
    num_errors: int = 0


async def _engine_tokens(client: httpx.AsyncClient) -> int:
    """The engine's own count of generated tokens, from /metrics."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("sirocco_generation_tokens_total "):
            return int(float(line.split()[1]))
    raise RuntimeError("no sirocco_generation_tokens_total on /metrics")


def _count_tokens(endpoint: str, data: bytes) -> int:
    chunk = json.loads(data)
    if endpoint == "chat":
        return sum(len((choice["delta"].get("content") or "").split()) for choice in chunk["choices"])
    return sum(len(choice["text"].split()) for choice in chunk["choices"])


async def _stream_one(client: httpx.AsyncClient, endpoint: str, max_tokens: int, counts: Counts) -> None:
    if endpoint == "chat":
        path = "/v1/chat/completions"
        body = {"model": _MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True}
    else:
        path = "/v1/completions"
        body = {"model": _MODEL, "prompt": "hi", "max_tokens": max_tokens, "stream": True}
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            counts.num_errors += 1
            await response.aread()
            return
        buffer = b""
        async for raw in response.aiter_raw():
            buffer += raw
            *lines, buffer = buffer.split(b"\n")  # events end in a blank line; each data line is one chunk here
            for line in lines:
                if not line.startswith(b"data: "):
                    continue  # blank lines and sse-starlette's keep-alive comments
                data = line[6:].rstrip(b"\r")
                if data == b"[DONE]":
                    counts.num_requests += 1
                    return
                counts.num_chunks += 1
                counts.num_tokens += _count_tokens(endpoint, data)
    counts.num_errors += 1  # the stream ended without [DONE]


async def _client(client: httpx.AsyncClient, endpoint: str, max_tokens: int, counts: Counts) -> None:
    while True:
        await _stream_one(client, endpoint, max_tokens, counts)


def _read_steps(report_path: str | None) -> tuple[int, float]:
    """(steps, seconds late) so far, from a PacedCore's report; zeros without one."""
    if report_path is None:
        return 0, 0.0
    with open(report_path, encoding="ascii") as f:
        report = json.load(f)
    return report["num_steps"], report["late_s"]


def control_lateness(step_s: float, num_requests: int, window_s: float) -> float:
    """Mean lateness (ms) of PacedCore's steps alone on a thread of this process: the machine's own scheduling noise."""
    core = PacedCore(EngineConfig(), step_s)
    params = SamplingParams(max_tokens=1 << 30)
    for index in range(num_requests):
        core.add_prepared(str(index), [1], params)
    deadline_s = time.perf_counter() + window_s
    while time.perf_counter() < deadline_s:
        core.step()
    return core.late_s / max(core.num_steps, 1) * 1e3


async def measure(
    url: str,
    pid: int,
    endpoint: str,
    concurrency: int,
    max_tokens: int,
    warm_up_s: float,
    window_s: float,
    report_path: str | None = None,
) -> dict:
    """Stream with `concurrency` clients; count tokens and the server's CPU over `window_s` after `warm_up_s`."""
    counts = Counts()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(60.0)) as client:
        tasks = [asyncio.ensure_future(_client(client, endpoint, max_tokens, counts)) for _ in range(concurrency)]
        try:
            await asyncio.sleep(warm_up_s)
            start_engine_tokens = await _engine_tokens(client)
            start_steps, start_late_s = _read_steps(report_path)
            start_tokens, start_chunks, start_cpu_s, start_client_s = (
                counts.num_tokens,
                counts.num_chunks,
                _cpu_s(pid),
                time.process_time(),
            )
            start_s = time.perf_counter()
            await asyncio.sleep(window_s)
            wall_s = time.perf_counter() - start_s
            num_tokens, num_chunks = counts.num_tokens - start_tokens, counts.num_chunks - start_chunks
            server_cpu_s, client_cpu_s = _cpu_s(pid) - start_cpu_s, time.process_time() - start_client_s
            num_engine_tokens = await _engine_tokens(client) - start_engine_tokens
            end_steps, end_late_s = _read_steps(report_path)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    if failures:
        raise RuntimeError(f"{len(failures)} clients failed, first: {failures[0]!r}")
    if counts.num_errors:
        raise RuntimeError(f"{counts.num_errors} requests failed")
    # Per token the server produced (the engine's count): the server runs ahead of a slow client by what the socket
    # buffers hold (a whole 256-token response each), so the client's count over a short window is not the server's work.
    cpu_us_per_token = server_cpu_s / max(num_engine_tokens, 1) * 1e6
    tokens_per_chunk = num_tokens / max(num_chunks, 1)
    return {
        "tokens_per_s": round(num_tokens / wall_s, 1),  # received by the clients
        "engine_tokens_per_s": round(num_engine_tokens / wall_s, 1),  # generated (and, zero-cost engine, written)
        "chunks_per_s": round(num_chunks / wall_s, 1),
        "tokens_per_chunk": round(tokens_per_chunk, 2),
        "server_cpu_us_per_token": round(cpu_us_per_token, 2),
        "server_cpu_us_per_chunk": round(cpu_us_per_token * tokens_per_chunk, 2),
        "ceiling_tokens_per_s": round(1e6 / cpu_us_per_token, 0) if num_engine_tokens else 0,
        "server_cpu_share": round(server_cpu_s / wall_s, 2),  # cores the server used
        "client_cpu_share": round(client_cpu_s / wall_s, 2),
        "num_tokens": num_tokens,
        "num_engine_tokens": num_engine_tokens,
        "window_s": round(wall_s, 2),
        **(
            {
                "engine_steps_per_s": round((end_steps - start_steps) / wall_s, 1),
                "engine_step_late_ms_mean": round((end_late_s - start_late_s) / max(end_steps - start_steps, 1) * 1e3, 2),
            }
            if report_path
            else {}
        ),
    }


def _machine() -> dict[str, object]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "num_cores": num_cores(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    serve_parser = sub.add_parser("serve", help="(internal) the server subprocess")
    serve_parser.add_argument("--port", type=int, required=True)
    serve_parser.add_argument("--tokens-per-delta", type=int, default=1)
    serve_parser.add_argument("--profile", default=None, help="write cProfile stats here on exit")
    serve_parser.add_argument("--step-s", type=float, default=None, help="AsyncEngine over PacedCore stepping this often")
    parser.add_argument("--endpoints", default="chat,completions")
    parser.add_argument("--concurrency", default="16,64,256", help="comma-separated client counts (one token per delta)")
    parser.add_argument("--tokens-per-delta", default="4,16", help="extra runs at the highest concurrency, chat only")
    parser.add_argument(
        "--paced-tokens-per-s", default="12000,24000", help="extra runs at the highest concurrency: real AsyncEngine, paced"
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per request")
    parser.add_argument("--warm-up-s", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--label", default="", help="free text recorded in every line (e.g. the gateway version measured)")
    parser.add_argument("--out", default=None, help="also append the JSON lines here")
    parser.add_argument(
        "--profile",
        default=None,
        help="write the first server's cProfile stats here; skews its figures (its lines say is_profiled)",
    )
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port, args.tokens_per_delta, args.step_s, args.profile)
        return
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    top = max(concurrencies)
    # one server per engine set-up: (tokens per delta, paced target tokens/s or None) -> levels (endpoint, concurrency)
    runs: dict[tuple[int, float | None], list[tuple[str, int]]] = {}
    runs[(1, None)] = [(endpoint, c) for endpoint in filter(None, args.endpoints.split(",")) for c in concurrencies]
    for k in filter(None, args.tokens_per_delta.split(",")):
        runs[(int(k), None)] = [("chat", top)]
    for rate in filter(None, args.paced_tokens_per_s.split(",")):
        runs[(1, float(rate))] = [("chat", top)]
    set_ups = [(set_up, levels) for set_up, levels in runs.items() if levels]
    for index, ((tokens_per_delta, target), levels) in enumerate(set_ups):
        profile_path = args.profile if index == 0 else None  # the first server only: a later one would overwrite it
        step_s = None if target is None else top / target  # every running request gets one token per step
        control = {}
        if step_s is not None:  # the same stepping with no HTTP side beside it, just before
            control = {"control_step_late_ms_mean": round(control_lateness(step_s, top, args.window_s), 2)}
        with Server(tokens_per_delta, step_s, profile_path) as server:
            report_path = None if step_s is None else _report_path(server.port)
            for endpoint, concurrency in levels:
                result = asyncio.run(
                    measure(
                        server.url,
                        server.process.pid,
                        endpoint,
                        concurrency,
                        args.max_tokens,
                        args.warm_up_s,
                        args.window_s,
                        report_path,
                    )
                )
                record = {
                    "bench": "http_ceiling",
                    "label": args.label,
                    "engine": "zero_cost" if target is None else "paced_async_engine",
                    "engine_target_tokens_per_s": target,
                    "endpoint": endpoint,
                    "concurrency": concurrency,
                    "tokens_per_delta": tokens_per_delta,
                    "max_tokens": args.max_tokens,
                    "is_profiled": profile_path is not None,  # cProfile slows the server: not comparable with the others
                    **result,
                    **control,
                    **_machine(),
                }
                emit(record, args.out)
        if report_path is not None:
            os.remove(report_path)


if __name__ == "__main__":
    main()
