"""End to end, the smaller OpenAI-surface pieces: model card, system_fingerprint, SSE framing on the wire, /tokenize and
/detokenize, prompt scoring (echo + logprobs + max_tokens 0, as lm-evaluation-harness sends it), and logprobs that
describe exactly the returned text."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, ServerProcess, start_server

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a fruit. Answer in one word."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[ServerProcess]:
    yield from start_server(tmp_path_factory, embedded_model_dir)


def test_model_card(client: openai.OpenAI) -> None:
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "sirocco")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found" and MODEL in caught.value.message


def test_system_fingerprint_on_every_response_and_chunk(client: openai.OpenAI) -> None:
    seen = {client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).system_fingerprint}
    seen |= {
        chunk.system_fingerprint for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream=True)
    }
    seen.add(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).system_fingerprint)
    chat_stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True)
    seen |= {chunk.system_fingerprint for chunk in chat_stream}
    (fingerprint,) = seen
    assert fingerprint is not None and re.fullmatch(r"fp_[0-9a-f]{10}", fingerprint)


def test_sse_framing_on_the_wire(server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        raw = b"".join(response.iter_raw())
    assert b"\r" not in raw and raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")[:-1]
    assert len(events) >= 3 and all(event.startswith(b"data: ") and b"\n" not in event for event in events)


def test_tokenize_and_detokenize_agree_with_the_endpoints(server: ServerProcess, client: openai.OpenAI) -> None:
    url = server.base_url
    text = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": PROMPT}, timeout=30).json()
    assert text["count"] == len(text["tokens"]) and text["max_model_len"] == 1024
    usage = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).usage
    assert usage is not None and usage.prompt_tokens == text["count"]
    assert httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": text["tokens"]}, timeout=30).json() == {
        "prompt": PROMPT
    }
    chat = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": MESSAGES}, timeout=30).json()
    usage = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1).usage
    assert usage is not None and usage.prompt_tokens == chat["count"]
    error = httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}, timeout=30).json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "tokens"


def test_scoring_a_text_as_lm_evaluation_harness_does(client: openai.OpenAI) -> None:
    """echo + max_tokens 0 + logprobs: the prompt scored; a greedy continuation scores as it was generated."""
    # Two tokens (" Paris", "."): the joined text tokenizes back into the same ones (longer runs may merge, e.g. "\n\n").
    generated = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1)
    gen_logprobs = generated.choices[0].logprobs
    assert gen_logprobs is not None and gen_logprobs.token_logprobs is not None and len(gen_logprobs.token_logprobs) == 2
    full = PROMPT + generated.choices[0].text
    scored = client.completions.create(model=MODEL, prompt=full, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert (choice.text, choice.finish_reason) == (full, "length")
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == scored.usage.prompt_tokens and "".join(lp.tokens) == full
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # The continuation's tokens were the greedy choice: each is its position's top token, with the logprob it had.
    assert lp.tokens[-2:] == gen_logprobs.tokens
    # Not bit-equal: decode and prefill take different attention paths (float summation order only).
    assert lp.token_logprobs[-2:] == pytest.approx(gen_logprobs.token_logprobs, abs=2e-3)
    assert all(
        max(top.values()) == pytest.approx(value, abs=1e-6)
        for top, value in zip(lp.top_logprobs[-2:], lp.token_logprobs[-2:], strict=True)
    )
    # Streamed: the echoed prompt chunk carries the same logprobs.
    stream = client.completions.create(model=MODEL, prompt=full, max_tokens=0, echo=True, logprobs=1, stream=True)
    first, *_ = [chunk for chunk in stream if chunk.choices]
    assert first.choices[0].text == full and first.choices[0].logprobs is not None
    assert first.choices[0].logprobs.tokens == lp.tokens
    assert first.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs)


def test_chat_logprobs_bytes_join_to_the_content(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, logprobs=True)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop"  # ended by <|im_end|>, which is not in the content: no entry for it
    assert choice.logprobs is not None and choice.logprobs.content is not None and choice.message.content
    assert bytes(b for entry in choice.logprobs.content for b in entry.bytes or []) == choice.message.content.encode()
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    entries = [
        entry
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert bytes(b for entry in entries for b in entry.bytes or []) == choice.message.content.encode()
    assert all(len(entry.top_logprobs) == 2 for entry in entries)


def test_completion_logprob_tokens_join_to_the_text(server: ServerProcess, client: openai.OpenAI) -> None:
    rendered = httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES}, timeout=30).json()["tokens"]
    whole = client.completions.create(model=MODEL, prompt=rendered, max_tokens=40, temperature=0, logprobs=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == choice.text
    stream = client.completions.create(model=MODEL, prompt=rendered, max_tokens=40, temperature=0, logprobs=0, stream=True)
    tokens = [
        token
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for token in chunk.choices[0].logprobs.tokens or []
    ]
    assert "".join(tokens) == choice.text
