"""Helpers: split an SSE body into its `data:` payloads."""

from __future__ import annotations

import json
from typing import Any


def sse_data(body: str) -> list[str]:
    """The data of each event, in order (comments and blank lines dropped)."""
    events = [block for block in body.replace("\r\n", "\n").split("\n\n") if block.strip()]
    data = []
    for event in events:
        lines = [line[len("data: ") :] for line in event.split("\n") if line.startswith("data: ")]
        if lines:
            data.append("\n".join(lines))
    return data


def sse_json(body: str) -> list[dict[str, Any]]:
    """The JSON chunks before `[DONE]`, asserting the stream ends with exactly one `[DONE]`."""
    data = sse_data(body)
    assert data[-1] == "[DONE]"
    assert data.count("[DONE]") == 1
    return [json.loads(item) for item in data[:-1]]


def sse_named(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event line, JSON data) of each event of a stream that names its events (the Responses API's); no [DONE]."""
    events = [block for block in body.replace("\r\n", "\n").split("\n\n") if block.strip()]
    named = []
    for event in events:
        lines = event.split("\n")
        names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
        data = "\n".join(line[len("data: ") :] for line in lines if line.startswith("data: "))
        assert len(names) == 1, event
        named.append((names[0], json.loads(data)))
    return named
