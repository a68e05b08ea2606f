"""The OpenAPI 3.1 document of our own endpoints, generated from the pydantic models' JSON schemas."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.lora import LoadLoraRequest, UnloadLoraRequest
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.replies import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from gateway.responses_protocol import DeletedResponse, InputItemList, ResponseObject, ResponsesRequest
from gateway.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

_REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "Malformed JSON, an invalid or unsupported field, or prompt + max_tokens beyond the context",
    "401": "Missing or wrong API key (only when API keys are configured)",
    "404": "Unknown model",
    "413": "Request body too large",
    "429": "Waiting queue full; see Retry-After",
    "503": "Engine not running, or the server is draining",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a stream: its `data` is a chunk as JSON, an error envelope as JSON (a stream the server
    has to end early), or the closing `[DONE]`."""
    json_text = {"type": "string", "contentMediaType": "application/json"}
    as_json = [{**json_text, "contentSchema": _ref(model)} for model in (chunk, ErrorResponse)]
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, *as_json]}}}


def _generation(summary: str, request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
    error = {"application/json": {"schema": _ref(ErrorResponse)}}
    responses: dict[str, Any] = {
        "200": {
            "description": "The completion, or with stream=true an SSE stream of chunks ending in `data: [DONE]`",
            "content": {"application/json": {"schema": _ref(response)}, "text/event-stream": {"schema": _sse_event(chunk)}},
        }
    }
    responses.update({status: {"description": text, "content": error} for status, text in _ERRORS.items()})
    body = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    return {"post": {"summary": summary, "requestBody": body, "responses": responses, "security": [{"bearer": []}, {}]}}


# A Responses stream event: `event:` names its type, `data` is the event as JSON (its fields depend on the type).
_RESPONSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "pattern": "^(response\\.[a-z_.]+|error)$"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["type", "sequence_number"],
                "properties": {"type": {"type": "string"}, "sequence_number": {"type": "integer", "minimum": 0}},
            },
        },
    },
}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _responses_routes() -> dict[str, Any]:
    """POST /v1/responses and the routes of a stored response (404 when missing, expired or another key's)."""
    error = _json(ErrorResponse)
    errors = {status: {"description": text, "content": error} for status, text in _ERRORS.items()}
    not_found = {"description": "No such stored response (or another API key's)", "content": error}
    response_id = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    security = [{"bearer": []}, {}]
    created = {
        "description": "The response (queued with background=true), or with stream=true an SSE stream of named events",
        "content": {**_json(ResponseObject), "text/event-stream": {"schema": _RESPONSE_EVENT}},
    }
    body = {"required": True, "content": _json(ResponsesRequest)}
    create = {
        "summary": "Create a model response (OpenAI's Responses API)",
        "requestBody": body,
        "responses": {**errors, "200": created, "404": {"description": "Unknown model or previous response", "content": error}},
        "security": security,
    }

    def stored(summary: str, model: type[BaseModel], extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        ok = {"description": "OK", "content": _json(model)}
        responses = {"200": ok, "400": errors["400"], "401": errors["401"], "404": not_found, "503": errors["503"]}
        return {"summary": summary, "parameters": response_id + (extra or []), "responses": responses, "security": security}

    page = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
        {"name": "after", "in": "query", "schema": {"type": "string"}},
    ]
    return {
        "/v1/responses": {"post": create},
        "/v1/responses/{response_id}": {
            "get": stored("A stored response", ResponseObject),
            "delete": stored("Delete a stored response", DeletedResponse),
        },
        "/v1/responses/{response_id}/input_items": {"get": stored("A page of its input items", InputItemList, page)},
        "/v1/responses/{response_id}/cancel": {"post": stored("Cancel a background response", ResponseObject)},
    }


def _tokenizer_route(summary: str, requests: list[type[BaseModel]], response: type[BaseModel]) -> dict[str, Any]:
    error = {"application/json": {"schema": _ref(ErrorResponse)}}
    schema = _ref(requests[0]) if len(requests) == 1 else {"oneOf": [_ref(request) for request in requests]}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {"schema": _ref(response)}}}}
    responses.update({status: {"description": text, "content": error} for status, text in _ERRORS.items() if status != "429"})
    body = {"required": True, "content": {"application/json": {"schema": schema}}}
    return {"post": {"summary": summary, "requestBody": body, "responses": responses, "security": [{"bearer": []}, {}]}}


def _lora_routes() -> dict[str, Any]:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's shape): a plain-text 200, or a 404 while runtime
    updates are off (the default), for an engine without adapters, or for a name not loaded."""
    error = _json(ErrorResponse)
    errors = {status: {"description": text, "content": error} for status, text in _ERRORS.items() if status != "429"}
    ok = {"description": "Success, as one line of text", "content": {"text/plain": {"schema": {"type": "string"}}}}

    def route(summary: str, request: type[BaseModel], bad: str, missing: str) -> dict[str, Any]:
        responses = {
            **errors,
            "200": ok,
            "400": {"description": bad, "content": error},
            "404": {"description": missing, "content": error},
        }
        body = {"required": True, "content": _json(request)}
        return {"post": {"summary": summary, "requestBody": body, "responses": responses, "security": [{"bearer": []}, {}]}}

    off = "Runtime LoRA updates are off (SIROCCO_ENABLE_LORA_RUNTIME_UPDATES)"
    return {
        "/v1/load_lora_adapter": route(
            "Load a LoRA adapter under a name (vLLM's extension)",
            LoadLoraRequest,
            "Malformed body, a name already served, or an adapter that cannot be served (the message says why)",
            off,
        ),
        "/v1/unload_lora_adapter": route(
            "Unload a LoRA adapter by name (vLLM's extension)",
            UnloadLoraRequest,
            "Malformed body",
            f"{off}, or no adapter of that name is loaded",
        ),
    }


def openapi_spec(title: str, version: str) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (CompletionRequest, "validation"),
        (ChatCompletionRequest, "validation"),
        (CompletionResponse, "serialization"),
        (ChatCompletionResponse, "serialization"),
        (ChatCompletionChunk, "serialization"),
        (ModelList, "serialization"),
        (ModelCard, "serialization"),
        (ErrorResponse, "serialization"),
        (TokenizeCompletionRequest, "validation"),
        (TokenizeChatRequest, "validation"),
        (TokenizeResponse, "serialization"),
        (DetokenizeRequest, "validation"),
        (DetokenizeResponse, "serialization"),
        (ResponsesRequest, "validation"),
        (ResponseObject, "serialization"),
        (InputItemList, "serialization"),
        (DeletedResponse, "serialization"),
        (LoadLoraRequest, "validation"),
        (UnloadLoraRequest, "validation"),
    ]
    _, schema = models_json_schema(models, ref_template=_REF)
    plain = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    error = {"application/json": {"schema": _ref(ErrorResponse)}}
    paths = {
        "/v1/completions": _generation("Text completion", CompletionRequest, CompletionResponse, CompletionResponse),
        "/v1/chat/completions": _generation(
            "Chat completion", ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk
        ),
        **_responses_routes(),
        **_lora_routes(),
        "/v1/models": {
            "get": {
                "summary": "The served model",
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": _ref(ModelList)}}}},
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "summary": "The served model's card",
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": _ref(ModelCard)}}},
                    "404": {"description": "Not the served model", "content": error},
                },
            }
        },
        "/tokenize": _tokenizer_route(
            "Token ids of a text or chat prompt (vLLM's extension)",
            [TokenizeCompletionRequest, TokenizeChatRequest],
            TokenizeResponse,
        ),
        "/detokenize": _tokenizer_route("The text of token ids (vLLM's extension)", [DetokenizeRequest], DetokenizeResponse),
        "/health": {
            "get": {
                "summary": "200 when ready; 503 while loading, draining or after an engine failure",
                "responses": {
                    "200": {"description": "Ready"},
                    "503": {"description": "Not ready", "content": {"application/json": {"schema": _ref(ErrorResponse)}}},
                },
            }
        },
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": plain}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schema["$defs"], "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
