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
