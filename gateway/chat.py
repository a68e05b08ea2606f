"""POST /v1/chat/completions: same shape as completions; the engine renders the messages with the model's chat template.

With tools, each choice's text goes through the model format's tool-call parser (gateway/tool_parsers.py): calls
become `tool_calls` (whole, or as stream deltas) and the finish reason `tool_calls`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from engine import ChatTemplateInfo, CompletionOutput, TokenLogprobs
from gateway.body import parse_body
from gateway.constraints import tool_constraint
from gateway.protocol import ChatCompletionRequest
from gateway.replies import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    DeltaMessage,
    FunctionCallDelta,
    FunctionCallOut,
    ReplyHead,
    ToolCallDelta,
    ToolCallOut,
    UsageInfo,
    chat_finish_reason,
    chat_logprobs,
)
from gateway.state import GatewayState
from gateway.streaming import ChoiceTotal, EngineRequests, collect_unless_disconnected, sse_events, sse_response, submit
from gateway.tool_parsers import MISTRAL, ParsedEvents, ToolCall, ToolCallParser, ToolFormat, parse_tool_calls
from gateway.tool_prompt import build_chat_prompt

_NO_TEMPLATE_INFO = ChatTemplateInfo(renders_tools=False, has_tool_calls_token=False)


@dataclass(frozen=True)
class _Reply(ReplyHead):
    """What every chunk of one response shares."""

    has_logprobs: bool
    tool_format: ToolFormat | None  # None: the output is not parsed for tool calls

    def chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return self.envelope(ChatCompletionChunk, choices, usage)

    def logprobs(self, entries: list[TokenLogprobs] | None) -> ChatLogprobs | None:
        return chat_logprobs(entries or []) if self.has_logprobs else None


async def create_chat_completion(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    state.metrics.received.labels("chat_completions").inc()
    body = await parse_body(request, ChatCompletionRequest, state.settings.max_body_bytes)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests, tool_format = await submit_chat(state, response_id, body)
    fingerprint = state.system_fingerprint(state.require_engine())
    reply = _Reply(response_id, int(time.time()), body.model, fingerprint, has_logprobs=body.logprobs, tool_format=tool_format)
    if body.stream:
        chunks = _stream_chunks(requests, reply, body.n, body.include_usage)
        return sse_response(sse_events(requests, chunks, state.settings.retry_after_s))
    result = await collect_unless_disconnected(request, requests, body.n, body.n)
    if result is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    totals, usages = result
    choices = [_choice(reply, index, total) for index, total in enumerate(totals)]
    response = reply.envelope(ChatCompletionResponse, choices, UsageInfo.total(usages))
    return Response(response.model_dump_json(), media_type="application/json")


async def submit_chat(
    state: GatewayState, request_id: str, body: ChatCompletionRequest
) -> tuple[EngineRequests, ToolFormat | None]:
    """Render the messages (with tools), constrain calls, start the engine request; the format calls are parsed in.

    The one path from a chat request to the engine: /v1/responses builds a ChatCompletionRequest and comes here too.
    """
    info = state.engine.chat_template_info if state.engine is not None else _NO_TEMPLATE_INFO
    chat_prompt = build_chat_prompt(body, state.settings.tool_call_parser, info)
    tool_format = chat_prompt.tool_format if body.calls_tools else None
    constraint = tool_constraint(body, chat_prompt.tool_format)
    keeps_special = tool_format is MISTRAL and info.has_tool_calls_token  # [TOOL_CALLS] is a special token there
    requests = await submit(state, request_id, body, [chat_prompt.prompt], constraint, skip_special_tokens=not keeps_special)
    return requests, tool_format


def _choice(reply: _Reply, index: int, total: ChoiceTotal) -> ChatChoice:
    content: str | None = total.text
    tool_calls = None
    if reply.tool_format is not None:
        parsed = parse_tool_calls(total.text, reply.tool_format)
        content = parsed.content
        tool_calls = [_tool_call_out(call) for call in parsed.calls] or None
    return ChatChoice(
        index=index,
        message=ChatMessageOut(content=content, tool_calls=tool_calls),
        logprobs=reply.logprobs(total.logprobs),
        finish_reason=chat_finish_reason(total.finish_reason, tool_calls is not None),
    )


def _tool_call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


def _parse_delta(parser: ToolCallParser | None, delta: CompletionOutput) -> ParsedEvents:
    """The delta's content and completed calls (all text is content without a parser)."""
    if parser is None:
        return ParsedEvents(delta.text)
    events = parser.feed(delta.text)
    if delta.finish_reason is None:
        return events
    last = parser.finish()
    return ParsedEvents(events.content + last.content, events.calls + last.calls)


def _call_deltas(first_index: int, calls: tuple[ToolCall, ...]) -> list[DeltaMessage]:
    """Each call as two deltas: id, type and name (arguments ""), then its arguments."""
    deltas = []
    for index, call in enumerate(calls, start=first_index):
        start = ToolCallDelta(index=index, id=call.id, type="function", function=FunctionCallDelta(name=call.name, arguments=""))
        deltas.append(DeltaMessage(tool_calls=[start]))
        deltas.append(DeltaMessage(tool_calls=[ToolCallDelta(index=index, function=FunctionCallDelta(arguments=call.arguments))]))
    return deltas


async def _stream_chunks(
    requests: EngineRequests, reply: _Reply, n: int, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    for index in range(n):  # the first delta of each choice carries the role
        yield reply.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
    usages = []
    parsers = {i: ToolCallParser(reply.tool_format) for i in range(n)} if reply.tool_format is not None else {}
    num_calls = [0] * n
    async for _, output in requests.outputs():
        for delta in output.outputs:
            events = _parse_delta(parsers.get(delta.index), delta)
            messages = _call_deltas(num_calls[delta.index], events.calls)
            num_calls[delta.index] += len(events.calls)
            logprobs = reply.logprobs(delta.logprobs)
            has_logprobs = logprobs is not None and bool(logprobs.content)
            if events.content or has_logprobs or (delta.finish_reason and not messages):
                messages.insert(0, DeltaMessage(content=events.content))
            finish_reason = chat_finish_reason(delta.finish_reason, num_calls[delta.index] > 0)
            for position, message in enumerate(messages):
                is_last = position == len(messages) - 1
                choice = ChatChunkChoice(
                    index=delta.index,
                    delta=message,
                    logprobs=logprobs if position == 0 else None,
                    finish_reason=finish_reason if is_last else None,
                )
                yield reply.chunk([choice])
        if output.usage is not None:
            usages.append(output.usage)
    if include_usage:
        yield reply.chunk([], UsageInfo.total(usages))
