"""GET /health (200 once the engine is loaded and its loop alive, 503 otherwise or while draining) and GET /v1/models."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import APIError, error_response
from gateway.responses import ModelCard, ModelList
from gateway.state import GatewayState


async def health(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    if state.is_draining:
        return error_response(APIError(503, "The server is shutting down.", code="draining"))
    if state.engine is None:
        return error_response(APIError(503, "The model is not loaded yet.", code="loading"))
    if not state.engine.is_alive:
        return error_response(APIError(503, "The engine is not running.", code="engine_dead"))
    return JSONResponse({"status": "ok"})


async def list_models(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    engine = state.require_engine()
    card = ModelCard(id=state.settings.model_name, created=state.created, max_model_len=engine.max_model_len)
    return Response(ModelList(data=[card]).model_dump_json(), media_type="application/json")
