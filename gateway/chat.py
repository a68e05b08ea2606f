"""POST /v1/chat/completions: same shape as completions; the engine renders the messages with the model's chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from engine import TokenLogprobs
from gateway.body import parse_body
from gateway.protocol import ChatCompletionRequest
from gateway.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    DeltaMessage,
    UsageInfo,
    chat_logprobs,
    public_finish_reason,
)
from gateway.state import GatewayState
from gateway.streaming import EngineRequests, collect_unless_disconnected, sse_events, sse_response, submit


@dataclass(frozen=True)
class _Reply:
    """What every chunk of one response shares."""

    id: str
    created: int
    model: str
    has_logprobs: bool
    system_fingerprint: str

    def chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.system_fingerprint,
        )

    def logprobs(self, entries: list[TokenLogprobs] | None) -> ChatLogprobs | None:
        return chat_logprobs(entries or []) if self.has_logprobs else None


async def create_chat_completion(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    body = await parse_body(request, ChatCompletionRequest, state.settings.max_body_bytes)
    messages = body.engine_messages()
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = await submit(state, response_id, body, [messages])
    fingerprint = state.system_fingerprint(state.require_engine())
    reply = _Reply(response_id, int(time.time()), state.settings.model_name, body.logprobs, fingerprint)
    if body.stream:
        chunks = _stream_chunks(requests, reply, body.n, body.include_usage)
        return sse_response(sse_events(requests, chunks, state.settings.retry_after_s))
    result = await collect_unless_disconnected(request, requests, body.n, body.n)
    if result is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    totals, usages = result
    choices = [
        ChatChoice(
            index=index,
            message=ChatMessageOut(content=total.text),
            logprobs=reply.logprobs(total.logprobs),
            finish_reason=public_finish_reason(total.finish_reason),
        )
        for index, total in enumerate(totals)
    ]
    response = ChatCompletionResponse(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=choices,
        usage=UsageInfo.total(usages),
        system_fingerprint=reply.system_fingerprint,
    )
    return Response(response.model_dump_json(), media_type="application/json")


async def _stream_chunks(
    requests: EngineRequests, reply: _Reply, n: int, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    for index in range(n):  # the first delta of each choice carries the role
        yield reply.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
    usages = []
    async for _, output in requests.outputs():
        for delta in output.outputs:
            logprobs = reply.logprobs(delta.logprobs)
            if delta.text or delta.finish_reason or (logprobs is not None and logprobs.content):
                choice = ChatChunkChoice(
                    index=delta.index,
                    delta=DeltaMessage(content=delta.text),
                    logprobs=logprobs,
                    finish_reason=public_finish_reason(delta.finish_reason),
                )
                yield reply.chunk([choice])
        if output.usage is not None:
            usages.append(output.usage)
    if include_usage:
        yield reply.chunk([], UsageInfo.total(usages))
