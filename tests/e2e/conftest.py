"""A real `sirocco serve` in a subprocess on a free loopback port, serving the embedded model; one per test module.

Each module defines its own module-scoped `server` fixture (with its own settings); `client` is the official SDK
pointed at it.
"""

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.server import MODEL, REPO_ROOT, ServerProcess, free_port, start_server

__all__ = ["MODEL", "REPO_ROOT", "ServerProcess", "chat_whole_and_streamed", "free_port", "start_server"]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as sync_client:
        yield sync_client


def chat_whole_and_streamed(client: openai.OpenAI, **body: Any) -> tuple[Any, str]:
    """One chat request made whole, then streamed -> the whole ChatCompletion, and the streamed content joined."""
    whole = client.chat.completions.create(**body)
    chunks = client.chat.completions.create(**body, stream=True)
    return whole, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
