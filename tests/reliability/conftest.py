"""A real `sirocco serve` subprocess per test module for the reliability suites, plus the helpers they share.

Everything runs on 127.0.0.1 with the embedded model, a small KV cache and small max_tokens, so the suites stay fast.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
FAULT_SERVER = pathlib.Path(__file__).with_name("fault_server.py")
MODEL = "SmolLM2-135M-Instruct"
ERROR_FIELDS = {"message", "type", "param", "code"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`sirocco serve` (or the fault-injecting launcher) with SIROCCO_* settings; its log goes to a file."""

    def __init__(self, log_path: pathlib.Path, settings: dict[str, str], with_faults: bool = False) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SIROCCO_CACHE_DIR": str(REPO_ROOT / ".cache" / "sirocco"),
            "SIROCCO_KV_CACHE_GIB": "0.25",
            "SIROCCO_MAX_MODEL_LEN": "1024",
            **settings,
        }
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        launcher = [str(FAULT_SERVER)] if with_faults else ["-m", "gateway"]
        command = [sys.executable, *launcher, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log()}")

    def log(self, since: int = 0) -> str:
        """The log, from character `since` on (take len(server.log()) before an action to see only what it logged)."""
        return self.log_path.read_text(errors="replace")[since:]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(sirocco_\w+) (\S+)$", text, re.MULTILINE)}

    def wait_idle(self, timeout_s: float = 30.0) -> dict[str, float]:
        """Wait until nothing runs or waits and no KV block is in use; return the last metrics either way."""
        deadline = time.monotonic() + timeout_s
        while True:
            metrics = self.metrics()
            idle = all(metrics[name] == 0 for name in IDLE_GAUGES)
            if idle or time.monotonic() > deadline:
                return metrics
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


IDLE_GAUGES = ("sirocco_requests_running", "sirocco_requests_waiting", "sirocco_kv_cache_usage_ratio")


def start_server(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path, with_faults: bool = False, **settings: str
) -> Iterator[Server]:
    assert embedded_model_dir.is_dir()  # the shared fixture converts the embedded model once
    server = Server(tmp_path_factory.mktemp("server") / "server.log", settings, with_faults)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


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
    """No traceback and no 5xx in the server's log (from character `since` on)."""
    log = server.log(since)
    assert "Traceback" not in log, log[-4000:]
    assert not re.search(r"sirocco\.access: \S+ \S+ 5\d\d ", log), log[-4000:]


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
