"""Tokens one tool call costs: a fixed weather-tool chat request through the gateway (in process) and the embedded model.

Each case is one greedy /v1/chat/completions request (temperature 0) with one tool, asking for the weather in Paris;
it prints the output's completion tokens, finish reason, the calls' arguments and any content, one JSON line per
case. Run it on two commits to compare them (docs/serving.md).

    python -m bench.tool_calls --out bench/results/tool-calls-cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from bench.common import emit

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# (label, tool_choice, parallel_tool_calls, max_tokens); None: the field left out (parallel calls allowed)
CASES: list[tuple[str, Any, bool | None, int]] = [
    ("required", "required", None, 32),
    ("required", "required", None, 256),
    ("required", "required", False, 32),
    ("named", NAMED, None, 32),
    ("named", NAMED, None, 256),
]


def run(cache_dir: str | None) -> list[dict[str, Any]]:
    from starlette.testclient import TestClient

    from gateway.app import create_app
    from gateway.settings import Settings

    settings = Settings(cache_dir=cache_dir, max_model_len=2048, kv_cache_gib=0.25)
    results = []
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 600.0  # the model loads in the background: /health turns 200 when it is ready
        while client.get("/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not load in 600 s")
            time.sleep(0.1)
        for label, choice, is_parallel, max_tokens in CASES:
            body = {"model": settings.model_name, "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": choice}
            body |= {"max_tokens": max_tokens, "temperature": 0}
            if is_parallel is not None:
                body["parallel_tool_calls"] = is_parallel
            reply = client.post("/v1/chat/completions", json=body).json()
            message = reply["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            results.append(
                {
                    "bench": "tool_calls",
                    "tool_choice": label,
                    "parallel_tool_calls": is_parallel,
                    "max_tokens": max_tokens,
                    "completion_tokens": reply["usage"]["completion_tokens"],
                    "finish_reason": reply["choices"][0]["finish_reason"],
                    "num_tool_calls": len(calls),
                    "arguments": [call["function"]["arguments"] for call in calls],
                    "content": message.get("content"),
                }
            )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.join(".cache", "sirocco"), help="Sirocco's cache (converted model)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    for result in run(args.cache_dir):
        emit(result, args.out)


if __name__ == "__main__":
    main()
