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


def _model_cards(state: GatewayState) -> list[ModelCard]:
    """The served model, then its LoRA adapters (parent: the served model)."""
    engine, base = state.require_engine(), state.settings.model_name
    cards = [ModelCard(id=base, created=state.created, max_model_len=engine.max_model_len)]
    for name in state.lora_names:
        cards.append(ModelCard(id=name, created=state.created, max_model_len=engine.max_model_len, parent=base))
    return cards


async def list_models(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    return Response(ModelList(data=_model_cards(state)).model_dump_json(exclude_none=True), media_type="application/json")


async def retrieve_model(request: Request) -> Response:
    """The route takes the rest of the path: Hub ids hold a slash (the SDK sends it as %2F, which arrives decoded)."""
    state: GatewayState = request.app.state.gateway
    model_id = request.path_params["model_id"]
    cards = {card.id: card for card in _model_cards(state)}
    if model_id not in cards:
        message = f"The model `{model_id}` does not exist. This server serves: {', '.join(f'`{name}`' for name in cards)}."
        raise APIError(404, message, param="model", code="model_not_found")
    return Response(cards[model_id].model_dump_json(exclude_none=True), media_type="application/json")
