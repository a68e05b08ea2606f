"""`sirocco serve --tensor-parallel-size 2` through the openai SDK: the same text as one rank; SIGTERM leaves no rank behind."""

from __future__ import annotations

import json
import os
import pathlib
import signal

import httpx
import openai
import pytest

from tests.conditions import wait_until
from tests.server import ServerProcess

BOUND_S = 120.0  # turns a hang into a failure; never reached on a healthy run


def _children(pid: int) -> set[int]:
    """Child processes of `pid` (every thread's children)."""
    found: set[int] = set()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def _has_exited(pid: int) -> bool:
    """Gone, or exited and waiting to be reaped (an orphan is reaped by the container's init, which may never do it)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _complete(server: ServerProcess, model: str) -> str:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
        completion = client.completions.create(model=model, prompt="Hello there", max_tokens=12, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    return completion.choices[0].text


def test_two_ranks_serve_the_same_text_and_sigterm_stops_them(
    tmp_path: pathlib.Path, tiny_mistral_dir: pathlib.Path, embedded_model_dir: pathlib.Path
) -> None:
    assert embedded_model_dir.is_dir()  # the tiny model borrows its tokenizer
    model = str(tiny_mistral_dir)
    texts: dict[int, str] = {}
    children: set[int] = set()
    for tp in (1, 2):
        settings = {"SIROCCO_MODEL": model, "SIROCCO_MAX_MODEL_LEN": "512", "SIROCCO_TENSOR_PARALLEL_SIZE": str(tp)}
        server = ServerProcess(tmp_path / f"server-tp{tp}.log", settings)
        try:
            server.wait_ready()
            texts[tp] = _complete(server, model)
            if tp == 2:
                children = _children(server.process.pid)  # rank 1 (and multiprocessing's resource tracker)
                server.process.send_signal(signal.SIGTERM)
                server.process.wait(timeout=BOUND_S)
        finally:
            server.stop()
    assert texts[1] and texts[2] == texts[1]
    assert children, "no worker process was started"
    wait_until(lambda: all(_has_exited(pid) for pid in children), "every rank to exit after SIGTERM", BOUND_S)


def _rank_workers(pid: int) -> set[int]:
    """The spawned rank processes among `pid`'s children (not multiprocessing's resource tracker)."""
    return {child for child in _children(pid) if b"spawn_main" in pathlib.Path(f"/proc/{child}/cmdline").read_bytes()}


def test_a_killed_rank_fails_the_stream_turns_health_503_and_leaves_nothing(
    tmp_path: pathlib.Path, tiny_mistral_dir: pathlib.Path, embedded_model_dir: pathlib.Path
) -> None:
    assert embedded_model_dir.is_dir()  # the tiny model borrows its tokenizer
    model = str(tiny_mistral_dir)
    settings = {"SIROCCO_MODEL": model, "SIROCCO_MAX_MODEL_LEN": "512", "SIROCCO_TENSOR_PARALLEL_SIZE": "2"}
    server = ServerProcess(tmp_path / "server.log", settings)
    children: set[int] = set()
    data: list[str] = []
    try:
        server.wait_ready()
        children = _children(server.process.pid)
        (rank,) = _rank_workers(server.process.pid)
        body = {"model": model, "prompt": "Hello there", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=BOUND_S) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    data.append(line.removeprefix("data: "))
                    if len(data) == 2:
                        os.kill(rank, signal.SIGKILL)  # mid-generation
        health = httpx.get(f"{server.base_url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead", health.text
        assert "rank 1" in server.log(), server.log()[-3000:]  # the log names the rank and why
    finally:
        server.stop()
    assert "[DONE]" not in data, data[-3:]
    assert json.loads(data[-1])["error"]["code"] == "engine_dead", data[-1]  # the stream ended with one error event
    wait_until(lambda: all(_has_exited(pid) for pid in children), "every child process to exit", BOUND_S)


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if not pathlib.Path("/proc/self/task").is_dir():
        pytest.skip("reads child processes from /proc")
