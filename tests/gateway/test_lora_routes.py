"""LoRA adapters at the gateway: names in /v1/models with their parent, `model` selecting an adapter, 404s naming what
is served, and the runtime load/unload endpoints (off by default) with their errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import MODEL
from fake_engine import FakeEngine
from starlette.testclient import TestClient

from engine import LoraClient, LoraError


class LoraFakeEngine(FakeEngine):
    """The gateway's fake engine, serving LoRA adapters by name (the weights do not matter here)."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_names = ["support"]

    async def load_lora_adapter(self, name: str, path: str) -> None:
        if path == "/bad" or name in self.lora_names:
            raise LoraError(f"LoRA adapter {path} does not exist" if path == "/bad" else f"{name!r} is already loaded")
        self.lora_names.append(name)

    async def unload_lora_adapter(self, name: str) -> None:
        self.lora_names.remove(name)


@pytest.fixture
def engine() -> LoraFakeEngine:
    return LoraFakeEngine()


def test_adapters_are_models_with_a_parent(make_client: Callable[..., TestClient], engine: LoraFakeEngine) -> None:
    assert isinstance(engine, LoraClient)
    client = make_client()
    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m.get("parent")) for m in models] == [(MODEL, None), ("support", MODEL)]
    assert client.get("/v1/models/support").json()["parent"] == MODEL
    body = {"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["model"] == "support"
    [(_, params)] = engine.requests.values()
    assert params.lora == "support"
    missing = client.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    assert missing.status_code == 404 and f"`{MODEL}`, `support`" in missing.json()["error"]["message"]


def test_runtime_updates_are_off_by_default(make_client: Callable[..., TestClient]) -> None:
    response = make_client().post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert response.status_code == 404 and "SIROCCO_ENABLE_LORA_RUNTIME_UPDATES" in response.json()["error"]["message"]


def test_load_and_unload(make_client: Callable[..., TestClient]) -> None:
    client = make_client(enable_lora_runtime_updates=True)
    loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": "/adapters/legal"})
    assert loaded.status_code == 200 and "legal" in loaded.text
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL, "support", "legal"]
    cases = [
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/bad"}, 400, "does not exist"),
        ("/v1/load_lora_adapter", {"lora_name": "legal", "lora_path": "/a"}, 400, "already loaded"),
        ("/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": "/a"}, 400, "base model"),
        ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
        ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "`support`, `legal`"),
    ]
    for path, body, status, text in cases:
        response = client.post(path, json=body)
        assert response.status_code == status and text in response.json()["error"]["message"], (body, response.text)
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "legal"}).status_code == 200
    assert client.post("/v1/completions", json={"model": "legal", "prompt": "a"}).status_code == 404


def test_openapi_lists_the_load_and_unload_routes_with_their_bodies(make_client: Callable[..., TestClient]) -> None:
    spec = make_client().get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, model, required in (
        ("/v1/load_lora_adapter", "LoadLoraRequest", ["lora_name", "lora_path"]),
        ("/v1/unload_lora_adapter", "UnloadLoraRequest", ["lora_name"]),
    ):
        post = spec["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert sorted(schemas[model]["required"]) == sorted(required)
        assert "text/plain" in post["responses"]["200"]["content"]
        # the 404 a server with runtime updates off answers (the default) is a documented status, so fuzzers accept it
        assert "SIROCCO_ENABLE_LORA_RUNTIME_UPDATES" in post["responses"]["404"]["description"]
    assert "lora_int_id" in schemas["UnloadLoraRequest"]["properties"]
