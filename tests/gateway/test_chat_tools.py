"""Tools, response_format and structured_outputs through POST /v1/chat/completions (and /v1/completions) on the fake
engine: request validation, what reaches the engine (prompt, constraint), response and stream-chunk shapes."""

from __future__ import annotations

import json

import pytest
from conftest import MODEL
from fake_engine import FakeEngine
from sse import sse_json
from starlette.testclient import TestClient

from engine import ChatPrompt, ChatTemplateInfo

USER = [{"role": "user", "content": "weather in Paris?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY}}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SCRIPT = ["I will ", "check.", "\n<tool", "_call>\n", '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}']
SCRIPT.append("\n</tool_call>")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)  # room for the tool system prompt


def post(client: TestClient, path: str = "/v1/chat/completions", **body: object):  # -> httpx.Response
    return client.post(path, json={"model": MODEL, **({"messages": USER} if "chat" in path else {}), **body})


def chat(client: TestClient, **body: object) -> dict:
    response = post(client, **body)
    assert response.status_code == 200, response.text
    return response.json()


def test_tool_call_response_shape(client: TestClient, engine: FakeEngine) -> None:
    engine.script = SCRIPT
    body = chat(client, tools=TOOLS)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "I will check."
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_streamed_tool_calls_assemble_to_the_whole(client: TestClient, engine: FakeEngine) -> None:
    engine.script = SCRIPT
    whole = chat(client, tools=TOOLS)["choices"][0]["message"]
    response = post(client, tools=TOOLS, stream=True)
    chunks = sse_json(response.text)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    content = "".join(delta.get("content", "") for delta in deltas)
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            if "id" in part:  # the first delta of a call: id, type and name, before any arguments
                assert part["index"] not in calls and part["type"] == "function" and part["function"]["arguments"] == ""
                calls[part["index"]] = {"name": part["function"]["name"], "arguments": ""}
            calls[part["index"]]["arguments"] += part["function"].get("arguments", "")
    assert content == whole["content"]
    assert list(calls.values()) == [call["function"] for call in whole["tool_calls"]]
    finish = [chunk["choices"][0].get("finish_reason") for chunk in chunks]
    assert finish[-1] == "tool_calls" and not any(finish[:-1])
    assert all("<tool" not in delta.get("content", "") for delta in deltas)


def test_auto_sends_a_structural_tag_and_a_tool_system_prompt(client: TestClient, engine: FakeEngine) -> None:
    body = chat(client, tools=TOOLS, max_tokens=2)
    prompt, params = engine.requests[body["id"]]
    assert isinstance(prompt, list) and prompt[0]["role"] == "system"  # SmolLM2-like template: tools in a system prompt
    assert '"get_weather"' in prompt[0]["content"] and "<tool_call>" in prompt[0]["content"]
    assert params.structured_outputs is not None
    tag = json.loads(params.structured_outputs.structural_tag or "")
    assert tag["format"]["triggers"] == ["<tool_call>"]
    assert body["choices"][0]["finish_reason"] == "length" and "tool_calls" not in body["choices"][0]["message"]


def test_tool_choice_none_neither_offers_nor_parses(client: TestClient, engine: FakeEngine) -> None:
    engine.script = [CALL_TEXT]
    body = chat(client, tools=TOOLS, tool_choice="none")
    prompt, params = engine.requests[body["id"]]
    assert prompt == [{"role": "user", "content": "weather in Paris?"}] and params.structured_outputs is None
    assert body["choices"][0]["message"]["content"] == CALL_TEXT and body["choices"][0]["finish_reason"] == "stop"


def test_history_with_calls_and_results_renders_as_text_turns(client: TestClient, engine: FakeEngine) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "system", "content": "Be brief.", "name": "ops"},
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    body = chat(client, messages=messages, tools=TOOLS, max_tokens=1)
    prompt, _ = engine.requests[body["id"]]
    assert prompt[0]["role"] == "system" and prompt[0]["content"].startswith("Be brief.\n\n# Tools")
    # the call as the tool-call grammar would have the model write it: compact arguments
    assert prompt[2] == {"role": "assistant", "content": CALL_TEXT.replace('"city": "Paris"', '"city":"Paris"')}
    assert prompt[3] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}


def test_a_template_that_renders_tools_gets_them(client: TestClient, engine: FakeEngine) -> None:
    engine.chat_template_info = ChatTemplateInfo(renders_tools=True, has_tool_calls_token=False)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*USER, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1", "content": "18"}]
    body = chat(client, messages=messages, tools=TOOLS, max_tokens=1)
    prompt, _ = engine.requests[body["id"]]
    assert isinstance(prompt, ChatPrompt) and prompt.tools == TOOLS
    assert prompt.messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert prompt.messages[2] == {"role": "tool", "content": "18", "tool_call_id": "call_1"}


def test_mistral_vocabulary_picks_mistral_calls_and_keeps_special_tokens(client: TestClient, engine: FakeEngine) -> None:
    engine.chat_template_info = ChatTemplateInfo(renders_tools=True, has_tool_calls_token=True)
    engine.script = ['[TOOL_CALLS] [{"name": "get_weather", ', '"arguments": {"city": "Paris"}}]']
    body = chat(client, tools=TOOLS, tool_choice="required")
    _, params = engine.requests[body["id"]]
    assert params.skip_special_tokens is False
    assert json.loads(params.structured_outputs.structural_tag or "")["format"]["elements"][0]["value"] == "[TOOL_CALLS]"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_parser_setting_overrides_the_vocabulary(make_client, engine: FakeEngine) -> None:
    engine.chat_template_info = ChatTemplateInfo(renders_tools=False, has_tool_calls_token=True)
    engine.script = [CALL_TEXT]
    body = chat(make_client(tool_call_parser="hermes"), tools=TOOLS)
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_response_format_reaches_the_engine(client: TestClient, engine: FakeEngine) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    body = chat(client, response_format=rf, max_tokens=1)
    assert json.loads(engine.requests[body["id"]][1].structured_outputs.json) == CITY
    body = chat(client, response_format={"type": "json_object"}, max_tokens=1)
    assert engine.requests[body["id"]][1].structured_outputs.json_object


def test_structured_outputs_extra_on_completions(client: TestClient, engine: FakeEngine) -> None:
    response = post(client, "/v1/completions", prompt="a", max_tokens=1, structured_outputs={"choice": ["yes", "no"]})
    assert response.status_code == 200, response.text
    assert engine.requests[response.json()["id"]][1].structured_outputs.choice == ("yes", "no")


BAD_SCHEMA = {"title": "INVALID_GRAMMAR"}
BAD_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}}, "response_format"),
        ({"structured_outputs": {"regex": "INVALID_GRAMMAR"}}, "structured_outputs"),
        ({"tools": BAD_TOOLS}, "tools"),
        ({"tools": BAD_TOOLS, "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_grammar_errors_name_the_field_it_came_from(client: TestClient, body: dict, param: str) -> None:
    response = post(client, **body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert chat(client, max_tokens=1)["choices"]  # and the server keeps serving


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{"}}]}]},
            "messages",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ],
)
def test_invalid_tool_requests_name_their_param(client: TestClient, body: dict, param: str) -> None:
    response = post(client, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_openapi_shows_the_tool_and_format_fields_by_their_wire_names(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    chat_fields = set(schemas["ChatCompletionRequest"]["properties"])
    assert {"tools", "tool_choice", "parallel_tool_calls", "response_format"} <= chat_fields
    assert "schema" in schemas["JSONSchemaFormat"]["properties"]
    assert "json" in schemas["StructuredOutputsRequest"]["properties"]
    assert "tool_calls" in schemas["ChatMessageOut"]["properties"]


def test_required_single_call_without_end_tag_finishes_with_tool_calls(client: TestClient, engine: FakeEngine) -> None:
    """The forced-call grammar ends at the call's JSON: the output has no end tag and still finishes as tool_calls."""
    engine.script = ["<tool_call>\n", '{"name": "get_weather", ', '"arguments": {"city":"Paris"}}']
    body = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    _, params = engine.requests[body["id"]]
    assert json.loads(params.structured_outputs.structural_tag)["format"]["end"] == "}"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    chunks = sse_json(post(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stream=True).text)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    parts = [part for chunk in chunks if chunk["choices"] for part in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert "".join(part["function"].get("arguments", "") for part in parts) == '{"city": "Paris"}'
