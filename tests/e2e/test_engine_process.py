"""End to end with the engine loop in its own process (SIROCCO_ENGINE_PROCESS=true): the openai SDK gets the same text
streamed and not, and after SIGTERM no process the server started remains."""

from __future__ import annotations

import pathlib
import signal

import openai
import pytest
from conftest import MODEL, ServerProcess

from tests.conditions import wait_until
from tests.server import child_pids, is_running

pytestmark = pytest.mark.slow
BOUND_S = 120.0  # bounds a hang; a healthy run never gets near it


def test_engine_process_serves_and_leaves_nothing_behind(tmp_path: pathlib.Path, embedded_model_dir: pathlib.Path) -> None:
    assert embedded_model_dir.is_dir()
    server = ServerProcess(tmp_path / "server.log", {"SIROCCO_ENGINE_PROCESS": "true"})
    try:
        server.wait_ready()
        children = child_pids(server.process.pid)
        assert children, "the engine-core process should be a child of the server"
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=BOUND_S)
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0.0}
        whole = client.completions.create(**body)  # type: ignore[call-overload]
        chunks = list(client.completions.create(**body, stream=True))  # type: ignore[call-overload]
        streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
        assert whole.choices[0].text and streamed == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        messages = [{"role": "user", "content": "Say hello."}]
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0.0)  # type: ignore[arg-type]
        chat_chunks = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=16,
            temperature=0.0,
            stream=True,  # type: ignore[arg-type]
        )
        chat_streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
        assert chat.choices[0].message.content and chat_streamed == chat.choices[0].message.content
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=BOUND_S) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()
        wait_until(lambda: not any(is_running(pid) for pid in children), "the server's child processes to exit", BOUND_S)
    finally:
        server.stop()

