"""Client disconnects, driven at the ASGI level: the engine request is aborted, streamed or not."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import MODEL
from fake_engine import FakeEngine

from gateway.app import create_app
from gateway.settings import Settings


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }


async def _hang_up(
    engine: FakeEngine, path: str, body: dict[str, Any], after_first_body: bool, num_aborts: int = 1
) -> list[dict[str, Any]]:
    """Send `body`, hang up (after the first body bytes, or after 0.1 s), and return what the app sent."""
    app = create_app(Settings(), engine)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": json.dumps(body).encode(), "more_body": False})
    sent: list[dict[str, Any]] = []
    got_body = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            got_body.set()

    task = asyncio.ensure_future(app(_scope(path), inbox.get, send))
    if after_first_body:
        await asyncio.wait_for(got_body.wait(), 5)
    else:
        await asyncio.sleep(0.1)
    inbox.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(task, 5)
    metrics = app.state.gateway.metrics
    assert metrics.finished.labels("abort")._value.get() == num_aborts
    return sent


def test_disconnect_mid_stream_aborts_the_request() -> None:
    engine = FakeEngine()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 50, "stream": True}
    sent = asyncio.run(_hang_up(engine, "/v1/chat/completions", body, after_first_body=True))
    assert sent[0]["status"] == 200
    (request_id,) = engine.requests
    assert request_id in engine.aborted
    assert not engine.running
    assert b"[DONE]" not in b"".join(message.get("body", b"") for message in sent)


def test_disconnect_while_waiting_for_a_whole_completion_aborts_it() -> None:
    engine = FakeEngine()
    body = {"model": MODEL, "prompt": ["SLOW", "SLOW too"], "max_tokens": 50}
    asyncio.run(_hang_up(engine, "/v1/completions", body, after_first_body=False, num_aborts=2))
    assert len(engine.requests) == 2
    assert set(engine.requests) <= set(engine.aborted)
    assert not engine.running


def test_sse_events_end_in_a_blank_line_of_bare_newlines(client) -> None:
    """OpenAI's framing on the wire: `data: <json>\\n\\n` per event, no \\r anywhere, `data: [DONE]\\n\\n` last."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "stream": True}
    for path, body in (
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 3, "stream": True}),
        ("/v1/chat/completions", chat),
        ("/v1/completions", {"model": MODEL, "prompt": "FAIL_MID", "max_tokens": 3, "stream": True}),
    ):
        raw = client.post(path, json=body).content
        assert b"\r" not in raw
        events = raw.split(b"\n\n")
        assert events[-1] == b"" and len(events) >= 3, raw
        assert all(event.startswith(b"data: ") and b"\n" not in event for event in events[:-1]), raw
        if "FAIL_MID" not in str(body):
            assert events[-2] == b"data: [DONE]"
        else:
            assert b'"error"' in events[-2]
