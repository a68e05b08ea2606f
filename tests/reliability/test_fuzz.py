"""Fuzz one real server: schemathesis against its own /openapi.json, then hand-written hostile requests.

Every answer is below 500, every 4xx is OpenAI's error envelope, and afterwards the engine is alive and idle.
max_tokens_limit=4 keeps every generation short, so hundreds of requests take seconds.
"""

from __future__ import annotations

import asyncio
import copy
import json
import pathlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import (
    IDLE_GAUGES,
    MODEL,
    Server,
    assert_clean_log,
    assert_error_body,
    assert_error_envelope,
    sse_data,
    start_server,
)
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance

from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.response_store import StoredResponse, open_store
from gateway.responses_protocol import ResponsesRequest
from gateway.settings import Settings

pytestmark = pytest.mark.slow
MAX_TOKENS_LIMIT = 4
MAX_BODY_BYTES = 1 << 20
EXAMPLES_PER_MODE = 40  # per POST operation with a body and generation mode: 240 generated requests in all
# Request fields that only accept their "unused" value: left out of generated valid bodies (their 400 is tested below).
UNSUPPORTED = (*CompletionRequest.unsupported, *ChatCompletionRequest.unsupported, "best_of")
RESPONSES_UNSUPPORTED = (*ResponsesRequest.unsupported, "include", "background")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[Server]:
    yield from start_server(
        tmp_path_factory,
        embedded_model_dir,
        SIROCCO_MAX_TOKENS_LIMIT=str(MAX_TOKENS_LIMIT),
        SIROCCO_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
    )


def check_answer(response: httpx.Response) -> None:
    """Below 500; a 4xx is the error envelope; a 200 parses (JSON, or an SSE stream ending in [DONE])."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert_error_envelope(response)
    elif response.headers.get("content-type", "").startswith("text/event-stream") and "/v1/responses" in str(response.url):
        events = [json.loads(item) for item in sse_data(response.text.splitlines())]
        assert events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1]
        assert [event["sequence_number"] for event in events] == list(range(len(events)))
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        data = sse_data(response.text.splitlines())
        assert data[-1] == "[DONE]", data[-2:]
        for item in data[:-1]:
            assert "error" not in json.loads(item), item
    elif response.request.url.path.startswith("/v1/"):
        response.json()


# --- schemathesis ----------------------------------------------------------------------------------------------


def _fuzzable_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The server's spec, narrowed so that valid bodies reach the engine: our model name, small n, logprobs and
    max_tokens, no fields that exist only to be refused, and chat messages with text content and nothing else."""
    spec = copy.deepcopy(spec)
    schemas = spec["components"]["schemas"]
    small = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT}, {"type": "null"}]}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"enum": [MODEL]}
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 4}
        props["min_tokens"] = {"type": "integer", "minimum": 0, "maximum": 1}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = small
        for field in ("logprobs", "top_logprobs"):
            if (field in props and field != "logprobs") or (name == "CompletionRequest" and field == "logprobs"):
                props[field] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "null"}]}
        for field in UNSUPPORTED:
            props.pop(field, None)
    props = schemas["ResponsesRequest"]["properties"]
    props["model"] = {"enum": [MODEL]}
    props["max_output_tokens"] = small
    props["min_tokens"] = {"type": "integer", "minimum": 0, "maximum": 1}
    for field in RESPONSES_UNSUPPORTED:
        props.pop(field, None)
    message = schemas["ChatMessage"]
    message["properties"] = {"role": message["properties"]["role"], "content": message["properties"]["content"]}
    message["required"] = ["role", "content"]
    return spec


def _fuzz_operation(
    base_url: str, operation: schemathesis.APIOperation, mode: GenerationMode, statuses: Counter[tuple[str, str, int]]
) -> None:
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        database=None,
        derandomize=True,  # the same cases on every CI run: a red CI always means a real regression
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, timeout=60)
        statuses[(operation.label, mode.value, response.status_code)] += 1
        case.validate_response(response, checks=checks)
        if 400 <= response.status_code < 500:
            assert_error_body(json.loads(response.content))

    fuzz()


def test_schemathesis_against_own_openapi(server: Server) -> None:
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(_fuzzable_spec(spec))
    statuses: Counter[tuple[str, str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "POST" and "requestBody" in operation.definition.raw:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz_operation(server.base_url, operation, mode, statuses)
    for path in ("/v1/models", "/health", "/metrics", "/openapi.json"):
        assert httpx.get(f"{server.base_url}{path}").status_code == 200
    assert sum(statuses.values()) >= 6 * EXAMPLES_PER_MODE * 0.9, statuses
    assert any(status == 200 for (_, _, status) in statuses), statuses  # valid bodies did reach the engine
    assert all(status < 500 for (_, _, status) in statuses), statuses


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": ["Hello", "Bonjour"], "n": 2, "logprobs": 2, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "n": 2, "logprobs": True}),
    ],
)
def test_streams_conform_to_the_openapi_event_schema(server: Server, path: str, body: dict[str, Any]) -> None:
    """Every event of a real stream, [DONE] included, passes schemathesis' SSE check against /openapi.json."""
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.base_url}/openapi.json").json())
    operation = schema[path]["POST"]
    case = operation.Case(body={"model": MODEL, "max_tokens": 4, "stream": True, **body}, media_type="application/json")
    response = case.call(base_url=server.base_url, timeout=60)
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]"), response.text[-200:]
    assert response.text.count("data: {") >= 4  # both choices' chunks, as JSON
    case.validate_response(response, checks=[response_schema_conformance])


def test_responses_stream_conforms_to_the_openapi_event_schema(server: Server) -> None:
    """Every event of a real /v1/responses stream (its `event:` line and JSON data) passes schemathesis' SSE check."""
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.base_url}/openapi.json").json())
    body = {"model": MODEL, "input": "Hello", "max_output_tokens": 4, "stream": True}
    case = schema["/v1/responses"]["POST"].Case(body=body, media_type="application/json")
    response = case.call(base_url=server.base_url, timeout=60)
    assert response.status_code == 200 and "event: response.output_text.delta" in response.text, response.text[-300:]
    case.validate_response(response, checks=[response_schema_conformance])


# --- hand-written hostile requests -----------------------------------------------------------------------------


def _valid(path: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 2}
    base.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hello"}]})
    base.update(fields)
    return base


def _raw(path: str, template: dict[str, Any], field: str, literal: str) -> bytes:
    """`template` as JSON with `field` set to a raw JSON literal (NaN, Infinity, 1e999, ...)."""
    body = json.dumps({**template, field: "__PLACEHOLDER__"})
    return body.replace('"__PLACEHOLDER__"', literal).encode()


WRONG_VALUES: list[Any] = [True, 0, -1, 1.5, "x", "", [], {}, [1], {"a": 1}, [[[]]], None]
NUMBER_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e308", "-1e308", "5e-324", "-0", "1" + "0" * 400]
BIG_INTS = [-1, -(10**30), 2**31, 2**63 - 1, 2**63, 2**64 + 1, 10**30]
INT_FIELDS = ["max_tokens", "n", "seed", "top_k", "min_tokens", "logprobs"]
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]


def _hostile_bodies() -> list[tuple[str, str, bytes]]:
    """(name, path, raw body) for every hand-written case."""
    cases: list[tuple[str, str, bytes]] = []

    def add(name: str, path: str, body: dict[str, Any] | bytes) -> None:
        cases.append((name, path, body if isinstance(body, bytes) else json.dumps(body).encode()))

    for path in ("/v1/completions", "/v1/chat/completions"):
        template = _valid(path)
        fields = ["model", "prompt" if path == "/v1/completions" else "messages", *INT_FIELDS, *FLOAT_FIELDS]
        fields += ["stop", "stop_token_ids", "logit_bias", "stream", "stream_options", "user", "ignore_eos", "echo"]
        for field in fields:  # wrong types everywhere
            for value in WRONG_VALUES:
                add(f"wrong type {field}={value!r}", path, {**template, field: value})
        for field in INT_FIELDS + FLOAT_FIELDS:  # negative and enormous numbers, NaN and Infinity
            for number in BIG_INTS:
                add(f"{field}={number}", path, {**template, field: number})
            for literal in NUMBER_LITERALS:
                add(f"{field}={literal}", path, _raw(path, template, field, literal))
        add("logit_bias NaN", path, _raw(path, template, "logit_bias", '{"42": NaN}'))
        add("logit_bias Infinity", path, _raw(path, template, "logit_bias", '{"42": Infinity}'))
        for key in ("-1", str(2**63), str(10**30), "1.5", "x", " 12 ", ""):
            add(f"logit_bias key {key!r}", path, {**template, "logit_bias": {key: 1}})
        add("logit_bias at limit", path, {**template, "logit_bias": {str(i): 1 for i in range(300)}})
        add("logit_bias past limit", path, {**template, "logit_bias": {str(i): 1 for i in range(301)}})
        add("stop_token_ids out of vocabulary", path, {**template, "stop_token_ids": [49152, 2**63, 10**30]})
        add("n at limit", path, {**template, "n": 16})
        add("n past limit", path, {**template, "n": 17})
        add("n huge", path, {**template, "n": 10**9})
        for count in (16, 17, 300):  # stop lists at and past the limit
            add(f"{count} stop strings", path, {**template, "stop": [f"s{i}" for i in range(count)]})
        add("one 100k-character stop string", path, {**template, "stop": ["x" * 100_000]})
        add("empty stop string", path, {**template, "stop": [""]})
        add("max_tokens past limit", path, {**template, "max_tokens": MAX_TOKENS_LIMIT + 1})
        add("top_k 10**20 (overflowed int64 in the sampler)", path, {**template, "top_k": 10**20, "temperature": 1})
        add("unknown field", path, {**template, "surprise": 1})
        for nested in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
            add(f"deeply nested user ({nested[:2]})", path, _raw(path, template, "user", nested))
    _add_grammar_cases(add)
    _add_responses_cases(add)
    completions = _valid("/v1/completions")
    for prompt in ([49152], [2**31], [2**63], [10**30], [-1], [[1, 2], [49152]], [[]], [], [0] * 2000, "", [""]):
        add(f"prompt {str(prompt)[:30]}", "/v1/completions", {**completions, "prompt": prompt})
    add("prompt longer than the context", "/v1/completions", {**completions, "prompt": "hello " * 3000})
    add("prompt of special tokens, echoed", "/v1/completions", {**completions, "prompt": [0, 1, 2, 0], "echo": True})
    add("logprobs at limit, n at limit, streamed", "/v1/completions", {**completions, "n": 16, "logprobs": 20, "stream": True})
    add("logprobs past limit", "/v1/completions", {**completions, "logprobs": 21})
    add("echo with logprobs", "/v1/completions", {**completions, "echo": True, "logprobs": 1})
    chat = _valid("/v1/chat/completions")
    add("top_logprobs at limit", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 20})
    add("top_logprobs past limit", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21})
    add("top_logprobs without logprobs", "/v1/chat/completions", {**chat, "top_logprobs": 2})
    for messages in (
        [],
        [{}],
        [{"role": "tool", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": "x", "name": "n"}],
        [{"role": "system", "content": "{{ raise }}"}],
        [{"role": "user", "content": "\u0000\ud7ff\ufffe"}],
        [{"role": "user", "content": "x" * 50_000}],
    ):
        add(f"messages {str(messages)[:40]}", "/v1/chat/completions", {**chat, "messages": messages})
    for path in ("/v1/completions", "/v1/chat/completions"):
        prefix = f'{{"model": "{MODEL}", "max_tokens": 2, "prompt": "'.encode()
        add("invalid UTF-8", path, prefix + b"\xff\xfe\xc3(" + b'"}')
        add("lone surrogate escape", path, prefix + b"\\ud800" + b'"}')
        add("UTF-8 BOM", path, b"\xef\xbb\xbf" + json.dumps(_valid(path)).encode())
        add("NUL bytes", path, b"\x00" * 64)
        for body in (b"", b"null", b"[]", b'"x"', b"1", b"{", b"{}", b'{"model": }', b"{'model': 'x'}"):
            add(f"body {body[:10]!r}", path, body)
        add("duplicate keys", path, b'{"model": "x", "model": "' + MODEL.encode() + b'", "prompt": "a", "max_tokens": 2}')
    return cases


@pytest.mark.timeout(1200)  # ~700 requests: 470 s were seen with the 2 cores shared by another full run
def _nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _add_grammar_cases(add: Callable[[str, str, dict[str, Any] | bytes], None]) -> None:
    """Structured outputs and tools: hostile schemas and grammars are a 400 naming the field, or served; never a 5xx."""
    chat, completions = _valid("/v1/chat/completions"), _valid("/v1/completions")
    recursive = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}
    huge = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    schemas = {
        "recursive": recursive,
        "deeply nested": _nested_schema(200),
        "huge": huge,
        "unsupported keywords": {"type": "object", "patternProperties": {"^x": {"type": "string"}}, "if": {}, "not": {}},
        "contradictory": {"type": "integer", "minimum": 10, "maximum": 1},
        "unknown type": {"type": "banana"},
        "not an object": [1, 2],
        "bad $ref": {"$ref": "#/nowhere"},
        "bad pattern": {"type": "string", "pattern": "(unclosed"},
    }
    for name, schema in schemas.items():
        response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        add(f"response_format {name}", "/v1/chat/completions", {**chat, "response_format": response_format})
        add(f"structured_outputs json {name}", "/v1/completions", {**completions, "structured_outputs": {"json": schema}})
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        add(f"tool parameters {name}", "/v1/chat/completions", {**chat, "tools": [tool], "tool_choice": "required"})
    for extra in (
        {"regex": "(unclosed"},
        {"regex": "a{1000000}"},
        {"grammar": "root ::= undefined_rule"},
        {"grammar": "x" * 70_000},
        {"choice": []},
        {"choice": [1, 2]},
        {"json": "{not json"},
        {"regex": "a", "choice": ["a"]},
        {"structural_tag": "{}"},
        {},
    ):
        add(f"structured_outputs {str(extra)[:40]}", "/v1/chat/completions", {**chat, "structured_outputs": extra})
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    broken_call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
    for name, fields in {
        "response_format of an unknown type": {"response_format": {"type": "xml"}},
        "json_schema without a schema": {"response_format": {"type": "json_schema"}},
        "tool_choice naming an unknown function": {
            "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        "tool_choice required without tools": {"tool_choice": "required"},
        "tool without a name": {"tools": [{"type": "function", "function": {"parameters": {}}}]},
        "10,000 tools": {"tools": [tool] * 10_000},
        "tool message without tool_call_id": {"messages": [{"role": "tool", "content": "x"}]},
        "assistant tool_calls with broken arguments": {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [broken_call],
                },
            ]
        },
    }.items():
        add(name, "/v1/chat/completions", {**chat, **fields})


def _add_responses_cases(add: Callable[[str, str, dict[str, Any] | bytes], None]) -> None:
    """/v1/responses: huge and deep inputs, unknown item and tool types, calls that answer nothing, huge metadata."""
    base = {"model": MODEL, "max_output_tokens": 2}
    message = {"role": "user", "content": "Hello"}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    cases: dict[str, Any] = {
        "10,000 input items": {"input": [message] * 10_000},
        "4,096 input items": {"input": [message] * 4096},
        "unknown item type": {"input": [{"type": "computer_call", "id": "x"}]},
        "item without a type or role": {"input": [{"content": "x"}]},
        "message with an image part": {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "unknown tool type": {"input": "hi", "tools": [{"type": "teleport"}]},
        "hosted tools only": {"input": "hi", "tools": [{"type": "web_search"}, {"type": "file_search"}], "tool_choice": "auto"},
        "namespace with a hosted tool inside": {
            "input": "hi",
            "tools": [{"type": "namespace", "name": "n", "tools": [{"type": "mcp"}]}],
        },
        "the same function twice": {"input": "hi", "tools": [tool, {"type": "namespace", "name": "n", "tools": [tool]}]},
        "10,000 tools": {"input": "hi", "tools": [tool] * 10_000},
        "mismatched call_id": {"input": [message, call, {"type": "function_call_output", "call_id": "c2", "output": "x"}]},
        "output before its call": {"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}, call]},
        "call with broken arguments": {"input": [message, {**call, "arguments": "{"}]},
        "item_reference to nothing": {"input": [{"type": "item_reference", "id": "msg_nowhere"}]},
        "only reasoning": {"input": [{"type": "reasoning", "summary": []}]},
        "empty input": {"input": []},
        "huge metadata": {"input": "hi", "metadata": {f"k{i}": "v" * 512 for i in range(10_000)}},
        "metadata past 16 keys": {"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}},
        "metadata value too long": {"input": "hi", "metadata": {"k": "v" * 513}},
        "previous_response_id of 100k characters": {"input": "hi", "previous_response_id": "r" * 100_000},
        "text.format json_schema nested 200 deep": {
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": _nested_schema(200)}},
        },
        "tool_choice naming a missing function": {
            "input": "hi",
            "tools": [tool],
            "tool_choice": {"type": "function", "name": "g"},
        },
        "background without store": {"input": "hi", "background": True, "store": False},
        "streamed background": {"input": "hi", "background": True, "stream": True},
        "streamed tool call round": {
            "input": [message, call, {"type": "function_call_output", "call_id": "c1", "output": "x"}],
            "stream": True,
        },
    }
    for name, fields in cases.items():
        add(f"responses: {name}", "/v1/responses", {**base, **fields})
    for nested in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        add(f"responses: deeply nested input ({nested[:2]})", "/v1/responses", _raw("/v1/responses", base, "input", nested))
    deep_content = '[{"type": "input_text", "text": ' * 1000 + '"x"' + "}]" * 1000  # as text: json.dumps would recurse
    deep = json.dumps({**base, "input": [{"role": "user", "content": "__DEEP__"}]}).replace('"__DEEP__"', deep_content)
    add("responses: content parts nested 1000 deep", "/v1/responses", deep.encode())


def test_hostile_requests_get_4xx_envelopes_never_5xx(server: Server) -> None:
    cases = _hostile_bodies()
    statuses: Counter[int] = Counter()

    async def send_all() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            semaphore = asyncio.Semaphore(8)

            async def send(name: str, path: str, body: bytes) -> None:
                async with semaphore:
                    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
                statuses[response.status_code] += 1
                try:
                    check_answer(response)
                except AssertionError as exc:
                    raise AssertionError(f"case {name!r} on {path}: {exc}") from exc

            await asyncio.gather(*(send(*case) for case in cases))

    asyncio.run(send_all())
    assert len(cases) > 500 and statuses[200] > 0 and statuses[400] > 0, statuses
    assert all(status < 500 for status in statuses), statuses
    _assert_alive_and_idle(server)


def test_huge_bodies_are_413(server: Server) -> None:
    big = json.dumps(_valid("/v1/completions", prompt="x" * (MAX_BODY_BYTES + 1))).encode()
    declared = httpx.post(f"{server.base_url}/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and assert_error_envelope(declared)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming in
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    streamed = httpx.post(
        f"{server.base_url}/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413 and assert_error_envelope(streamed)["code"] == "request_too_large"
    _assert_alive_and_idle(server)


def test_other_methods_routes_and_content_types(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        answers = [
            client.get("/v1/completions"),
            client.put("/v1/chat/completions", json=_valid("/v1/chat/completions")),
            client.delete("/v1/models"),
            client.post("/v1/nope", json={}),
            client.get("/../../etc/passwd"),
            client.post("/v1/completions", content=b"model=x", headers={"Content-Type": "application/x-www-form-urlencoded"}),
            client.post(
                "/v1/completions", content=json.dumps(_valid("/v1/completions")).encode(), headers={"Content-Type": "text/plain"}
            ),
        ]
    for response in answers:
        assert 400 <= response.status_code < 500 or response.status_code == 200, response.status_code
        if response.status_code >= 400:
            assert_error_envelope(response)
    _assert_alive_and_idle(server)


def _assert_alive_and_idle(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    metrics = server.wait_idle()
    assert all(metrics[name] == 0 for name in IDLE_GAUGES), metrics
    assert_clean_log(server)


def test_hostile_stored_conversations_get_4xx_never_5xx_nor_another_owners_response(server: Server) -> None:
    """A previous_response_id chain 1,000 turns deep, a cycle, and another owner's response, written straight into the
    server's SQLite store: a 400 (the conversation is longer than the context) or 404, never a 5xx or a leak."""
    store_path = server.log_path.parent / "responses.sqlite3"

    def record(response_id: str, previous: str | None, owner: str = "") -> StoredResponse:
        item = {"type": "message", "id": f"msg_{response_id}", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
        output = {"type": "message", "id": f"out_{response_id}", "status": "completed", "role": "assistant", "content": []}
        response = {"id": response_id, "object": "response", "status": "completed", "background": False, "output": [output]}
        return StoredResponse(response_id, owner, response, [item], previous, time.time())

    async def fill() -> None:
        store = open_store(Settings(responses_store_path=str(store_path)))
        try:
            for depth in range(1000):
                await store.put(record(f"resp_chain{depth}", f"resp_chain{depth - 1}" if depth else None))
            await store.put(record("resp_cycle_a", "resp_cycle_b"))
            await store.put(record("resp_cycle_b", "resp_cycle_a"))
            await store.put(record("resp_secret", None, owner="f" * 64))
        finally:
            await store.close()

    asyncio.run(fill())
    answers = {}
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for previous in ("resp_chain999", "resp_chain3", "resp_cycle_a", "resp_secret"):
            body = {"model": MODEL, "input": "again", "max_output_tokens": 2, "previous_response_id": previous}
            answers[previous] = client.post("/v1/responses", json=body)
        secret = [client.get("/v1/responses/resp_secret"), client.get("/v1/responses/resp_secret/input_items")]
    for response in answers.values():
        check_answer(response)
    assert answers["resp_chain999"].status_code == 400 and assert_error_envelope(answers["resp_chain999"])["param"] == "input"
    assert answers["resp_chain3"].status_code == 200 and answers["resp_cycle_a"].status_code == 200
    assert answers["resp_secret"].status_code == 404 and "resp_secret" in answers["resp_secret"].text
    assert all(response.status_code == 404 for response in secret) and "hi" not in "".join(r.text for r in secret)
    _assert_alive_and_idle(server)
