"""Gateway fixtures: a FakeEngine and a TestClient around create_app."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fake_engine import FakeEngine
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings

MODEL = "SmolLM2-135M-Instruct"
ClientFactory = Callable[..., TestClient]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_client(engine: FakeEngine, tmp_path: pathlib.Path) -> Iterator[ClientFactory]:
    """make_client(**settings) -> a started TestClient; 500s come back as responses, not exceptions.

    Its response store is a SQLite file of the test's own, not the one in the user's cache directory.
    """
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        settings = {"responses_store_path": str(tmp_path / "responses.sqlite3"), **settings}
        client = TestClient(create_app(Settings(**settings), engine), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()
