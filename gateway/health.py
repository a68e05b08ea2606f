"""GET /health (200 once the engine is loaded and its loop alive; 503 while loading, draining, or dead) and GET /v1/models."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import APIError, error_response
from gateway.responses import ModelCard, ModelList
from gateway.state import GatewayState, loading_error


async def health(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    if state.is_draining:
        return error_response(APIError(503, "The server is shutting down.", code="draining"))
    if state.is_loading:
        return error_response(loading_error())
    if state.engine is None:
        return error_response(APIError(503, f"The model failed to load: {state.load_error}", code="load_failed"))
    if not state.engine.is_alive:
        return error_response(APIError(503, "The engine is not running.", code="engine_dead"))
    return JSONResponse({"status": "ok"})


async def list_models(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    engine = state.require_engine()
    card = ModelCard(id=state.settings.model_name, created=state.created, max_model_len=engine.max_model_len)
    return Response(ModelList(data=[card]).model_dump_json(), media_type="application/json")
