"""A real `sirocco serve` in a subprocess on a free loopback port, serving the embedded model; one per test module."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m gateway serve` with SIROCCO_* settings; logs go to a file shown when start-up fails."""

    def __init__(self, log_path: pathlib.Path, settings: dict[str, str]) -> None:
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
        command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics").text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match, name
        return float(match.group(1))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def start_server(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path, **settings: str
) -> Iterator[ServerProcess]:
    """Yield a ready server (the embedded model is converted first, by the shared fixture); stop it afterwards."""
    assert embedded_model_dir.is_dir()
    server = ServerProcess(tmp_path_factory.mktemp("server") / "server.log", settings)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
