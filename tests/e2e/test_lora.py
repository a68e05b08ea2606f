"""LoRA adapters through the real server and the openai SDK: /v1/models lists them with their parent, a request names
one in `model` (chat, completions, Responses), unknown names are 404s naming what is served, and adapters load and
unload at runtime while other requests run, losing none; with the engine core on a thread and in its own process."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from tests.e2e.conftest import ServerProcess, start_server
from tests.engine.lora_helpers import ATTENTION, write_adapter

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
BASE = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog and"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_mistral_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("e2e_adapters")
    return {
        "support": write_adapter(tiny_mistral_dir, root / "support", 8, 16, ATTENTION, False, 11),
        "legal": write_adapter(tiny_mistral_dir, root / "legal", 16, 16, ["q_proj", "o_proj", "down_proj"], True, 12),
    }


@pytest.fixture(scope="module", params=[False, True], ids=["engine_thread", "engine_process"])
def server(
    tmp_path_factory: pytest.TempPathFactory,
    embedded_model_dir: pathlib.Path,
    tiny_mistral_dir: pathlib.Path,
    adapters: dict[str, pathlib.Path],
    request: pytest.FixtureRequest,
) -> Iterator[ServerProcess]:
    """The same server with the engine core on a thread, then in its own process (adapter updates cross its pipe)."""
    yield from start_server(
        tmp_path_factory,
        embedded_model_dir,
        SIROCCO_ENGINE_PROCESS=str(request.param).lower(),
        SIROCCO_MODEL=str(tiny_mistral_dir),
        SIROCCO_SERVED_MODEL_NAME=BASE,
        SIROCCO_LORA_MODULES=f"support={adapters['support']}",
        SIROCCO_ENABLE_LORA_RUNTIME_UPDATES="true",
        SIROCCO_MAX_LORAS="2",
        SIROCCO_MAX_MODEL_LEN="256",
    )


def complete(client: openai.OpenAI, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0.0).choices[0].text


def test_adapters_serve_list_load_and_unload(
    server: ServerProcess, client: openai.OpenAI, tiny_mistral_dir: pathlib.Path, adapters: dict[str, pathlib.Path]
) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [BASE, "support"]
    assert models["support"].model_extra["parent"] == BASE
    assert client.models.retrieve("support").model_extra["parent"] == BASE

    offline = LLM(model=str(tiny_mistral_dir), lora_modules=f"support={adapters['support']}", max_model_len=256)
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, lora="support"))[0].outputs[0].text
    assert complete(client, "support") == expected != complete(client, BASE)
    chat = client.chat.completions.create(
        model="support", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0
    )
    assert chat.model == "support" and chat.choices[0].message.content
    response = client.responses.create(model="support", input="hi", max_output_tokens=4, temperature=0.0, store=False)
    assert response.model == "support" and response.output_text

    with pytest.raises(openai.NotFoundError, match="`tiny`, `support`"):
        complete(client, "nope")

    url = server.base_url
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"}, timeout=30)
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    # Load and unload while requests for the base model and the first adapter run: none is lost
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(complete, client, name) for name in (BASE, "support") * 4]
        loaded = httpx.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(adapters["legal"])}, timeout=60
        )
        assert loaded.status_code == 200, loaded.text
        legal = [pool.submit(complete, client, "legal") for _ in range(3)]
        assert len({f.result() for f in legal}) == 1
        assert [f.result() for f in running][1::2] == [expected] * 4
    assert [m.id for m in client.models.list().data] == [BASE, "support", "legal"]
    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "legal"}, timeout=30)
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError, match="legal"):
        complete(client, "legal")
    again = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "legal"}, timeout=30)
    assert again.status_code == 404 and "`support`" in again.json()["error"]["message"]
    assert complete(client, "support") == expected


def test_lora_metrics_name_the_running_adapters(server: ServerProcess, client: openai.OpenAI) -> None:
    stream = client.completions.create(model="support", prompt=PROMPT, max_tokens=200, temperature=0.0, stream=True)
    with stream:
        next(iter(stream))  # the request is running now
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for name in ("vllm:lora_requests_info", "sirocco_lora_requests_info"):
        line = next(line for line in text.splitlines() if line.startswith(name + "{"))
        assert 'max_lora="2"' in line and 'running_lora_adapters="support"' in line, line
    assert server.metric('sirocco_lora_requests_total{lora_name="support"}') >= 1
