"""POST /v1/responses and its GET / DELETE / input_items / cancel routes: OpenAI's Responses API as a translation layer.

A request's items (after the stored conversation of previous_response_id) become the chat request chat.py builds and go
down chat's one path to the engine (gateway/response_input.py); the deltas come back as output items and stream events
(gateway/response_output.py). The store (gateway/response_store.py) keeps each response with its input, per API key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import CompletionOutput, InvalidRequestError, Usage
from gateway.body import parse_body
from gateway.chat import submit_chat
from gateway.errors import APIError, bad_request, from_engine_error
from gateway.protocol import ChatCompletionRequest
from gateway.response_input import (
    ChatTools,
    chat_messages,
    chat_request,
    chat_tools,
    check_unsupported,
    input_items,
    load_history,
    rename_param,
)
from gateway.response_output import Event, OutputBuilder
from gateway.response_store import ResponseStoreError, ResponseTooLargeError, StoredResponse, owner_of
from gateway.responses_protocol import (
    DeletedResponse,
    IncompleteDetails,
    InputItemList,
    InputTokensDetails,
    OutputTokensDetails,
    ReasoningOptions,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
)
from gateway.state import GatewayState
from gateway.streaming import SSE_SEPARATOR, EngineRequests, collect_unless_disconnected, sse_response
from gateway.tool_parsers import ToolFormat

_MAX_PAGE = 100
logger = logging.getLogger(__name__)


def _store_failed(exc: ResponseStoreError) -> APIError:
    return APIError(503, f"The response store failed: {exc}", code="store_unavailable")


def _owner(request: Request, state: GatewayState) -> str:
    """Who stored responses belong to: the caller's key (the middleware has checked it), or "" without keys."""
    if not state.settings.api_keys:
        return ""
    _, _, key = request.headers.get("authorization", "").partition(" ")
    return owner_of(key.strip())


@dataclass
class _Turn:
    """One response being made: the request, its id, its stored input and the chat request it became."""

    body: ResponsesRequest
    id: str
    created_at: float
    owner: str
    items: list[dict[str, Any]]
    chat: ChatCompletionRequest
    tools: ChatTools

    def response(
        self,
        status: ResponseStatus,
        builder: OutputBuilder | None = None,
        usage: Usage | None = None,
        error: APIError | None = None,
    ) -> ResponseObject:
        body = self.body
        text_format = body.text.format if body.text is not None and body.text.format is not None else None
        text_format_json = text_format.model_dump(by_alias=True, exclude_none=True) if text_format else {"type": "text"}
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
        return ResponseObject(
            id=self.id,
            created_at=int(self.created_at),
            status=status,
            background=body.background,
            error=ResponseError(code=error.code or "server_error", message=error.message) if error is not None else None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=body.model,
            output=list(builder.items) if builder is not None else [],
            parallel_tool_calls=body.parallel_tool_calls is not False,
            previous_response_id=body.previous_response_id,
            reasoning=body.reasoning or ReasoningOptions(),
            service_tier="default",
            store=body.store,
            temperature=1.0 if body.temperature is None else body.temperature,
            text={"format": text_format_json},
            tool_choice=choice if isinstance(choice, str) else choice.model_dump(),
            tools=[tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in body.tools or []],
            top_p=1.0 if body.top_p is None else body.top_p,
            truncation="disabled",
            usage=_usage(usage) if usage is not None else None,
            user=body.user,
            metadata=body.metadata or {},
        )

    def finished(self, builder: OutputBuilder, usage: Usage | None) -> ResponseObject:
        return self.response("incomplete" if builder.is_cut else "completed", builder, usage)

    def builder(self, tool_format: ToolFormat | None) -> OutputBuilder:
        return OutputBuilder(tool_format, self.tools.namespaces)

    async def store(self, state: GatewayState, response: ResponseObject) -> None:
        """Keep the response and its input (when the request asked to be stored); store errors as API errors."""
        if not self.body.store:
            return
        record = StoredResponse(
            self.id, self.owner, response.model_dump(mode="json"), self.items, self.body.previous_response_id, self.created_at
        )
        try:
            await state.require_store().put(record)
        except ResponseTooLargeError as exc:
            raise bad_request(f"The response is too large to store ({exc}); set store to false", param="store") from exc
        except ResponseStoreError as exc:
            raise _store_failed(exc) from exc


def _usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        total_tokens=usage.total_tokens,
    )


async def _read_turn(request: Request, state: GatewayState) -> _Turn:
    body = await parse_body(request, ResponsesRequest, state.settings.max_body_bytes)
    check_unsupported(body)
    owner = _owner(request, state)
    store = state.require_store()
    try:
        history = await load_history(store, body.previous_response_id, owner) if body.previous_response_id else []
    except ResponseStoreError as exc:
        raise _store_failed(exc) from exc
    items = input_items(body, history)
    tools = chat_tools(body, rejects_hosted=state.settings.responses_hosted_tools == "reject")
    chat = chat_request(body, chat_messages(body.instructions, [*history, *items]), tools)
    return _Turn(body, f"resp_{uuid.uuid4().hex}", time.time(), owner, items, chat, tools)


async def _submit(state: GatewayState, turn: _Turn) -> tuple[EngineRequests, ToolFormat | None]:
    try:
        return await submit_chat(state, turn.id, turn.chat)
    except (APIError, InvalidRequestError) as exc:
        raise rename_param(from_engine_error(exc, state.settings.retry_after_s)) from None


async def create_response(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    state.metrics.received.labels("responses").inc()
    turn = await _read_turn(request, state)
    if turn.body.background:
        return await _start_background(state, turn)
    requests, tool_format = await _submit(state, turn)
    builder = turn.builder(tool_format)
    if turn.body.stream:
        return sse_response(_stream(state, turn, requests, builder))
    result = await collect_unless_disconnected(request, requests, 1, 1)
    if result is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    totals, usages = result
    builder.feed(CompletionOutput(index=0, text=totals[0].text, finish_reason=totals[0].finish_reason or "stop"))
    response = turn.finished(builder, usages[0] if usages else None)
    await turn.store(state, response)
    return Response(response.model_dump_json(), media_type="application/json")


def _sse(event: Event, sequence_number: int) -> ServerSentEvent:
    """One event: the `event:` line is its type, and its data carries a strictly increasing sequence_number."""
    return ServerSentEvent(data=json.dumps({**event, "sequence_number": sequence_number}), event=event["type"], sep=SSE_SEPARATOR)


async def _stream(
    state: GatewayState, turn: _Turn, requests: EngineRequests, builder: OutputBuilder
) -> AsyncIterator[ServerSentEvent]:
    numbers = itertools.count()
    started = turn.response("in_progress").model_dump(mode="json")
    yield _sse({"type": "response.created", "response": started}, next(numbers))
    yield _sse({"type": "response.in_progress", "response": started}, next(numbers))
    usage: Usage | None = None
    try:
        with requests.guard():
            async for _, output in requests.outputs():
                for delta in output.outputs:
                    for event in builder.feed(delta):
                        yield _sse(event, next(numbers))
                usage = output.usage or usage
        final = turn.finished(builder, usage)
        await turn.store(state, final)
    except Exception as exc:  # after the first event the status is sent: the failure becomes the stream's last events
        error = from_engine_error(exc, state.settings.retry_after_s)
        failed = turn.response("failed", builder, usage, error)
        yield _sse({"type": "response.failed", "response": failed.model_dump(mode="json")}, next(numbers))
        return
    kind = "response.completed" if final.status == "completed" else "response.incomplete"
    yield _sse({"type": kind, "response": final.model_dump(mode="json")}, next(numbers))


# --- background responses ----------------------------------------------------------------------------------------


async def _start_background(state: GatewayState, turn: _Turn) -> Response:
    """Store it queued, answer at once; a task on this server generates it and stores each status it reaches."""
    queued = turn.response("queued")
    await turn.store(state, queued)
    state.background[turn.id] = asyncio.create_task(_run_background(state, turn), name=f"sirocco-{turn.id}")
    return Response(queued.model_dump_json(), media_type="application/json")


async def _run_background(state: GatewayState, turn: _Turn) -> None:
    """Generate, storing in_progress, then the status it ends with; nobody awaits this task, so store failures are logged."""
    builder: OutputBuilder | None = None
    usage: Usage | None = None
    try:
        requests, tool_format = await _submit(state, turn)
        builder = turn.builder(tool_format)
        await turn.store(state, turn.response("in_progress"))
        with requests.guard():
            async for _, output in requests.outputs():
                for delta in output.outputs:
                    builder.feed(delta)
                usage = output.usage or usage
        final = turn.finished(builder, usage)
    except asyncio.CancelledError:
        final = turn.response("cancelled", builder, usage)
    except Exception as exc:
        final = turn.response("failed", builder, usage, from_engine_error(exc, state.settings.retry_after_s))
    try:
        await turn.store(state, final)
    except APIError as exc:
        logger.error("background response %s ended %s but could not be stored: %s", turn.id, final.status, exc.message)
    finally:
        state.background.pop(turn.id, None)


async def stop_background_responses(state: GatewayState) -> None:
    """At shutdown: cancel what still runs (each stores itself as cancelled)."""
    tasks = list(state.background.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- stored responses --------------------------------------------------------------------------------------------


async def _stored(request: Request) -> tuple[GatewayState, StoredResponse]:
    """The caller's stored response named in the path; 404 when missing, expired or another key's."""
    state: GatewayState = request.app.state.gateway
    response_id = request.path_params["response_id"]
    try:
        record = await state.require_store().get(response_id, _owner(request, state))
    except ResponseStoreError as exc:
        raise _store_failed(exc) from exc
    if record is None:
        raise APIError(404, f"Response with id {response_id!r} not found.", param="response_id", code="response_not_found")
    return state, record


async def retrieve_response(request: Request) -> Response:
    if request.query_params.get("stream", "false").lower() == "true":
        raise bad_request("streaming a stored response again is not supported by this server", param="stream")
    _, record = await _stored(request)
    return JSONResponse(record.response)


async def delete_response(request: Request) -> Response:
    state, record = await _stored(request)
    task = state.background.get(record.response_id)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    try:
        await state.require_store().delete(record.response_id, record.owner)
    except ResponseStoreError as exc:
        raise _store_failed(exc) from exc
    return Response(DeletedResponse(id=record.response_id).model_dump_json(), media_type="application/json")


async def cancel_response(request: Request) -> Response:
    state, record = await _stored(request)
    if not record.response.get("background"):
        raise bad_request("Only background responses can be cancelled.", param="response_id")
    task = state.background.get(record.response_id)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        _, record = await _stored(request)
    return JSONResponse(record.response)


async def list_input_items(request: Request) -> Response:
    """A page of the response's input items, OpenAI's list shape: limit (1..100), order (desc by default), after."""
    _, record = await _stored(request)
    params = request.query_params
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        raise bad_request("limit must be an integer", param="limit") from None
    if not 1 <= limit <= _MAX_PAGE:
        raise bad_request(f"limit must be between 1 and {_MAX_PAGE}", param="limit")
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be asc or desc", param="order")
    items = record.input_items if order == "asc" else record.input_items[::-1]
    start = 0
    if "after" in params:
        ids = [item.get("id") for item in items]
        if params["after"] not in ids:
            raise bad_request(f"after names no input item of this response: {params['after']!r}", param="after")
        start = ids.index(params["after"]) + 1
    page = items[start : start + limit]
    listing = InputItemList(
        data=page,
        first_id=page[0].get("id") if page else None,
        last_id=page[-1].get("id") if page else None,
        has_more=start + limit < len(items),
    )
    return Response(listing.model_dump_json(), media_type="application/json")
