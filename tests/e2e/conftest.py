"""A real `sirocco serve` in a subprocess on a free loopback port, serving the embedded model; one per test module."""

from tests.server import MODEL, REPO_ROOT, ServerProcess, free_port, start_server

__all__ = ["MODEL", "REPO_ROOT", "ServerProcess", "free_port", "start_server"]
