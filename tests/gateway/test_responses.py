"""POST /v1/responses and its stored-response routes against the FakeEngine: items -> chat prompt, output items,
the stream's event sequence, tool calls, previous_response_id, ownership, background and cancel, 400s naming fields."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import MODEL, ClientFactory
from fake_engine import FakeEngine
from sse import sse_named
from starlette.testclient import TestClient

from engine import ChatPrompt
from tests.conditions import wait_until

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather now", "parameters": CITY}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)  # room for the tools' system prompt


def create(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 3, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(client: TestClient, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event line, data) pairs of a streamed response."""
    response = client.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 3, "stream": True, **body})
    assert response.status_code == 200, response.text
    return sse_named(response.text)


def prompt_messages(engine: FakeEngine) -> list[dict[str, Any]]:
    """The chat messages of the engine's last request."""
    prompt, _ = list(engine.requests.values())[-1]
    return prompt.messages if isinstance(prompt, ChatPrompt) else prompt  # type: ignore[return-value]


def test_text_reply_has_a_message_item_usage_and_incomplete_when_cut(client: TestClient) -> None:
    reply = create(client, input="hello there", instructions="Be brief.")
    assert reply["object"] == "response" and reply["id"].startswith("resp_")
    assert reply["status"] == "incomplete" and reply["incomplete_details"] == {"reason": "max_output_tokens"}
    [message] = reply["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "incomplete"
    assert message["content"] == [{"type": "output_text", "text": " t0 t1 t2", "annotations": [], "logprobs": []}]
    usage = reply["usage"]
    assert usage["output_tokens"] == 3 and usage["total_tokens"] == usage["input_tokens"] + 3
    assert usage["input_tokens_details"] == {"cached_tokens": 1} and usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert reply["instructions"] == "Be brief." and reply["metadata"] == {} and reply["store"] is True


def test_items_become_the_chat_messages(client: TestClient, engine: FakeEngine) -> None:
    items = [
        {"role": "developer", "content": "dev rules"},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    create(client, input=items, instructions="sys", tools=[WEATHER])
    messages = prompt_messages(engine)
    assert [m["role"] for m in messages] == ["system", "system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("sys") and "get_weather" in messages[0]["content"]  # the tools' system prompt
    assert messages[2]["content"] == "ab"
    assert messages[3]["content"].startswith("calling") and "<tool_call>" in messages[3]["content"]
    assert messages[4]["content"] == "<tool_response>\nsunny\n</tool_response>"


def test_stream_event_sequence_matches_the_plain_reply(client: TestClient) -> None:
    events = stream_events(client, input="hello")
    types = [name for name, _ in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    deltas = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    assert deltas == final["output"][0]["content"][0]["text"] == create(client, input="hello")["output"][0]["content"][0]["text"]
    assert final["usage"]["output_tokens"] == 3


def test_tool_call_is_a_function_call_item_never_text(client: TestClient, engine: FakeEngine) -> None:
    engine.script = ["Let me check. ", CALL_TEXT[:20], CALL_TEXT[20:]]
    reply = create(client, input="weather in Paris?", tools=[WEATHER], max_output_tokens=None)
    message, call = reply["output"]
    assert message["content"][0]["text"] == "Let me check."
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["call_id"].startswith("call_")
    assert reply["status"] == "completed"
    events = stream_events(client, input="weather in Paris?", tools=[WEATHER], max_output_tokens=None)
    text = "".join(data.get("delta", "") for name, data in events if name == "response.output_text.delta")
    assert text == "Let me check." and "<tool_call>" not in text
    done = [data for name, data in events if name == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0]["arguments"]) == {"city": "Paris"}
    assert events[-1][0] == "response.completed"


def test_namespace_functions_are_offered_and_calls_name_their_namespace(client: TestClient, engine: FakeEngine) -> None:
    engine.script = [CALL_TEXT]
    namespace = {"type": "namespace", "name": "weather_v1", "description": "Weather tools", "tools": [WEATHER]}
    reply = create(client, input="weather?", tools=[namespace, {"type": "web_search"}], max_output_tokens=None)
    [call] = reply["output"]
    assert call["name"] == "get_weather" and call["namespace"] == "weather_v1"
    assert "get_weather" in prompt_messages(engine)[0]["content"]


def test_hosted_tools_are_left_out_or_a_400_by_setting(make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    reply = create(make_client(), input="hi", tools=[{"type": "web_search", "external_web_access": False}])
    assert reply["status"] == "incomplete" and "web_search" in caplog.text
    strict = make_client(responses_hosted_tools="reject")
    response = strict.post("/v1/responses", json={"model": MODEL, "input": "hi", "tools": [{"type": "file_search"}]})
    assert response.status_code == 400 and "'file_search'" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "tools"


def test_previous_response_id_rebuilds_the_conversation_with_calls(client: TestClient, engine: FakeEngine) -> None:
    engine.script = [CALL_TEXT]
    first = create(client, input="weather in Paris?", tools=[WEATHER], max_output_tokens=None)
    call_id = first["output"][0]["call_id"]
    engine.script = None
    output = {"type": "function_call_output", "call_id": call_id, "output": "sunny"}
    second = create(client, input=[output], previous_response_id=first["id"], tools=[WEATHER])
    assert second["previous_response_id"] == first["id"]
    messages = prompt_messages(engine)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "Paris" in messages[2]["content"] and "sunny" in messages[3]["content"]
    listed = client.get(f"/v1/responses/{second['id']}/input_items").json()
    assert [item["type"] for item in listed["data"]] == ["function_call_output"] and listed["has_more"] is False


def test_mismatched_call_id_and_bad_previous_id_name_what_is_wrong(client: TestClient) -> None:
    output = {"type": "function_call_output", "call_id": "call_nobody", "output": "x"}
    response = client.post("/v1/responses", json={"model": MODEL, "input": [output]})
    assert response.status_code == 400 and "call_nobody" in response.json()["error"]["message"]
    response = client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_missing"})
    assert response.status_code == 404 and "resp_missing" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "previous_response_id"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("truncation", "auto"),
        ("max_tool_calls", 3),
        ("top_logprobs", 2),
        ("prompt", {"id": "pmpt_1"}),
        ("conversation", "conv_1"),
        ("include", ["message.output_text.logprobs"]),
        ("background", True),  # with store false
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(client: TestClient, field: str, value: Any) -> None:
    body = {"model": MODEL, "input": "hi", field: value, **({"store": False} if field == "background" else {})}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_unknown_item_and_tool_types_are_400s(client: TestClient) -> None:
    for body in ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, {"input": "hi", "tools": [{"type": "teleport"}]}):
        response = client.post("/v1/responses", json={"model": MODEL, **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_chat_path_errors_name_the_responses_fields(make_client: ClientFactory) -> None:
    client = make_client(max_tokens_limit=100)
    body = {"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "text"
    for body, param in (({"max_output_tokens": 101}, "max_output_tokens"), ({"input": "TOO_LONG"}, "input")):
        response = client.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_get_delete_and_store_false(client: TestClient) -> None:
    reply = create(client, input="hi", metadata={"k": "v"})
    assert client.get(f"/v1/responses/{reply['id']}").json() == reply
    assert client.delete(f"/v1/responses/{reply['id']}").json() == {"id": reply["id"], "object": "response", "deleted": True}
    assert client.get(f"/v1/responses/{reply['id']}").status_code == 404
    unstored = create(client, input="hi", store=False)
    assert client.get(f"/v1/responses/{unstored['id']}").status_code == 404


def test_input_items_are_paginated(client: TestClient) -> None:
    items = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    reply = create(client, input=items)
    page = client.get(f"/v1/responses/{reply['id']}/input_items", params={"limit": 2, "order": "asc"}).json()
    assert [item["content"][0]["text"] for item in page["data"]] == ["m0", "m1"] and page["has_more"] is True
    after = client.get(f"/v1/responses/{reply['id']}/input_items", params={"limit": 10, "order": "asc", "after": page["last_id"]})
    assert [item["content"][0]["text"] for item in after.json()["data"]] == ["m2", "m3", "m4"]
    assert after.json()["has_more"] is False
    assert client.get(f"/v1/responses/{reply['id']}/input_items", params={"limit": 0}).status_code == 400


def test_another_key_gets_404(make_client: ClientFactory) -> None:
    client = make_client(api_keys="key-a,key-b")
    reply = client.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers={"Authorization": "Bearer key-a"})
    assert reply.status_code == 200
    rid = reply.json()["id"]
    other = {"Authorization": "Bearer key-b"}
    assert client.get(f"/v1/responses/{rid}", headers=other).status_code == 404
    assert client.delete(f"/v1/responses/{rid}", headers=other).status_code == 404
    body = {"model": MODEL, "input": "x", "previous_response_id": rid}
    assert client.post("/v1/responses", json=body, headers=other).status_code == 404
    assert client.get(f"/v1/responses/{rid}", headers={"Authorization": "Bearer key-a"}).status_code == 200


def test_background_is_polled_and_cancelled(make_client: ClientFactory, engine: FakeEngine) -> None:
    client = make_client()
    queued = create(client, input="SLOW hi", background=True, max_output_tokens=2)
    assert queued["status"] == "queued" and queued["background"] is True

    def status_of(rid: str) -> str:
        return str(client.get(f"/v1/responses/{rid}").json()["status"])

    wait_until(lambda: status_of(queued["id"]) == "incomplete", "the background response to finish", 30)
    engine.step_s = 0.05
    running = create(client, input="long one", background=True, max_output_tokens=60)
    wait_until(lambda: status_of(running["id"]) == "in_progress", "the background response to start", 30)
    cancelled = client.post(f"/v1/responses/{running['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert running["id"] in engine.aborted
    plain = create(client, input="hi")
    assert client.post(f"/v1/responses/{plain['id']}/cancel").status_code == 400


def test_engine_failure_mid_stream_ends_with_response_failed(client: TestClient) -> None:
    events = stream_events(client, input="FAIL_MID please")
    assert events[-1][0] == "response.failed"
    assert events[-1][1]["response"]["error"]["code"] == "request_failed"


def test_requests_are_counted_by_endpoint(client: TestClient) -> None:
    create(client, input="hi")
    client.post("/v1/responses", json={"model": MODEL, "input": "hi", "truncation": "auto"})
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    samples = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines() if not line.startswith("#"))
    assert float(samples['sirocco_requests_received_total{endpoint="responses"}']) == 2
    assert float(samples['sirocco_requests_received_total{endpoint="chat_completions"}']) == 1
    assert float(samples['sirocco_requests_received_total{endpoint="completions"}']) == 0


def test_sampling_fields_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    create(client, input="hi", temperature=0.5, top_p=0.9, seed=7, stop=["zz"], top_k=5, min_tokens=1, repetition_penalty=1.1)
    _, params = list(engine.requests.values())[-1]
    assert (params.temperature, params.top_p, params.seed, params.top_k, params.min_tokens) == (0.5, 0.9, 7, 5, 1)
    assert params.repetition_penalty == 1.1 and params.max_tokens == 3 and "zz" in params.stop_strings
