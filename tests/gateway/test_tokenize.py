"""POST /tokenize and POST /detokenize: vLLM's shapes, text and chat prompts, errors in the OpenAI envelope."""

from __future__ import annotations

from conftest import MODEL
from starlette.testclient import TestClient

MESSAGES = [{"role": "user", "content": "one three"}]


def test_tokenize_text(client: TestClient) -> None:
    body = client.post("/tokenize", json={"model": MODEL, "prompt": "aa bbbb"}).json()
    assert body == {"count": 3, "max_model_len": 64, "tokens": [1, 2, 4]}
    body = client.post("/tokenize", json={"prompt": "aa bbbb", "add_special_tokens": False, "return_token_strs": True}).json()
    assert body == {"count": 2, "max_model_len": 64, "tokens": [2, 4], "token_strs": ["<2>", "<4>"]}


def test_tokenize_chat(client: TestClient) -> None:
    assert client.post("/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()["tokens"] == [3, 5, 99]
    body = {"messages": MESSAGES, "add_generation_prompt": False, "add_special_tokens": True}
    assert client.post("/tokenize", json=body).json()["tokens"] == [1, 3, 5]


def test_detokenize(client: TestClient) -> None:
    response = client.post("/detokenize", json={"model": MODEL, "tokens": [5, 7]})
    assert response.status_code == 200 and response.json() == {"prompt": "<5><7>"}


def test_errors_are_openai_envelopes(client: TestClient) -> None:
    cases = [
        ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model_not_found"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "unrecognized_argument"),
        ("/tokenize", {"prompt": 3}, 400, "invalid_value"),
        ("/tokenize", {"messages": [{"role": "user", "content": "TOO_LONG"}]}, 400, "invalid_value"),
        ("/tokenize", [1, 2], 400, "invalid_json"),
        ("/detokenize", {"tokens": [1, 1000]}, 400, "invalid_value"),
        ("/detokenize", {"tokens": [-1]}, 400, "invalid_value"),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model_not_found"),
    ]
    for path, body, status, code in cases:
        response = client.post(path, json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["code"] == code, (body, response.text)
    assert client.post("/tokenize", content=b"{not json").json()["error"]["code"] == "invalid_json"


def test_tokenizer_routes_need_the_api_key(make_client) -> None:
    client = make_client(api_keys="k")
    assert client.post("/tokenize", json={"prompt": "a"}).status_code == 401
    assert client.post("/detokenize", json={"tokens": [1]}).status_code == 401
    assert client.post("/tokenize", json={"prompt": "a"}, headers={"Authorization": "Bearer k"}).status_code == 200
