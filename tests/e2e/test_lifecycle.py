"""End to end: one server with an API key and a one-slot engine (401, 429 with Retry-After, the SIGTERM drain), and
startups of their own: /health 503 "loading" while the model loads, a signal then, a failed load, a busy port."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, REPO_ROOT, ServerProcess, start_server

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


def _wait_for_loading(server: ServerProcess, timeout_s: float = 120.0) -> httpx.Response:
    """The first /health answer once the port is open (the server binds before it loads)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log()
        try:
            return httpx.get(f"{server.base_url}/health", timeout=5)
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"the port did not open within {timeout_s}s:\n{server.log()}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_loading_stops_the_server_at_once(tmp_path: pathlib.Path, sig: signal.Signals) -> None:
    # An empty cache: the embedded model is converted first (the slowest first start there is).
    server = ServerProcess(tmp_path / "server.log", {"SIROCCO_CACHE_DIR": str(tmp_path / "cache")})
    try:
        health = _wait_for_loading(server)
        assert health.status_code == 503 and health.json()["error"]["code"] == "loading", health.text
        models = httpx.get(f"{server.base_url}/v1/models", timeout=5)
        assert models.status_code == 503 and models.json()["error"]["code"] == "loading"
        server.process.send_signal(sig)
        assert server.process.wait(timeout=20) == 128 + sig, server.log()
    finally:
        server.stop()
    assert "Traceback" not in server.log() and "CancelledError" not in server.log(), server.log()
    assert f"interrupted by {sig.name} while loading" in server.log()


def test_a_failed_load_is_one_line_and_exit_1(tmp_path: pathlib.Path) -> None:
    settings = {"SIROCCO_MODEL": "nobody/no-such-model", "SIROCCO_DOWNLOAD_DIR": str(tmp_path / "hub")}
    server = ServerProcess(tmp_path / "server.log", settings)  # offline: the Hub cannot be asked
    try:
        assert server.process.wait(timeout=120) == 1, server.log()
    finally:
        server.stop()
    log = server.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "could not load the model: model 'nobody/no-such-model' is not a local directory" in errors[0]
    assert "Traceback" not in log, log


def test_a_busy_port_fails_in_one_line_before_loading(tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SIROCCO_CACHE_DIR": str(tmp_path / "cache")}  # an empty cache: never touched
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and f"--port / SIROCCO_PORT: port {port} on 127.0.0.1 is already in use" in done.stderr
    assert not (tmp_path / "cache").exists()  # nothing was converted or loaded


def test_a_first_start_with_json_logs_writes_only_json_lines(tmp_path: pathlib.Path) -> None:
    """Converting the embedded model (an empty cache) draws progress bars unless they are off; JSON logs turn them off."""
    settings = {"SIROCCO_CACHE_DIR": str(tmp_path / "cache"), "SIROCCO_LOG_JSON": "true"}
    server = ServerProcess(tmp_path / "server.log", settings)
    try:
        health = _wait_for_loading(server)
        assert health.status_code == 503, health.text  # the port opens long before the conversion is done
        server.wait_ready(timeout_s=280)
        server.process.send_signal(signal.SIGINT)
        server.process.wait(timeout=30)
    finally:
        server.stop()
    lines = server.log().splitlines()
    messages = [json.loads(line)["message"] for line in lines]  # fails on any line that is not one JSON object
    assert any(message.startswith("converted embedded model") for message in messages)
    assert any(message.startswith("ready in ") for message in messages)
