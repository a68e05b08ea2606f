"""A real `sirocco serve` in a subprocess on a free loopback port, serving the embedded model (e2e and reliability suites)."""

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

from tests.conditions import wait_until

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
IDLE_GAUGES = ("sirocco_requests_running", "sirocco_requests_waiting", "sirocco_kv_cache_usage_ratio")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`python -m gateway serve` (or another launcher script) with SIROCCO_* settings; its log goes to a file."""

    def __init__(self, log_path: pathlib.Path, settings: dict[str, str], launcher: pathlib.Path | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SIROCCO_CACHE_DIR": str(REPO_ROOT / ".cache" / "sirocco"),
            "SIROCCO_KV_CACHE_GIB": "0.25",
            "SIROCCO_MAX_MODEL_LEN": "1024",
            "SIROCCO_RESPONSES_STORE_PATH": str(log_path.parent / "responses.sqlite3"),  # one store per server
            **settings,
        }
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        program = [str(launcher)] if launcher is not None else ["-m", "gateway"]
        command = [sys.executable, *program, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
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
        """Every sirocco_* sample, keyed by name with labels, e.g. 'sirocco_requests_finished_total{finish_reason="abort"}'."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(sirocco_\S+) (\S+)$", text, re.MULTILINE)}

    def metric(self, name: str) -> float:
        metrics = self.metrics()
        assert name in metrics, name
        return metrics[name]

    def wait_idle(self, timeout_s: float = 120.0) -> dict[str, float]:
        """Wait until nothing runs or waits and no KV block is in use, and return the metrics; AssertionError on timeout."""
        metrics: dict[str, float] = {}

        def is_idle() -> bool:
            metrics.update(self.metrics())
            return all(metrics[name] == 0 for name in IDLE_GAUGES)

        wait_until(is_idle, f"an idle server ({', '.join(IDLE_GAUGES)} all 0)", timeout_s, poll_s=0.2)
        return metrics

    def is_draining(self) -> bool:
        """True once /health answers 503 `draining` (after SIGTERM)."""
        try:
            response = httpx.get(f"{self.base_url}/health", timeout=10)
        except httpx.TransportError:
            return False
        return response.status_code == 503 and "draining" in response.text

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
    tmp_path_factory: pytest.TempPathFactory,
    embedded_model_dir: pathlib.Path,
    launcher: pathlib.Path | None = None,
    **settings: str,
) -> Iterator[ServerProcess]:
    """Yield a ready server (the shared fixture converts the embedded model first); stop it afterwards."""
    assert embedded_model_dir.is_dir()
    server = ServerProcess(tmp_path_factory.mktemp("server") / "server.log", settings, launcher)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
