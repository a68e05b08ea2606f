"""End to end with the engine loop in its own process (SIROCCO_ENGINE_PROCESS=true), one server: the openai SDK gets the
same text streamed and not; when the engine process dies, pending and new requests get clean 503 errors, and SIGTERM then
leaves no process behind. (A request failing inside the engine process, and the drain: tests/reliability/test_chaos.py.)"""

from __future__ import annotations

import json
import os
import pathlib
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import MODEL, ServerProcess, chat_whole_and_streamed, start_server

from tests.conditions import wait_until
from tests.server import child_pids, is_running

pytestmark = pytest.mark.slow
BOUND_S = 120.0  # bounds a hang; a healthy run never gets near it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[ServerProcess]:
    yield from start_server(tmp_path_factory, embedded_model_dir, SIROCCO_ENGINE_PROCESS="true")


def test_engine_process_serves_the_same_text_streamed_and_not(server: ServerProcess) -> None:
    assert _engine_core_pid(server)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=BOUND_S)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0.0}
    whole = client.completions.create(**body)  # type: ignore[call-overload]
    chunks = list(client.completions.create(**body, stream=True))  # type: ignore[call-overload]
    streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    messages = [{"role": "user", "content": "Say hello."}]
    chat, chat_streamed = chat_whole_and_streamed(client, model=MODEL, messages=messages, max_tokens=16, temperature=0.0)
    assert chat.choices[0].message.content and chat_streamed == chat.choices[0].message.content


def _engine_core_pid(server: ServerProcess) -> int:
    """The engine-core child (started by multiprocessing's spawn), not multiprocessing's resource tracker."""
    pids = [pid for pid in child_pids(server.process.pid) if b"spawn_main" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(pids) == 1, pids
    return pids[0]


def test_engine_process_death_fails_pending_requests_and_turns_health_503(server: ServerProcess) -> None:
    """Runs last: it ends the module's server. The engine-core process killed mid-stream: the stream ends with one error
    event, the other request in flight gets a 503, /health and new requests answer 503 engine_dead at once (no hang),
    and SIGTERM still ends the server cleanly, leaving no process behind."""
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
    engine_pid = _engine_core_pid(server)
    url = f"{server.base_url}/v1/completions"
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        httpx.stream("POST", url, json={**long, "stream": True}, timeout=BOUND_S) as stream,
    ):
        lines = stream.iter_lines()
        data = [next(line for line in lines if line.startswith("data:"))]  # the stream is under way
        whole = pool.submit(httpx.post, url, json=long, timeout=BOUND_S)
        wait_until(lambda: server.metric("sirocco_requests_running") == 2, "both requests to run in the engine")
        os.kill(engine_pid, signal.SIGKILL)
        data += [line for line in lines if line.startswith("data:")]
    answer = whole.result(timeout=BOUND_S)
    assert "[DONE]" not in data[-1]
    error = json.loads(data[-1].removeprefix("data:"))["error"]
    assert error["code"] == "engine_dead" and error["type"] == "service_unavailable_error", error
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_dead", answer.text
    health = httpx.get(f"{server.base_url}/health", timeout=BOUND_S)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead", health.text
    refused = httpx.post(url, json={**long, "max_tokens": 1}, timeout=BOUND_S)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead", refused.text
    assert "the engine process died: killed by SIGKILL" in server.log(), server.log()
    children = child_pids(server.process.pid)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=BOUND_S) == 0, server.log()
    wait_until(lambda: not any(is_running(pid) for pid in children), "the server's child processes to exit", BOUND_S)
    assert "Traceback" not in server.log(), server.log()
