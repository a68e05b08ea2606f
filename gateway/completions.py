"""POST /v1/completions: validate, submit one engine request per prompt, answer with JSON or an SSE stream.

With echo the prompt's text comes first; with echo and logprobs its logprobs too (the first token's null), as
lm-evaluation-harness reads them to score a text (echo, max_tokens 0, logprobs k).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from engine import EngineClient, TokenLogprobs
from gateway.body import parse_body
from gateway.protocol import CompletionRequest
from gateway.replies import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ReplyHead,
    UsageInfo,
    completion_logprobs,
    public_finish_reason,
)
from gateway.state import GatewayState
from gateway.streaming import EngineRequests, collect_unless_disconnected, sse_events, sse_response, submit


@dataclass(frozen=True)
class _Reply(ReplyHead):
    """What every chunk of one response shares."""

    n: int
    echoes: list[str]  # per prompt: its text when echo is on, else ""
    has_logprobs: bool

    def chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
        return self.envelope(CompletionResponse, choices, usage)

    def logprobs(self, entries: list[TokenLogprobs] | None, text_offset: int) -> CompletionLogprobs | None:
        return completion_logprobs(entries or [], text_offset) if self.has_logprobs else None


def _prompt_text(engine: EngineClient, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else engine.decode(prompt)


def _echo_logprobs(
    engine: EngineClient, prompt_token_ids: list[int], entries: list[TokenLogprobs | None] | None
) -> CompletionLogprobs:
    """The echoed prompt's logprobs, from offset 0; `entries` has one per prompt token, the first None."""
    first_token = engine.token_texts(prompt_token_ids[:1])[0] if prompt_token_ids else ""
    return completion_logprobs(entries or [], 0, first_token)


def _concat(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


async def create_completion(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    state.metrics.received.labels("completions").inc()
    body = await parse_body(request, CompletionRequest, state.settings.max_body_bytes)
    prompts = body.prompts()
    response_id = f"cmpl-{uuid.uuid4().hex}"
    requests = await submit(state, response_id, body, prompts)
    engine = state.require_engine()
    echoes = [_prompt_text(engine, prompt) if body.echo else "" for prompt in prompts]
    has_logprobs = body.logprobs is not None
    fingerprint = state.system_fingerprint(engine)
    reply = _Reply(response_id, int(time.time()), body.model, fingerprint, n=body.n, echoes=echoes, has_logprobs=has_logprobs)
    if body.stream:
        chunks = _stream_chunks(requests, reply, body.include_usage, engine)
        return sse_response(sse_events(requests, chunks, state.settings.retry_after_s))
    result = await collect_unless_disconnected(request, requests, len(prompts) * body.n, body.n)
    if result is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    totals, usages = result
    choices = []
    for index, total in enumerate(totals):
        echo = echoes[index // body.n]
        logprobs = reply.logprobs(total.logprobs, len(echo))
        if logprobs is not None and body.echo:
            logprobs = _concat(_echo_logprobs(engine, total.prompt_token_ids, total.prompt_logprobs), logprobs)
        text = echo + total.text
        choices.append(
            CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=public_finish_reason(total.finish_reason))
        )
    return Response(reply.chunk(choices, UsageInfo.total(usages)).model_dump_json(), media_type="application/json")


async def _stream_chunks(
    requests: EngineRequests, reply: _Reply, include_usage: bool, engine: EngineClient
) -> AsyncIterator[CompletionResponse]:
    offsets = [len(echo) for echo in reply.echoes for _ in range(reply.n)]  # where each choice's next token starts
    is_echoed = [not echo for echo in reply.echoes]
    usages = []
    async for prompt_index, output in requests.outputs():
        if not is_echoed[prompt_index]:  # a prompt's first delta carries its logprobs (when asked): echo it with them
            is_echoed[prompt_index] = True
            echo = reply.echoes[prompt_index]
            logprobs = _echo_logprobs(engine, output.prompt_token_ids, output.prompt_logprobs) if reply.has_logprobs else None
            for i in range(reply.n):
                yield reply.chunk([CompletionChoice(index=prompt_index * reply.n + i, text=echo, logprobs=logprobs)])
        for delta in output.outputs:
            index = prompt_index * reply.n + delta.index
            logprobs = reply.logprobs(delta.logprobs, offsets[index])
            offsets[index] += sum(len(entry.sampled.token) for entry in delta.logprobs or [])
            if delta.text or delta.finish_reason or (logprobs is not None and logprobs.tokens):
                finish_reason = public_finish_reason(delta.finish_reason)
                yield reply.chunk(
                    [CompletionChoice(index=index, text=delta.text, logprobs=logprobs, finish_reason=finish_reason)]
                )
        if output.usage is not None:
            usages.append(output.usage)
    if include_usage:
        yield reply.chunk([], UsageInfo.total(usages))
