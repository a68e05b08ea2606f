"""End to end: structured outputs and tool calling on a real server with the embedded model, through the openai SDK.

The constraints make even a 135M model's JSON valid: these tests need the engine to honour StructuredOutputs.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL, ServerProcess, start_server
from pydantic import BaseModel

pytestmark = pytest.mark.slow

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "age", "address", "tags"],
    "additionalProperties": False,
}


class City(BaseModel):
    name: str
    country: str
    population: int


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[ServerProcess]:
    yield from start_server(tmp_path_factory, embedded_model_dir)


def assert_still_serving(client: openai.OpenAI) -> None:
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1).choices[0].finish_reason == "length"


def assert_valid_call(call: object) -> dict:
    function = call.function  # type: ignore[attr-defined]
    arguments = json.loads(function.arguments)
    jsonschema.validate(arguments, SCHEMAS[function.name])
    return arguments


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    completion = client.chat.completions.parse(model=MODEL, messages=messages, response_format=City, max_tokens=60, seed=1)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City), completion.choices[0].message.content


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    # Short enough to finish well inside max_tokens: a cut document would prove nothing about the grammar.
    messages = [{"role": "user", "content": "Give the name and age of a cat called Tom, aged 3, as a short JSON object."}]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, response_format={"type": "json_object"}, max_tokens=80, temperature=0.0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content or ""), dict)


@pytest.mark.timeout(600)  # 20 constrained requests: minutes on a busy 2-core machine
def test_seeded_requests_with_a_nested_schema_all_validate(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Invent a person with an address and a few tags."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(seed: int) -> tuple[str | None, str | None]:
        response = client.chat.completions.create(
            model=MODEL, messages=messages, response_format=response_format, max_tokens=100, seed=seed, temperature=1.0
        )
        return response.choices[0].finish_reason, response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=20) as pool:  # at once, so the engine batches them
        results = list(pool.map(ask, range(20)))
    for seed, (finish_reason, content) in enumerate(results):
        assert finish_reason == "stop", f"seed {seed}: {content!r}"
        jsonschema.validate(json.loads(content or ""), PERSON)


def test_structured_outputs_extra_on_both_endpoints(client: openai.OpenAI) -> None:
    extra = {"structured_outputs": {"choice": ["yes", "no"]}}
    chat = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=extra)
    assert chat.choices[0].message.content in ("yes", "no")
    regex = {"structured_outputs": {"regex": "[0-9]{3}"}}
    completion = client.completions.create(model=MODEL, prompt="Three digits:", max_tokens=5, extra_body=regex)
    assert len(completion.choices[0].text) == 3 and completion.choices[0].text.isdigit()


def test_required_and_named_calls_validate(client: openai.OpenAI) -> None:
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        response = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice=tool_choice,  # type: ignore[arg-type]
            parallel_tool_calls=False,  # else a small model goes on calling until max_tokens
            max_tokens=64,
            seed=3,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_")
            assert_valid_call(call)
        if isinstance(tool_choice, dict):
            assert [call.function.name for call in choice.message.tool_calls] == ["get_time"]  # type: ignore[union-attr]


def test_parallel_tool_calls_false_makes_one_call(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=64, seed=4
    )
    assert len(response.choices[0].message.tool_calls or []) == 1


@pytest.mark.timeout(600)
def test_streamed_tool_calls_equal_non_streamed(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 64, "seed": 5}
    kwargs["parallel_tool_calls"] = False
    whole = client.chat.completions.create(**kwargs).choices[0]  # type: ignore[call-overload]
    calls: dict[int, list[str]] = {}
    finish_reasons = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
        for choice in chunk.choices:
            finish_reasons.append(choice.finish_reason)
            for part in choice.delta.tool_calls or []:
                if part.id is not None:
                    calls[part.index] = [part.function.name, ""]
                calls[part.index][1] += part.function.arguments or ""
    assert [(call.function.name, call.function.arguments) for call in whole.message.tool_calls or []] == [
        (name, arguments) for name, arguments in calls.values()
    ]
    assert finish_reasons[-1] == whole.finish_reason == "tool_calls" and not any(finish_reasons[:-1])


def test_tool_round_trip(client: openai.OpenAI, server: ServerProcess) -> None:
    messages: list = list(ASK)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=64
    )
    message = first.choices[0].message
    assert message.tool_calls and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    arguments = assert_valid_call(call)
    messages.append(message.model_dump(exclude_none=True))
    result = json.dumps({"temperature": 18, "unit": "C"} if call.function.name == "get_weather" else {"time": "12:00"})  # type: ignore[union-attr]
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=30)
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content and choice.message.tool_calls is None
    # The call and its result reached the model: lengthening either lengthens the prompt by at least the added tokens
    # (less one at each seam, where tokens may merge).
    padding = " and a light breeze from the west" * 4
    num_padding_tokens = len(httpx.post(f"{server.base_url}/tokenize", json={"prompt": padding}, timeout=60).json()["tokens"])
    function = {"name": call.function.name, "arguments": json.dumps({**arguments, "note": padding})}  # type: ignore[union-attr]
    longer_call = {**messages[1], "tool_calls": [{**messages[1]["tool_calls"][0], "function": function}]}
    longer_result = {**messages[2], "content": result[:-1] + f', "note": "{padding}"}}'}
    assert final.usage is not None
    for history in ([ASK[0], longer_call, messages[2]], [ASK[0], messages[1], longer_result]):
        grown = _num_prompt_tokens(client, history) - final.usage.prompt_tokens
        assert grown >= num_padding_tokens - 2, (grown, num_padding_tokens, history)


def _num_prompt_tokens(client: openai.OpenAI, messages: list) -> int:
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert response.usage is not None
    return response.usage.prompt_tokens


def test_auto_answers_with_text_or_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=64, seed=seed)
        choice = response.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls", choice.message
            for call in choice.message.tool_calls:
                assert_valid_call(call)
        else:  # an answer in words, which a tool-call parser must not have swallowed
            assert choice.finish_reason in ("stop", "length") and choice.message.content, choice.message


def test_bad_schema_is_a_400_naming_response_format(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=bad, max_tokens=5)  # type: ignore[arg-type]
    assert caught.value.body["param"] == "response_format"  # type: ignore[index]
    assert_still_serving(client)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=5, response_format={"type": "json_object"}
        )
    assert caught.value.body["param"] == "response_format"  # type: ignore[index]
    assert_still_serving(client)


def test_a_forced_call_fits_in_32_tokens(client: openai.OpenAI) -> None:
    """Issue 18 item 3: compact arguments, and a forced single call ends at its JSON (no end tag, no second call).

    The issue's request: one weather tool taking a city, max_tokens=32 (before: 32 tokens of pretty-printed JSON and
    wrapper tags, finish_reason length, no tool_calls; bench/tool_calls.py measures both).
    """
    city_only = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    weather = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "parameters": city_only}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice, parallel in (("required", False), (named, True)):
        response = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[weather],  # type: ignore[list-item]
            tool_choice=tool_choice,  # type: ignore[arg-type]
            parallel_tool_calls=parallel,
            max_tokens=32,
            temperature=0,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None and choice.message.tool_calls is not None
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), city_only)  # type: ignore[union-attr]
        assert response.usage is not None and response.usage.completion_tokens < 32
