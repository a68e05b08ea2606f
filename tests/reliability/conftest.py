"""A real `sirocco serve` subprocess per test module for the reliability suites, plus the helpers they share.

Everything runs on 127.0.0.1 with the embedded model, a small KV cache and small max_tokens, so the suites stay fast.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server import IDLE_GAUGES, MODEL, REPO_ROOT, ServerProcess
from tests.server import start_server as start_shared

FAULT_SERVER = pathlib.Path(__file__).with_name("fault_server.py")
ERROR_FIELDS = {"message", "type", "param", "code"}
__all__ = ["IDLE_GAUGES", "MODEL", "REPO_ROOT", "Server", "start_server"]  # re-exported for the test modules


Server = ServerProcess


def start_server(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path, with_faults: bool = False, **settings: str
) -> Iterator[Server]:
    """The shared server fixture; with_faults starts the fault-injecting launcher instead of `python -m gateway`."""
    yield from start_shared(tmp_path_factory, embedded_model_dir, FAULT_SERVER if with_faults else None, **settings)


def assert_error_envelope(response: httpx.Response) -> dict[str, Any]:
    """A JSON error answer in OpenAI's envelope; returns the inner object."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.text[:200]
    return assert_error_body(response.json())


def assert_error_body(body: Any) -> dict[str, Any]:
    """Exactly {"error": {"message", "type", "param", "code"}}, each of the right type; returns the inner object."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    return error


def assert_clean_log(server: Server, since: int = 0) -> None:
    """No traceback and no 5xx in the server's log (from character `since` on).

    /health answering 503 is not an error: it says "loading" while the model loads (the port opens first).
    """
    log = server.log(since)
    assert "Traceback" not in log, log[-4000:]
    assert not re.search(r"sirocco\.access: (?!GET /health )\S+ \S+ 5\d\d ", log), log[-4000:]


def sse_data(lines: list[str]) -> list[str]:
    return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


def join_completion_stream(data: list[str]) -> dict[int, str]:
    """Text per choice index of a /v1/completions SSE stream that ended with [DONE]."""
    assert data and data[-1] == "[DONE]", data[-3:]
    texts: dict[int, str] = {}
    for item in data[:-1]:
        chunk = json.loads(item)
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts
