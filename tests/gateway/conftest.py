"""Gateway fixtures: a FakeEngine and a TestClient around create_app."""

from __future__ import annotations

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
def make_client(engine: FakeEngine) -> Iterator[ClientFactory]:
    """make_client(**settings) -> a started TestClient; 500s come back as responses, not exceptions."""
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        client = TestClient(create_app(Settings(**settings), engine), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()
