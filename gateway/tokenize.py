"""POST /tokenize and POST /detokenize, shaped as vLLM serves them: a text or chat prompt -> token ids, and back.

Request and response models live here with their routes (they are vLLM's extension, not OpenAI's protocol).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from gateway.body import parse_body, parse_json, read_body
from gateway.errors import from_engine_error
from gateway.protocol import ChatMessage, StrictModel, check_model
from gateway.state import GatewayState


class TokenizeCompletionRequest(StrictModel):
    model: str | None = Field(None, description="The served model name; optional")
    prompt: str
    add_special_tokens: bool = Field(True, description="Add the model's special tokens (BOS) as /v1/completions does")
    return_token_strs: bool = Field(False, description="Also return each token's text")


class TokenizeChatRequest(StrictModel):
    model: str | None = Field(None, description="The served model name; optional")
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = Field(True, description="End with the assistant turn's opening, as chat completions do")
    add_special_tokens: bool = Field(False, description="Add special tokens on top of those the chat template writes")
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    model: str | None = Field(None, description="The served model name; optional")
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


async def _parse_tokenize(request: Request, max_bytes: int) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """A body with `messages` is a chat request, any other a text one (each then validated strictly)."""
    body = await read_body(request, max_bytes)
    try:
        parsed = json.loads(body)
    except ValueError:  # not JSON: the strict parse below says so
        parsed = None
    is_chat = isinstance(parsed, dict) and "messages" in parsed
    return parse_json(body, TokenizeChatRequest if is_chat else TokenizeCompletionRequest)


async def tokenize(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    body = await _parse_tokenize(request, state.settings.max_body_bytes)
    if body.model is not None:
        check_model(body.model, state.settings.model_name)
    engine = state.require_engine()
    if isinstance(body, TokenizeChatRequest):
        prompt: str | list[dict[str, str]] = [message.as_engine_message(i) for i, message in enumerate(body.messages)]
        add_generation_prompt = body.add_generation_prompt
    else:
        prompt, add_generation_prompt = body.prompt, True
    try:  # long prompts take a while: off the event loop
        token_ids = await asyncio.to_thread(
            engine.tokenize, prompt, add_special_tokens=body.add_special_tokens, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:
        raise from_engine_error(exc, state.settings.retry_after_s) from exc
    token_strs = engine.token_texts(token_ids) if body.return_token_strs else None
    result = TokenizeResponse(count=len(token_ids), max_model_len=engine.max_model_len, tokens=token_ids, token_strs=token_strs)
    return Response(result.model_dump_json(exclude_none=True), media_type="application/json")


async def detokenize(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    body = await parse_body(request, DetokenizeRequest, state.settings.max_body_bytes)
    if body.model is not None:
        check_model(body.model, state.settings.model_name)
    engine = state.require_engine()
    try:
        text = await asyncio.to_thread(engine.detokenize, body.tokens)
    except Exception as exc:
        raise from_engine_error(exc, state.settings.retry_after_s) from exc
    return Response(DetokenizeResponse(prompt=text).model_dump_json(), media_type="application/json")
