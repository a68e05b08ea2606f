"""POST /v1/chat/completions against the fake engine: messages, response shape, logprobs, streaming."""

from __future__ import annotations

from conftest import MODEL
from sse import sse_json
from starlette.testclient import TestClient

USER = [{"role": "user", "content": "hi"}]


def chat(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_shape_matches_openai(client: TestClient) -> None:
    body = chat(client, max_completion_tokens=2)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " t0 t1", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 2


def test_messages_reach_the_engine_as_dicts(client: TestClient, engine) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None},
        {"role": "developer", "content": "dev"},
    ]
    chat(client, messages=messages, max_tokens=1)
    ((prompt, params),) = engine.requests.values()
    assert prompt == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "two parts"},
        {"role": "assistant", "content": "ok"},
        {"role": "system", "content": "dev"},
    ]
    assert params.max_tokens == 1


def test_no_max_tokens_means_up_to_the_context(client: TestClient, engine) -> None:
    chat(client)
    ((_, params),) = engine.requests.values()
    assert params.max_tokens is None


def test_max_tokens_limit_is_the_default_and_the_cap(make_client, engine) -> None:
    client = make_client(max_tokens_limit=3)
    chat(client)
    ((_, params),) = engine.requests.values()
    assert params.max_tokens == 3
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_completion_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_completion_tokens"


def test_logprobs_format(client: TestClient) -> None:
    logprobs = chat(client, max_tokens=1, logprobs=True, top_logprobs=1)["choices"][0]["logprobs"]
    assert logprobs == {
        "content": [
            {
                "token": " t0",
                "logprob": -0.5,
                "bytes": [32, 116, 48],
                "top_logprobs": [{"token": " alt0", "logprob": -1.0, "bytes": [32, 97, 108, 116, 48]}],
            }
        ],
        "refusal": None,
    }
    assert chat(client, max_tokens=1, logprobs=True)["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_stream_role_first_finish_last_usage_done(client: TestClient) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 3, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    response = client.post("/v1/chat/completions", json=body)
    chunks = sse_json(response.text)
    *choice_chunks, usage_chunk = chunks
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    for index in (0, 1):
        mine = [chunk["choices"][0] for chunk in choice_chunks if chunk["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in choice["delta"] for choice in mine[1:])
        assert "".join(choice["delta"]["content"] for choice in mine) == " t0 t1 t2"
        assert [choice["finish_reason"] for choice in mine] == [None, None, None, "length"]


def test_stream_logprobs(client: TestClient) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 2, "stream": True, "logprobs": True}
    chunks = sse_json(client.post("/v1/chat/completions", json=body).text)
    tokens = [chunk["choices"][0]["logprobs"]["content"][0]["token"] for chunk in chunks[1:]]
    assert tokens == [" t0", " t1"]
