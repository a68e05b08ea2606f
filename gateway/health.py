"""GET /health (200 once the engine is loaded and its loop alive; 503 while loading, draining, or dead), GET /v1/models
and GET /v1/models/{id} (the model card, or 404 model_not_found naming the served model)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import APIError, error_response
from gateway.replies import ModelCard, ModelList
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


def _model_card(state: GatewayState) -> ModelCard:
    engine = state.require_engine()
    return ModelCard(id=state.settings.model_name, created=state.created, max_model_len=engine.max_model_len)


async def list_models(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    return Response(ModelList(data=[_model_card(state)]).model_dump_json(), media_type="application/json")


async def retrieve_model(request: Request) -> Response:
    """The route takes the rest of the path: Hub ids hold a slash (the SDK sends it as %2F, which arrives decoded)."""
    state: GatewayState = request.app.state.gateway
    model_id = request.path_params["model_id"]
    served = state.settings.model_name
    if model_id != served:
        message = f"The model `{model_id}` does not exist. This server serves: `{served}`."
        raise APIError(404, message, param="model", code="model_not_found")
    return Response(_model_card(state).model_dump_json(), media_type="application/json")
