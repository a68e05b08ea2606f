"""POST /v1/completions against the fake engine: response shape, prompts, echo, n, logprobs, streaming."""

from __future__ import annotations

from conftest import MODEL
from sse import sse_json
from starlette.testclient import TestClient


def complete(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_shape_matches_openai(client: TestClient) -> None:
    body = complete(client, prompt="hello there", max_tokens=3)
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "text": " t0 t1 t2", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
    }


def test_default_max_tokens_is_16(client: TestClient, engine) -> None:
    complete(client, prompt="hi")
    ((_, params),) = engine.requests.values()
    assert params.max_tokens == 16


def test_sampling_fields_reach_the_engine(client: TestClient, engine) -> None:
    complete(
        client,
        prompt="hi",
        max_tokens=2,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"5": 10},
        stop=["x"],
        user="u",
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        min_tokens=1,
        ignore_eos=True,
        stop_token_ids=[3],
    )
    ((_, params),) = engine.requests.values()
    assert (params.temperature, params.top_p, params.seed, params.top_k, params.min_p) == (0.5, 0.9, 7, 5, 0.1)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert params.logit_bias == {5: 10.0}
    assert params.stop_strings == ("x",)
    assert (params.min_tokens, params.ignore_eos, params.stop_token_ids) == (1, True, [3])


def test_prompt_forms_and_choice_indexes(client: TestClient, engine) -> None:
    assert complete(client, prompt=[1, 2, 3], max_tokens=1)["usage"]["prompt_tokens"] == 3
    body = complete(client, prompt=["a", "b c"], max_tokens=1, n=2)
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 1 + 2  # one engine request per prompt, shared by its n choices
    body = complete(client, prompt=[[1], [2, 3]], max_tokens=2)
    assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] == 4
    prompts = [prompt for prompt, _ in engine.requests.values()]
    assert [1, 2, 3] in prompts and "b c" in prompts and [2, 3] in prompts


def test_echo_prepends_the_prompt(client: TestClient) -> None:
    assert complete(client, prompt="hi", max_tokens=1, echo=True)["choices"][0]["text"] == "hi t0"
    assert complete(client, prompt=[7, 8], max_tokens=1, echo=True)["choices"][0]["text"] == "<7><8> t0"


def test_logprobs_format(client: TestClient) -> None:
    logprobs = complete(client, prompt="hi", max_tokens=2, logprobs=2)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" t0", " t1"]
    assert logprobs["token_logprobs"] == [-0.5, -0.5]
    assert logprobs["top_logprobs"][0] == {" alt0": -1.0, " alt1": -2.0, " t0": -0.5}
    assert logprobs["text_offset"] == [0, 3]


def test_stop_string_finishes_with_stop(client: TestClient) -> None:
    choice = complete(client, prompt="hi", max_tokens=5, stop="t2")["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (" t0 t1", "stop")


def test_stream_chunks_then_usage_then_done(client: TestClient) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    response = client.post("/v1/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(response.text)
    *choice_chunks, usage_chunk = chunks
    assert all(chunk["object"] == "text_completion" and chunk["id"] == chunks[0]["id"] for chunk in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    for index in (0, 1):
        mine = [chunk["choices"][0] for chunk in choice_chunks if chunk["choices"][0]["index"] == index]
        assert "".join(choice["text"] for choice in mine) == " t0 t1 t2"
        assert [choice["finish_reason"] for choice in mine] == [None, None, "length"]


def test_stream_without_usage_and_with_echo_and_logprobs(client: TestClient) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True, "echo": True}
    chunks = sse_json(client.post("/v1/completions", json=body).text)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "hi t0 t1"
    assert all(chunk["usage"] is None for chunk in chunks)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True, "logprobs": 0}
    chunks = sse_json(client.post("/v1/completions", json=body).text)
    assert [chunk["choices"][0]["logprobs"]["text_offset"] for chunk in chunks] == [[0], [3]]


def test_bodies_are_logged_only_when_asked(make_client, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO")
    complete(make_client(), prompt="secret-prompt-one", max_tokens=1)
    assert "secret-prompt-one" not in caplog.text
    complete(make_client(log_requests=True), prompt="secret-prompt-two", max_tokens=1)
    assert "secret-prompt-two" in caplog.text


def test_echo_with_logprobs_scores_the_prompt(client: TestClient, engine) -> None:
    """lm-evaluation-harness's request: echo, max_tokens 0, logprobs k; the first prompt token's logprob is null."""
    body = complete(client, prompt="aa bbb cccc", max_tokens=0, echo=True, logprobs=1)
    (choice,) = body["choices"]
    assert (choice["text"], choice["finish_reason"]) == ("aa bbb cccc", "length")
    assert choice["logprobs"] == {
        "tokens": ["<2>", "<3>", "<4>"],
        "token_logprobs": [None, -0.3, -0.4],
        "top_logprobs": [None, {" alt0": -1.0, "<3>": -0.3}, {" alt0": -1.0, "<4>": -0.4}],
        "text_offset": [0, 3, 6],
    }
    assert body["usage"]["completion_tokens"] == 0
    (params,) = [params for _, params in engine.requests.values()]
    assert (params.prompt_logprobs, params.max_tokens) == (1, 0)


def test_echo_with_logprobs_then_generated_tokens(client: TestClient) -> None:
    logprobs = complete(client, prompt="aa bbb", max_tokens=2, echo=True, logprobs=0)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["<2>", "<3>", " t0", " t1"]
    assert logprobs["token_logprobs"] == [None, -0.3, -0.5, -0.5]
    assert logprobs["text_offset"] == [0, 3, 6, 9]  # generated tokens start after the echoed text "aa bbb"


def test_max_tokens_zero_needs_echo(client: TestClient) -> None:
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 0}).status_code == 400
    body = complete(client, prompt="a b", max_tokens=0, echo=True)
    assert body["choices"][0]["text"] == "a b" and body["choices"][0]["logprobs"] is None


def test_stream_echo_chunk_carries_the_prompt_logprobs(client: TestClient) -> None:
    body = {"model": MODEL, "prompt": ["aa bbb", "c"], "max_tokens": 1, "stream": True, "echo": True, "logprobs": 0, "n": 2}
    chunks = [chunk["choices"][0] for chunk in sse_json(client.post("/v1/completions", json=body).text)]
    for index, prompt, tokens in ((0, "aa bbb", ["<2>", "<3>"]), (1, "aa bbb", ["<2>", "<3>"]), (3, "c", ["<1>"])):
        first, *rest = [chunk for chunk in chunks if chunk["index"] == index]
        assert first["text"] == prompt and first["logprobs"]["tokens"] == tokens
        assert first["logprobs"]["token_logprobs"][0] is None
        assert [chunk["logprobs"]["text_offset"] for chunk in rest] == [[len(prompt)]]
