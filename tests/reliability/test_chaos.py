"""Chaos against real servers: disconnect storms, slow readers, an engine-side fault, a full queue, SIGTERM under load.

After each storm the innocent requests got exactly the text they get alone (temperature 0), /health is 200, nothing
runs or waits and no KV block is in use. The cases that cross the engine's boundary (aborts, a request failing inside
the engine, the drain) run twice: with the step loop on a thread and in its own process (SIROCCO_ENGINE_PROCESS); the
others test the HTTP side and run once. The SIGTERM test ends the module's servers, so it comes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import random
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import (
    IDLE_GAUGES,
    MODEL,
    Server,
    assert_clean_log,
    assert_error_envelope,
    join_completion_stream,
    sse_data,
    start_server,
)
from fault_server import FAULT_STOP

from tests.conditions import async_wait_until, wait_until
from tests.server import child_pids, is_running

pytestmark = pytest.mark.slow
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are")
MAX_TOKENS = 12
DRAIN_TIMEOUT_S = 120.0  # the server exits once drained; this only bounds a drain that never ends


SETTINGS = {
    "SIROCCO_MAX_NUM_SEQS": "16",
    "SIROCCO_MAX_WAITING_REQUESTS": "24",
    "SIROCCO_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[Server]:
    yield from start_server(tmp_path_factory, embedded_model_dir, with_faults=True, **SETTINGS)


@pytest.fixture(scope="module")
def process_server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[Server]:
    """The same server with the engine's step loop in its own process."""
    yield from start_server(tmp_path_factory, embedded_model_dir, with_faults=True, SIROCCO_ENGINE_PROCESS="true", **SETTINGS)


@pytest.fixture(params=["server", "process_server"], ids=["engine_thread", "engine_process"])
def either_server(request: pytest.FixtureRequest) -> Server:
    """For the cases that cross the engine's boundary: each runs against both servers."""
    return request.getfixturevalue(request.param)


def _greedy(prompt: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


@pytest.fixture(scope="module")
def references(server: Server) -> dict[str, str]:
    """Each prompt's greedy text, run alone (the engine process must give the same)."""
    texts = {}
    for prompt in PROMPTS:
        response = httpx.post(f"{server.base_url}/v1/completions", json=_greedy(prompt), timeout=60)
        texts[prompt] = response.json()["choices"][0]["text"]
    return texts


# --- innocent clients ------------------------------------------------------------------------------------------


async def _innocent(client: httpx.AsyncClient, prompt: str, is_stream: bool) -> str:
    if not is_stream:
        response = await client.post("/v1/completions", json=_greedy(prompt))
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])
    async with client.stream("POST", "/v1/completions", json=_greedy(prompt, stream=True)) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines()]
    return join_completion_stream(sse_data(lines))[0]


async def _innocents(client: httpx.AsyncClient, references: dict[str, str]) -> None:
    """Every prompt streamed and not, all at once; each must get exactly its text from running alone."""
    jobs = [(prompt, is_stream) for prompt in references for is_stream in (False, True)]
    texts = await asyncio.gather(*(_innocent(client, prompt, is_stream) for prompt, is_stream in jobs))
    for (prompt, is_stream), text in zip(jobs, texts, strict=True):
        assert text == references[prompt], (prompt, is_stream)


# --- clients that walk away ------------------------------------------------------------------------------------


def _http_request(body: dict[str, object] | bytes) -> tuple[bytes, bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode()
    return head, raw


async def _send_then_close(server: Server, head: bytes, body: bytes, after_s: float) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head + body)
    await writer.drain()
    await asyncio.sleep(after_s)
    writer.close()
    await writer.wait_closed()


async def _abandon(kind: str, rng: random.Random, server: Server, client: httpx.AsyncClient) -> None:
    prompt = rng.choice(PROMPTS)
    if kind == "before_first_token":
        head, body = _http_request(_greedy(prompt, stream=True, max_tokens=24, ignore_eos=True))
        await _send_then_close(server, head, body, rng.uniform(0.0, 0.05))
    elif kind == "during_prefill":  # 700 distinct prompt tokens: a long prefill, no prefix-cache shortcut
        prompt_ids = [rng.randrange(1000, 40000) for _ in range(700)]
        head, body = _http_request({"model": MODEL, "prompt": prompt_ids, "max_tokens": 16, "stream": rng.random() < 0.5})
        await _send_then_close(server, head, body, rng.uniform(0.05, 0.4))
    elif kind == "mid_body":
        head, body = _http_request(_greedy(prompt))
        await _send_then_close(server, head, body[: len(body) // 2], rng.uniform(0.0, 0.2))
    elif kind == "mid_stream":
        num_events = rng.randint(1, 6)
        payload = _greedy(prompt, stream=True, max_tokens=32, ignore_eos=True, n=rng.randint(1, 3))
        async with client.stream("POST", "/v1/completions", json=payload) as response:
            async for line in response.aiter_lines():
                num_events -= line.startswith("data:")
                if num_events == 0:
                    break  # leaving the block closes the connection with the stream unread
    elif kind == "non_stream_timeout":
        payload = _greedy(prompt, max_tokens=32, ignore_eos=True)
        with contextlib.suppress(httpx.TimeoutException):
            await client.post("/v1/completions", json=payload, timeout=rng.uniform(0.2, 1.0))
    else:
        raise AssertionError(kind)


KINDS = ("before_first_token", "during_prefill", "mid_body", "mid_stream", "non_stream_timeout")


def test_disconnect_storm_leaves_others_served_and_nothing_held(either_server: Server, references: dict[str, str]) -> None:
    server = either_server
    log_start = len(server.log())
    rng = random.Random(7)

    async def storm() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            walkers = [_abandon(KINDS[i % len(KINDS)], rng, server, client) for i in range(20)]
            await asyncio.gather(_innocents(client, references), *walkers)
            await _innocents(client, references)  # and after the storm

    asyncio.run(storm())
    metrics = server.wait_idle()
    assert all(metrics[name] == 0 for name in IDLE_GAUGES), metrics
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert_clean_log(server, log_start)


def test_slow_readers_that_never_drain_do_not_hold_the_engine(server: Server, references: dict[str, str]) -> None:
    log_start = len(server.log())
    heavy = {"model": MODEL, "prompt": "List every prime:", "max_tokens": 32, "ignore_eos": True, "n": 2, "logprobs": 20}
    head, body = _http_request({**heavy, "stream": True})
    sockets = []
    try:
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, never read from
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(head + body)
            sockets.append(sock)

        async def others() -> None:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
                await _innocents(client, references)

        asyncio.run(others())
        # The engine finished the slow readers' requests even though nobody reads them: nothing runs or holds KV.
        metrics = server.wait_idle()
        assert all(metrics[name] == 0 for name in IDLE_GAUGES), metrics
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert_clean_log(server, log_start)


def test_engine_fault_fails_only_its_own_request(either_server: Server, references: dict[str, str]) -> None:
    server = either_server
    faulty = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 12, "ignore_eos": True, "stop": [FAULT_STOP]}

    async def run() -> tuple[list[str], httpx.Response, BaseException | None]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            sdk = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)

            async def stream_with_sdk() -> BaseException | None:
                stream = await sdk.completions.create(
                    model=MODEL,
                    prompt="Count: one, two,",
                    max_tokens=12,
                    stop=[FAULT_STOP],
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                try:
                    async for _ in stream:
                        pass
                except openai.APIError as exc:
                    return exc
                return None

            async def stream_raw() -> list[str]:
                async with client.stream("POST", "/v1/completions", json={**faulty, "stream": True}) as response:
                    assert response.status_code == 200  # the failure comes after the first event
                    return sse_data([line async for line in response.aiter_lines()])

            raw, whole, sdk_error, _ = await asyncio.gather(
                stream_raw(), client.post("/v1/completions", json=faulty), stream_with_sdk(), _innocents(client, references)
            )
            await sdk.close()
            return raw, whole, sdk_error

    raw, whole, sdk_error = asyncio.run(run())
    assert len(raw) >= 2 and "[DONE]" not in raw  # some tokens, then one final error event instead of [DONE]
    assert all("error" not in json.loads(item) for item in raw[:-1])
    error = json.loads(raw[-1])
    assert set(error) == {"error"} and error["error"]["code"] == "request_failed" and error["error"]["type"] == "server_error"
    assert whole.status_code == 500 and assert_error_envelope(whole)["code"] == "request_failed"
    assert isinstance(sdk_error, openai.APIError)  # the official client raises on the error event
    metrics = server.wait_idle()
    assert all(metrics[name] == 0 for name in IDLE_GAUGES), metrics
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert "engine loop died" not in server.log()


def test_full_queue_answers_429_then_recovers(server: Server, references: dict[str, str]) -> None:
    log_start = len(server.log())

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            bodies = [_greedy(PROMPTS[i % len(PROMPTS)], max_tokens=8) for i in range(64)]
            return list(await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies)))

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0, "64 requests at once should overflow 16 running + 24 waiting"
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"].isdigit()
            assert assert_error_envelope(response)["type"] == "rate_limit_error"
    metrics = server.wait_idle()
    assert all(metrics[name] == 0 for name in IDLE_GAUGES), metrics

    async def after() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            await _innocents(client, references)

    asyncio.run(after())
    assert_clean_log(server, log_start)


def test_sigterm_under_load_finishes_streams_refuses_new_and_exits(either_server: Server) -> None:
    """Runs last: it ends the module's servers."""
    server = either_server
    streamed = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "stream": True}
    streamed["stream_options"] = {"include_usage": True}

    async def run() -> tuple[list[list[str]], httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            started = [asyncio.Event() for _ in range(6)]

            async def stream(index: int) -> list[str]:
                data: list[str] = []
                async with client.stream("POST", "/v1/completions", json=streamed) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            data.append(line.removeprefix("data:").strip())
                            started[index].set()
                return data

            tasks = [asyncio.ensure_future(stream(i)) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 120)
            children.update(child_pids(server.process.pid))
            server.process.send_signal(signal.SIGTERM)
            signalled_s = time.monotonic()
            await async_wait_until(lambda: server.is_draining(), "the server to start draining after SIGTERM")
            refused = await client.post("/v1/completions", json={**streamed, "stream": False, "stream_options": None})
            health = await client.get("/health")
            results = await asyncio.gather(*tasks)
            await asyncio.to_thread(server.process.wait, DRAIN_TIMEOUT_S + 30)
            return results, refused, health, time.monotonic() - signalled_s

    children: set[int] = set()  # the engine-core process and multiprocessing's helper, in engine-process mode
    results, refused, health, exit_after_s = asyncio.run(run())
    assert refused.status_code == 503 and assert_error_envelope(refused)["code"] == "draining"
    assert health.status_code == 503
    for data in results:
        assert data[-1] == "[DONE]"
        chunks = [json.loads(item) for item in data[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 24
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert server.process.returncode == 0
    assert exit_after_s < DRAIN_TIMEOUT_S
    wait_until(lambda: not any(is_running(pid) for pid in children), "the server's child processes to exit", DRAIN_TIMEOUT_S)
