"""End to end: a real server with the embedded model, driven by the official openai SDK (sync and async)."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, ServerProcess, start_server

from tests.conditions import wait_until

pytestmark = pytest.mark.slow
PROMPT = "The three primary colors are"
MESSAGES = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[ServerProcess]:
    yield from start_server(tmp_path_factory, embedded_model_dir, SIROCCO_MAX_BODY_BYTES="65536")


def async_client(server: ServerProcess) -> openai.AsyncOpenAI:
    """A fresh AsyncOpenAI (made inside the event loop of the test's asyncio.run)."""
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def assert_still_serving(client: openai.OpenAI) -> None:
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).choices[0].finish_reason == "length"


def test_completion_streamed_equals_not_streamed_and_usage_adds_up(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion" and whole.model == MODEL
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.usage.prompt_tokens_details is not None
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_streamed_equals_not_streamed(server: ServerProcess) -> None:
    async def run() -> None:
        async with async_client(server) as client:
            await _chat_streamed_equals_not_streamed(client)

    asyncio.run(run())


async def _chat_streamed_equals_not_streamed(async_client: openai.AsyncOpenAI) -> None:
    whole = await async_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = await async_client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_and_batch_prompts(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=2, temperature=0.8, seed=1)
    assert [choice.index for choice in chat.choices] == [0, 1]
    assert 2 <= chat.usage.completion_tokens <= 8
    batch = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=2, n=2)
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.completion_tokens == 8


def test_logprobs_in_both_formats(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, logprobs=2, temperature=0)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(
        2 <= len(top) <= 3 and value <= 0 for top, value in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )
    assert logprobs.text_offset[0] == 0
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 and entry.bytes is not None for entry in content)


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = text.split()[1]
    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text and text.startswith(choice.text)


def test_seed_reproduces_a_sampled_output(client: openai.OpenAI) -> None:
    def sample() -> str:
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=1234).choices[0].text

    assert sample() == sample()


def test_errors_have_the_envelope_and_the_server_keeps_serving(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=5)
    assert caught.value.body["param"] == "temperature" and caught.value.body["type"] == "invalid_request_error"
    assert_still_serving(client)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"no_such_field": 1})
    assert caught.value.body["param"] == "no_such_field"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, functions=[{"name": "f"}])
    assert caught.value.body["param"] == "functions"
    with pytest.raises(openai.BadRequestError):  # prompt + max_tokens beyond the 1024-token context
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2000)
    assert_still_serving(client)
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert caught.value.body["code"] == "model_not_found"
    route = httpx.get(f"{server.base_url}/v1/nothing")
    assert route.status_code == 404 and set(route.json()["error"]) == {"message", "type", "param", "code"}
    big = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "x" * 70000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    malformed = httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{not json")
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    assert_still_serving(client)


def test_disconnect_mid_stream_frees_the_request(server: ServerProcess) -> None:
    aborted_before = server.metric('sirocco_requests_finished_total{finish_reason="abort"}')
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.metric("sirocco_requests_running") == 1
        assert server.metric("sirocco_kv_cache_usage_ratio") > 0
    wait_until(lambda: server.metric("sirocco_requests_running") == 0, "the abandoned request to be aborted")
    assert server.metric("sirocco_kv_cache_usage_ratio") == 0
    assert server.metric('sirocco_requests_finished_total{finish_reason="abort"}') == aborted_before + 1


def test_32_concurrent_streams_all_complete(server: ServerProcess) -> None:
    async def run() -> None:
        async with async_client(server) as client:
            await _32_concurrent_streams_all_complete(client)

    asyncio.run(run())


async def _32_concurrent_streams_all_complete(async_client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str | None:
        stream = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=6, stream=True
        )
        finish = None
        async for chunk in stream:
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        return finish

    finishes = await asyncio.gather(*(one(i) for i in range(32)))
    assert all(finish in ("stop", "length") for finish in finishes)


def test_models_metrics_and_openapi(client: openai.OpenAI, server: ServerProcess) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]
    metrics = httpx.get(f"{server.base_url}/metrics", follow_redirects=False)
    assert metrics.status_code == 200 and "sirocco_time_to_first_token_seconds_count" in metrics.text
    assert server.metric("sirocco_generation_tokens_total") > 0
    assert "/v1/chat/completions" in httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
