"""End to end, one server with an API key and a one-slot engine: 401, 429 with Retry-After, and the SIGTERM drain."""

from __future__ import annotations

import json
import pathlib
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, ServerProcess, start_server

pytestmark = pytest.mark.slow
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[ServerProcess]:
    yield from start_server(
        tmp_path_factory,
        embedded_model_dir,
        SIROCCO_API_KEYS=KEY,
        SIROCCO_MAX_NUM_SEQS="1",
        SIROCCO_MAX_WAITING_REQUESTS="1",
        SIROCCO_RETRY_AFTER_S="2",
        SIROCCO_DRAIN_TIMEOUT_S="60",
    )


def _read_stream(base_url: str, into: list[str], started: threading.Event) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", json=LONG, headers=AUTH, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                into.append(line.removeprefix("data: "))
                started.set()
    started.set()


def _stream_in_background(server: ServerProcess) -> tuple[threading.Thread, list[str], threading.Event]:
    data: list[str] = []
    started = threading.Event()
    thread = threading.Thread(target=_read_stream, args=(server.base_url, data, started), daemon=True)
    thread.start()
    return thread, data, started


def test_api_key_is_required_on_the_api_only(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.models.list()
        assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 401
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0) as client:
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    assert KEY not in server.log()


def test_full_waiting_queue_is_429_with_retry_after(server: ServerProcess) -> None:
    running, _, started = _stream_in_background(server)
    assert started.wait(30)
    waiting, waiting_data, _ = _stream_in_background(server)  # the one waiting slot
    deadline = time.monotonic() + 10
    while server.metric("sirocco_requests_waiting") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)
    with client, pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.body["type"] == "rate_limit_error"
    running.join(60)
    waiting.join(60)
    assert waiting_data[-1] == "[DONE]"  # the waiting request was served once the slot freed


def test_sigterm_lets_the_stream_finish_and_refuses_new_requests(server: ServerProcess) -> None:
    thread, data, started = _stream_in_background(server)
    assert started.wait(30)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    health = httpx.get(f"{server.base_url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
    refused = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "a"}, headers=AUTH)
    assert refused.status_code == 503
    thread.join(60)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(timeout=30) == 0
