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
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, REPO_ROOT, ServerProcess, start_server

from tests.conditions import wait_until

pytestmark = pytest.mark.slow
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BOUND_S = 120.0  # bounds a hang; a healthy run never gets near it
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


def _read_stream(
    base_url: str, body: dict[str, object], into: list[str], started: threading.Event, leave: threading.Event
) -> None:
    """Read one stream into `into`; hang up early once `leave` is set."""
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=BOUND_S) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                into.append(line.removeprefix("data: "))
                started.set()
            if leave.is_set():
                break
    started.set()


def _stream_in_background(
    server: ServerProcess, body: dict[str, object] = LONG
) -> tuple[threading.Thread, list[str], threading.Event, threading.Event]:
    data: list[str] = []
    started, leave = threading.Event(), threading.Event()
    thread = threading.Thread(target=_read_stream, args=(server.base_url, body, data, started, leave), daemon=True)
    thread.start()
    return thread, data, started, leave


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
    # The running request is far too long to finish during the test; it leaves (and frees the slot) when told to.
    running, running_data, started, leave = _stream_in_background(server, {**LONG, "max_tokens": 1000})
    assert started.wait(BOUND_S), "the running stream never started"
    waiting, waiting_data, _, _ = _stream_in_background(server)  # the one waiting slot
    wait_until(lambda: server.metric("sirocco_requests_waiting") >= 1, "the second request to wait")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)
    with client, pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.body["type"] == "rate_limit_error"
    assert "[DONE]" not in running_data, "the running request finished before the queue was tested"
    leave.set()
    running.join(BOUND_S)
    waiting.join(BOUND_S)
    assert not waiting.is_alive(), "the waiting request was not served after the slot freed"
    assert waiting_data[-1] == "[DONE]"  # the waiting request was served once the slot freed


def test_sigterm_lets_the_stream_finish_and_refuses_new_requests(server: ServerProcess) -> None:
    thread, data, started, _ = _stream_in_background(server)
    assert started.wait(BOUND_S), "the stream never started"
    server.process.send_signal(signal.SIGTERM)
    wait_until(server.is_draining, "/health to answer 503 draining after SIGTERM")
    refused = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "a"}, headers=AUTH)
    assert refused.status_code == 503
    thread.join(BOUND_S)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(timeout=BOUND_S) == 0


def _wait_for_loading(server: ServerProcess, timeout_s: float = BOUND_S) -> httpx.Response:
    """The first /health answer once the port is open (the server binds before it loads)."""

    def first_answer() -> httpx.Response | None:
        assert server.process.poll() is None, server.log()
        try:
            return httpx.get(f"{server.base_url}/health", timeout=5)
        except httpx.TransportError:
            return None

    return wait_until(first_answer, "the port to open", timeout_s, poll_s=0.2)


def test_a_drain_that_times_out_ends_streams_with_an_error_event(tmp_path: pathlib.Path) -> None:
    """Past drain_timeout_s the in-flight stream ends with one error event, not a connection cut mid-stream."""
    settings = {"SIROCCO_DRAIN_TIMEOUT_S": "1", "SIROCCO_CACHE_DIR": str(REPO_ROOT / ".cache" / "sirocco")}
    server = ServerProcess(tmp_path / "server.log", settings)
    try:
        server.wait_ready()
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        data: list[str] = []
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=BOUND_S) as response:
            for line in response.iter_lines():  # raises on a connection cut before the body's end
                if line.startswith("data:"):
                    data.append(line.removeprefix("data: "))
                    if len(data) == 2:
                        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=BOUND_S) == 0, server.log()
    finally:
        server.stop()
    assert "[DONE]" not in data and len(data) >= 3, data[-3:]
    assert all("error" not in json.loads(item) for item in data[:-1])
    error = json.loads(data[-1])["error"]
    assert error["type"] == "service_unavailable_error" and error["code"] == "engine_dead", error
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_loading_stops_the_server_at_once(tmp_path: pathlib.Path, sig: signal.Signals) -> None:
    # An empty cache: the embedded model's tokenizer is extracted from its GGUF first (the slowest first start there is).
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
    """Preparing the embedded model (an empty cache) may draw progress bars unless they are off; JSON logs turn them off."""
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
    assert any(message.startswith("prepared SmolLM2-135M-Instruct.Q4_1.gguf for serving") for message in messages)
    assert any(message.startswith("ready in ") for message in messages)
