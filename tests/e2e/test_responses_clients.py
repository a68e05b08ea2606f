"""End to end: /v1/responses on real servers, driven by the clients people use: the openai SDK, the openai-agents SDK
and Codex CLI.

The SDK and Agents tests use the embedded model. Codex and the restart test use a tiny Mistral with a 32k context
whose weights make it answer "Hello" and stop whatever the prompt (a bigram: any token -> "Hello" -> end of text), so
Codex's ~9k-token first request fits and its turn ends the same way every run: what these tests check is the protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator
from typing import Literal

import openai
import pytest
import torch
from conftest import MODEL, ServerProcess, start_server
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from tests.conftest import write_tiny_mistral

pytestmark = pytest.mark.slow

CODEX_VERSION = "0.171.0"
CODEX_DIR = pathlib.Path(__file__).resolve().parents[2] / ".cache" / "codex"
TINY = "tiny-hello"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> Iterator[ServerProcess]:
    yield from start_server(tmp_path_factory, embedded_model_dir, SIROCCO_MAX_TOKENS_LIMIT="64")


def write_hello_model(out_dir: pathlib.Path, tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """The tiny random Mistral (32k positions), its layers' outputs zeroed so the last hidden state is the token's
    embedding; embeddings and lm_head then make "Hello" follow every other token and end-of-text follow "Hello"."""
    from transformers import AutoTokenizer

    write_tiny_mistral(out_dir, tokenizer_dir, sliding_window=None, max_position_embeddings=32768)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    hello, eos = tokenizer.encode("Hello")[0], tokenizer.eos_token_id
    weights = load_file(out_dir / "model.safetensors")
    for name, tensor in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(tensor)
    embed = torch.zeros_like(weights["model.embed_tokens.weight"])  # [vocab, hidden]
    embed[:, 0] = 1.0
    embed[hello] = 0.0
    embed[hello, 1] = 1.0
    lm_head = torch.zeros_like(weights["lm_head.weight"])  # [vocab, hidden]
    lm_head[hello, 0] = lm_head[eos, 1] = 100.0
    weights.update(
        {"model.embed_tokens.weight": embed, "lm_head.weight": lm_head, "model.norm.weight": torch.ones(embed.shape[1])}
    )
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module")
def hello_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> pathlib.Path:
    return write_hello_model(tmp_path_factory.mktemp("tiny_hello"), embedded_model_dir)


def hello_server_settings(store_path: pathlib.Path, model_dir: pathlib.Path) -> dict[str, str]:
    return {
        "SIROCCO_MODEL": str(model_dir),
        "SIROCCO_SERVED_MODEL_NAME": TINY,
        "SIROCCO_MAX_MODEL_LEN": "32768",
        "SIROCCO_MAX_TOKENS_LIMIT": "16",
        "SIROCCO_RESPONSES_STORE_PATH": str(store_path),
    }


@pytest.fixture(scope="module")
def hello_store(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("hello_store") / "responses.sqlite3"


@pytest.fixture(scope="module")
def hello_server(
    tmp_path_factory: pytest.TempPathFactory,
    embedded_model_dir: pathlib.Path,
    hello_model_dir: pathlib.Path,
    hello_store: pathlib.Path,
) -> Iterator[ServerProcess]:
    yield from start_server(tmp_path_factory, embedded_model_dir, **hello_server_settings(hello_store, hello_model_dir))


# --- the openai SDK ----------------------------------------------------------------------------------------------


def test_create_answers_with_output_text_and_usage(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Say hello.", instructions="Answer briefly.", max_output_tokens=8)
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage is not None and 0 < response.usage.output_tokens <= 8
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert client.responses.retrieve(response.id).output_text == response.output_text
    items = client.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"]


def test_stream_helper_events_join_to_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Count to three.", max_output_tokens=8, temperature=0) as stream:
        events = list(stream)
    final = events[-1].response  # get_final_response() wants response.completed, and max_output_tokens may cut this one
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert [event.sequence_number for event in events] == sorted({event.sequence_number for event in events})
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.output_text and deltas
    plain = client.responses.create(model=MODEL, input="Count to three.", max_output_tokens=8, temperature=0)
    assert plain.output_text == final.output_text


class City(BaseModel):
    city: Literal["Paris", "London", "Rome"]
    country: Literal["France", "England", "Italy"]


def test_parse_with_text_format_gives_the_model_instance(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model=MODEL, input="Name a city and its country.", text_format=City, max_output_tokens=40)
    assert isinstance(parsed.output_parsed, City)


def test_function_call_round_trip_through_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=48,
    )
    assert first.status == "completed"  # the one call ends the output
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", first.output
    assert set(json.loads(calls[0].arguments)) == {"city"}
    output = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 24 C"}
    second = client.responses.create(
        model=MODEL, input=[output], previous_response_id=first.id, tools=[WEATHER], tool_choice="none", max_output_tokens=16
    )
    assert second.output_text and second.previous_response_id == first.id
    with pytest.raises(openai.BadRequestError, match=calls[0].call_id):  # without the stored turn, the output answers nothing
        client.responses.create(model=MODEL, input=[output], tool_choice="none", max_output_tokens=16)


def test_bad_previous_response_id_is_404_and_the_server_keeps_serving(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="resp_does_not_exist"):
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_does_not_exist")
    with pytest.raises(openai.BadRequestError, match="truncation"):
        client.responses.create(model=MODEL, input="hi", truncation="auto")
    assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).output_text


def test_agents_sdk_runs_a_turn_that_calls_the_tool_and_answers(server: ServerProcess) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"Sunny in {city}"

    async def run() -> agents.RunResult:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as sdk:
            agent = agents.Agent(
                name="weather",
                instructions="Use get_weather, then answer in one sentence.",
                tools=[get_weather],
                model=agents.OpenAIResponsesModel(model=MODEL, openai_client=sdk),
                # the Agents SDK takes an incomplete response for a failure: one call, and an answer of one sentence
                model_settings=agents.ModelSettings(
                    tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0, extra_body={"stop": ["."]}
                ),
            )
            return await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)

    result = asyncio.run(run())
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds and "tool_call_output_item" in kinds, kinds
    assert len(seen) >= 1 and isinstance(result.final_output, str) and result.final_output


# --- a tiny model with a long context: restart, Codex CLI ----------------------------------------------------------


def codex_binary() -> pathlib.Path:
    """Codex CLI from npm, installed once into <repo>/.cache/codex."""
    binary = CODEX_DIR / "node_modules" / ".bin" / "codex"
    if not binary.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not on PATH: it is needed to install Codex CLI")
        command = [npm, "install", "--prefix", str(CODEX_DIR), f"@openai/codex@{CODEX_VERSION}"]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
    return binary


def test_codex_exec_completes_a_turn(hello_server: ServerProcess, tmp_path: pathlib.Path) -> None:
    home, work = tmp_path / "codex_home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(
        f'model = "{TINY}"\nmodel_provider = "sirocco"\n\n[model_providers.sirocco]\nname = "Sirocco"\n'
        f'base_url = "{hello_server.base_url}/v1"\nwire_api = "responses"\nrequest_max_retries = 0\nstream_max_retries = 0\n'
    )
    log_start = len(hello_server.log())
    env = {**os.environ, "CODEX_HOME": str(home), "OPENAI_API_KEY": "unused"}
    result = subprocess.run(
        [str(codex_binary()), "exec", "--skip-git-repo-check", "Say hello."],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ERROR" not in output and "Hello" in result.stdout, output
    log = hello_server.log(log_start)
    assert "POST /v1/responses 200" in log and "web_search" in log, log  # its hosted tool was left out with a warning


def test_previous_response_id_survives_a_restart(
    tmp_path_factory: pytest.TempPathFactory,
    embedded_model_dir: pathlib.Path,
    hello_model_dir: pathlib.Path,
    hello_store: pathlib.Path,
    hello_server: ServerProcess,
) -> None:
    with openai.OpenAI(base_url=f"{hello_server.base_url}/v1", api_key="unused", max_retries=0) as sdk:
        first = sdk.responses.create(model=TINY, input="Greet me.")
    assert first.output_text == "Hello" and first.status == "completed"
    hello_server.stop()
    settings = hello_server_settings(hello_store, hello_model_dir)
    for restarted in start_server(tmp_path_factory, embedded_model_dir, **settings):
        with openai.OpenAI(base_url=f"{restarted.base_url}/v1", api_key="unused", max_retries=0) as sdk:
            second = sdk.responses.create(model=TINY, input="Again.", previous_response_id=first.id)
            assert sdk.responses.retrieve(first.id).output_text == "Hello"
    assert second.output_text == "Hello" and second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn is in the prompt


def test_previous_response_id_across_replicas_sharing_redis(
    tmp_path: pathlib.Path, hello_model_dir: pathlib.Path, redis_url: str
) -> None:
    """Two servers on one Redis, as replicas behind a Service: a turn stored by one is continued through the other."""
    settings = {**hello_server_settings(tmp_path / "unused.sqlite3", hello_model_dir), "SIROCCO_RESPONSES_STORE": redis_url}
    replicas = [ServerProcess(tmp_path / f"replica{i}.log", settings) for i in range(2)]  # both load at once
    try:
        for replica in replicas:
            replica.wait_ready()
        first_url, second_url = (f"{replica.base_url}/v1" for replica in replicas)
        with openai.OpenAI(base_url=first_url, api_key="unused", max_retries=0) as first_sdk:
            first = first_sdk.responses.create(model=TINY, input="Greet me.")
        with openai.OpenAI(base_url=second_url, api_key="unused", max_retries=0) as second_sdk:
            second = second_sdk.responses.create(model=TINY, input="Again.", previous_response_id=first.id)
            assert second_sdk.responses.retrieve(first.id).id == first.id
            items = second_sdk.responses.input_items.list(second.id)
    finally:
        for replica in replicas:
            replica.stop()
    assert second.status == "completed" and second.output_text == "Hello"
    assert second.usage is not None and first.usage is not None and second.usage.input_tokens > first.usage.input_tokens
    assert [item.type for item in items.data] == ["message"]
    assert not (tmp_path / "unused.sqlite3").exists()  # the store was Redis, not a file
