"""GET /health, GET /v1/models, the request id, draining, and GET /openapi.json."""

from __future__ import annotations

from conftest import MODEL
from starlette.testclient import TestClient


def test_health_follows_the_engine_and_the_drain(client: TestClient, engine) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    engine.is_alive = False
    assert client.get("/health").status_code == 503
    engine.is_alive = True
    client.app.state.gateway.begin_drain()
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["error"]["code"] == "draining"


def test_draining_refuses_new_api_requests_but_not_metrics(client: TestClient) -> None:
    client.app.state.gateway.begin_drain()
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "draining"
    assert client.get("/metrics").status_code == 200


def test_while_loading_health_and_the_api_answer_503_loading() -> None:
    from gateway.app import create_app
    from gateway.settings import Settings

    client = TestClient(create_app(Settings()))  # not entered: the lifespan (which would load the model) never runs
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "loading"
    assert "loading" in health.json()["error"]["message"]
    for response in (client.post("/v1/completions", json={"model": MODEL, "prompt": "a"}), client.get("/v1/models")):
        assert response.status_code == 503
        assert set(response.json()) == {"error"} and response.json()["error"]["code"] == "loading"
    assert client.get("/metrics").status_code == 200  # Prometheus keeps scraping a loading pod
    client.app.state.gateway.load_error = "model 'x/y' is not in the Hugging Face cache"
    failed = client.get("/health").json()["error"]
    assert failed["code"] == "load_failed" and "x/y" in failed["message"]


def test_models(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert (card["id"], card["object"], card["owned_by"], card["max_model_len"]) == (MODEL, "model", "sirocco", 64)
    assert isinstance(card["created"], int)


def test_served_model_name(make_client) -> None:
    client = make_client(served_model_name="mistral")
    assert client.get("/v1/models").json()["data"][0]["id"] == "mistral"
    assert client.post("/v1/completions", json={"model": "mistral", "prompt": "a", "max_tokens": 1}).status_code == 200


def test_request_id_is_honoured_echoed_or_made(client: TestClient) -> None:
    assert client.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/health").headers["x-request-id"]
    assert len(made) == 32
    assert client.get("/health", headers={"X-Request-Id": "bad id\t!"}).headers["x-request-id"] != "bad id\t!"
    assert client.get("/nowhere", headers={"X-Request-Id": "r1"}).headers["x-request-id"] == "r1"


def test_cors_when_configured(make_client) -> None:
    client = make_client(cors_allow_origins="https://a.example", api_keys="k")
    preflight = client.options(
        "/v1/completions", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://a.example"


def test_openapi_describes_our_endpoints(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/responses/{response_id}/input_items",
        "/v1/responses/{response_id}/cancel",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
    }
    schemas = spec["components"]["schemas"]
    assert "prompt" in schemas["CompletionRequest"]["properties"]
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    assert "previous_response_id" in schemas["ResponsesRequest"]["properties"]
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            refs.extend(value for key, value in node.items() if key == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)


def test_retrieve_model(make_client) -> None:
    client = make_client(served_model_name="mistralai/Mistral-7B-Instruct-v0.3")
    for path in ("/v1/models/mistralai/Mistral-7B-Instruct-v0.3", "/v1/models/mistralai%2FMistral-7B-Instruct-v0.3"):
        response = client.get(path)
        assert response.status_code == 200, response.text
        assert response.json() == client.get("/v1/models").json()["data"][0]


def test_retrieve_unknown_model_is_404_naming_the_served_one(client: TestClient) -> None:
    response = client.get("/v1/models/gpt-4o")
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("not_found_error", "model_not_found", "model")
    assert "gpt-4o" in error["message"] and MODEL in error["message"]
