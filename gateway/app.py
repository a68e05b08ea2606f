"""create_app(settings, engine=None) -> Starlette: the routes, the middleware stack, and a lifespan that owns the engine.

Given no engine, the lifespan starts loading one in the background (gateway/loading.py) and returns at once, so the
server answers while the model loads, and shuts the engine down on exit; an engine passed in (tests) is used as it is
and left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import EngineClient
from gateway.chat import create_chat_completion
from gateway.completions import create_completion
from gateway.errors import APIError, handle_api_error, handle_http_exception
from gateway.health import health, list_models, retrieve_model
from gateway.loading import load_engine
from gateway.lora import load_lora_adapter, unload_lora_adapter
from gateway.metrics import metrics_endpoint
from gateway.middleware import GatewayMiddleware
from gateway.openapi import openapi_spec
from gateway.response_store import open_store
from gateway.responses import (
    cancel_response,
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
    stop_background_responses,
)
from gateway.settings import Settings
from gateway.state import GatewayState
from gateway.tokenize import detokenize, tokenize


def package_version() -> str:
    """The installed distribution's version (found by the package it ships, whatever the distribution is named)."""
    for name in packages_distributions().get("gateway", []):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "0.0.0"  # running from a source tree that is not installed


def create_app(settings: Settings | None = None, engine: EngineClient | None = None) -> Starlette:
    settings = settings if settings is not None else Settings()
    state = GatewayState(settings, engine)
    specs: list[dict[str, Any]] = []  # built on the first request (~0.1 s of pydantic schema work most apps never need)

    async def openapi(request: Request) -> Response:
        if not specs:
            specs.append(openapi_spec("Sirocco", package_version()))
        return JSONResponse(specs[0])

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owns_engine = state.engine is None
        state.response_store = open_store(settings)
        loading = asyncio.create_task(load_engine(state)) if owns_engine else None
        try:
            yield
        finally:
            if loading is not None:
                loading.cancel()  # abandons a load still under way (its daemon thread dies with the process)
            await stop_background_responses(state)
            await state.response_store.close()
            if owns_engine and state.engine is not None:
                await anyio.to_thread.run_sync(state.engine.shutdown)

    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", retrieve_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    middleware = [Middleware(GatewayMiddleware, state=state)]
    if settings.cors_allow_origins:
        cors = Middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_methods=["*"], allow_headers=["*"])
        middleware.insert(0, cors)  # outermost: preflight requests need no API key
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={APIError: handle_api_error, HTTPException: handle_http_exception},
        lifespan=lifespan,
    )
    app.state.gateway = state
    return app
