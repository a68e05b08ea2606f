"""Every error status in OpenAI's envelope, from the one renderer; the server keeps serving after each."""

from __future__ import annotations

import json

import pytest
from conftest import MODEL
from sse import sse_data
from starlette.testclient import TestClient

USER = [{"role": "user", "content": "hi"}]


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_malformed_json_and_non_object(client: TestClient) -> None:
    error = error_of(client.post("/v1/chat/completions", content=b"{nope"), 400)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"
    error_of(client.post("/v1/completions", content=b"[1]"), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "temperature": "1"}, "temperature"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        ({"messages": USER, "surprise": 1}, "surprise"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": USER, "tool_choice": "auto"}, "tool_choice"),
        ({"messages": USER, "functions": [{}]}, "functions"),
        ({"messages": USER, "response_format": {"type": "json_schema"}}, "response_format"),
        ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": USER, "n": 17}, "n"),
        ({"messages": USER, "stop": ["a"] * 17}, "stop"),
        ({"messages": USER, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}], "tools": [{}]}, "tools"),
    ],
)
def test_chat_invalid_or_unsupported_field_names_param(client: TestClient, body: dict, param: str) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"model": MODEL, **body}), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "suffix": "b"}, "suffix"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "TOO_LONG"}, "prompt"),
        ({"prompt": "a b c", "max_tokens": 62}, "prompt"),
        ({"prompt": "a", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_completion_invalid_field_names_param(client: TestClient, body: dict, param: str) -> None:
    error = error_of(client.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert error["param"] == param


def test_unknown_model_and_route_are_404(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"}), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert f"this server serves `{MODEL}`" in error["message"]  # says what to send instead
    error_of(client.get("/v1/nothing"), 404)
    error_of(client.get("/v1/completions"), 405)


def test_body_over_the_limit_is_413_even_without_content_length(make_client) -> None:
    client = make_client(max_body_bytes=1024)
    big = json.dumps({"model": MODEL, "prompt": "x" * 2000}).encode()
    assert error_of(client.post("/v1/completions", content=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(big), 100):
            yield big[start : start + 100]

    error_of(client.post("/v1/completions", content=chunks()), 413)
    complete_ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})
    assert complete_ok.status_code == 200


def test_api_keys(make_client) -> None:
    client = make_client(api_keys="k1,k2")
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
    assert error_of(client.post("/v1/completions", json=body), 401)["code"] == "invalid_api_key"
    error_of(client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    error_of(client.post("/v1/completions", json=body, headers={"Authorization": "Basic k1"}), 401)
    assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_overloaded_is_429_with_retry_after(make_client) -> None:
    client = make_client(retry_after_s=3)
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "OVERLOAD"})
    assert error_of(response, 429)["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "3"


def test_dead_engine_is_503(client: TestClient, engine) -> None:
    assert error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "DEAD"}), 503)["code"] == "engine_dead"
    engine.is_alive = False
    error_of(client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER}), 503)


def test_unexpected_error_is_a_generic_500(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    error = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "CRASH"}), 500)
    assert "boom" not in error["message"] and error["type"] == "server_error"
    assert any(record.exc_info for record in caplog.records)
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1}).status_code == 200


def test_failure_after_the_stream_started_is_one_error_event(client: TestClient, engine) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "FAIL_MID", "max_tokens": 5, "stream": True})
    assert response.status_code == 200
    data = sse_data(response.text)
    assert "[DONE]" not in data
    final = json.loads(data[-1])
    assert set(final["error"]) == {"message", "type", "param", "code"}
    assert all("error" not in json.loads(item) for item in data[:-1])
    assert not engine.running
