"""POST /v1/load_lora_adapter {lora_name, lora_path} and POST /v1/unload_lora_adapter {lora_name}, shaped like vLLM's.

Both answer 404 unless enable_lora_runtime_updates is on (loading reads any path the server can read, so it is opt-in).
A bad adapter or a taken name is a 400 naming why; unloading a name not served is a 404 naming what is.
"""

from __future__ import annotations

from pydantic import Field
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from engine import LoraClient, LoraError
from gateway.body import parse_body
from gateway.errors import APIError, bad_request
from gateway.protocol import StrictModel
from gateway.state import GatewayState


class LoadLoraRequest(StrictModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(StrictModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's clients may send it; names identify adapters here


def _lora_engine(state: GatewayState) -> LoraClient:
    if not state.settings.enable_lora_runtime_updates:
        message = "Loading and unloading LoRA adapters at runtime is off (set SIROCCO_ENABLE_LORA_RUNTIME_UPDATES=true)."
        raise APIError(404, message, code="not_found")
    engine = state.require_engine()
    if not isinstance(engine, LoraClient):
        raise APIError(404, "This engine serves no LoRA adapters.", code="not_found")
    return engine


async def load_lora_adapter(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    engine = _lora_engine(state)
    body = await parse_body(request, LoadLoraRequest, state.settings.max_body_bytes)
    if body.lora_name == state.settings.model_name:
        raise bad_request(f"`{body.lora_name}` is the base model's name", param="lora_name", code="invalid_value")
    try:
        await engine.load_lora_adapter(body.lora_name, body.lora_path)
    except LoraError as exc:
        raise bad_request(str(exc), param="lora_path", code="invalid_value") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    engine = _lora_engine(state)
    body = await parse_body(request, UnloadLoraRequest, state.settings.max_body_bytes)
    if body.lora_name not in engine.lora_names:
        served = ", ".join(f"`{name}`" for name in engine.lora_names) or "none"
        message = f"The LoRA adapter `{body.lora_name}` is not loaded (loaded: {served})."
        raise APIError(404, message, param="lora_name", code="model_not_found")
    try:
        await engine.unload_lora_adapter(body.lora_name)
    except LoraError as exc:  # unloaded meanwhile by another call
        raise APIError(404, str(exc), param="lora_name", code="model_not_found") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
