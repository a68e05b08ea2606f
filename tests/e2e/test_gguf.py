"""`sirocco serve --model <file>.gguf`: a tiny Llama GGUF (mixed Q4_0/Q4_1/Q8_0/F16/F32 tensors) answers the openai SDK."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import ServerProcess, chat_whole_and_streamed, start_server
from tests.engine.gguf_helpers import write_tiny_gguf

SERVED_NAME = "tiny-gguf"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path, embedded_gguf_dir: pathlib.Path
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tiny_gguf_serve")
    gguf = write_tiny_gguf(folder / "tiny.gguf", vocab_size=49152, tokenizer_dir=embedded_gguf_dir)  # SmolLM2's vocabulary
    yield from start_server(
        tmp_path_factory,
        embedded_model_dir,
        SIROCCO_MODEL=str(gguf),
        SIROCCO_SERVED_MODEL_NAME=SERVED_NAME,
        SIROCCO_CACHE_DIR=str(folder / "cache"),
        SIROCCO_MAX_MODEL_LEN="512",  # the tiny model's context_length
    )


def test_a_gguf_file_answers_chat_through_the_sdk(client: openai.OpenAI, server: ServerProcess) -> None:
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]
    messages = [{"role": "user", "content": "Say something."}]
    reply, streamed = chat_whole_and_streamed(client, model=SERVED_NAME, messages=messages, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("length", "stop") and reply.usage is not None
    assert 1 <= reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 5  # the chat template wrapped it
    assert streamed == choice.message.content
    assert "from its GGUF file" in server.log() and "tiny.gguf" in server.log()
