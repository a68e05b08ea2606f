"""GatewayState.system_fingerprint: `fp_` + a short hash, the same on every response and chunk of both endpoints."""

from __future__ import annotations

import re

from conftest import MODEL
from fake_engine import FakeEngine
from sse import sse_json
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "a", "max_tokens": 2}


def _fingerprints(client: TestClient) -> set[str]:
    seen = set()
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        seen.add(client.post(path, json=body).json()["system_fingerprint"])
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        seen.update(chunk["system_fingerprint"] for chunk in sse_json(client.post(path, json=stream).text))
    return seen


def test_every_response_and_chunk_carries_one_fingerprint(client: TestClient) -> None:
    (fingerprint,) = _fingerprints(client)
    assert re.fullmatch(r"fp_[0-9a-f]{10}", fingerprint), fingerprint


def test_the_fingerprint_follows_the_model_and_the_engine(client: TestClient) -> None:
    (base,) = _fingerprints(client)
    other_engine = FakeEngine()
    other_engine.fingerprint = "another-config"
    with TestClient(create_app(Settings(), other_engine)) as other:
        assert _fingerprints(other) == {other.app.state.gateway.system_fingerprint(other_engine)} != {base}
    with TestClient(create_app(Settings(served_model_name="renamed"), FakeEngine())) as renamed:
        body = {**COMPLETION, "model": "renamed"}
        assert renamed.post("/v1/completions", json=body).json()["system_fingerprint"] not in (base, None)
