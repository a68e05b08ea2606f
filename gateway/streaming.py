"""Engine requests of one HTTP request: start, merge, collect or stream as SSE events, abort on disconnect.

The first delta of every engine request is awaited before any response starts, so submission errors keep their status;
after that a failure is one final SSE error event. Whatever ends a stream, unfinished engine requests are aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.types import Message, Send

from engine import (
    EngineClient,
    InvalidRequestError,
    Prompt,
    RequestFailedError,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    Usage,
)
from gateway.constraints import Constraint, request_constraint
from gateway.errors import bad_request, error_body, from_engine_error
from gateway.metrics import Metrics, RequestTimer
from gateway.protocol import GenerationRequest, check_model
from gateway.state import GatewayState

logger = logging.getLogger(__name__)

# OpenAI frames each event as `data: ...\n\n`; sse-starlette's default line separator is \r\n, and an event built
# without a `sep` keeps that default whatever the response's, so both are set from this one constant.
SSE_SEPARATOR = "\n"


async def _first_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise RequestFailedError("the engine ended the request without output") from None


class EngineRequests:
    """One engine request per prompt, with the same params; choice `i` of prompt `p` is choice `p * n + i`."""

    def __init__(
        self, engine: EngineClient, metrics: Metrics, request_id: str, prompts: Sequence[Prompt], params: SamplingParams
    ) -> None:
        self._engine = engine
        self.ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        self._streams = [engine.generate(rid, prompt, params) for rid, prompt in zip(self.ids, prompts, strict=True)]
        self._timers = [RequestTimer(metrics) for _ in prompts]
        self._is_finished = [False] * len(prompts)
        self._first: list[RequestOutput] = []

    async def start(self) -> None:
        """Await every request's first delta; on any error abort them all and raise it."""
        tasks = [asyncio.ensure_future(_first_output(stream)) for stream in self._streams]
        try:
            self._first = list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._is_finished = [True] * len(self._streams)  # failed at submission: nothing to count or abort
            raise

    def _note(self, index: int, output: RequestOutput) -> tuple[int, RequestOutput]:
        self._timers[index].observe(output)
        self._is_finished[index] = self._is_finished[index] or output.finished
        return index, output

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) pairs, first deltas first, then as they come."""
        for index, output in enumerate(self._first):
            yield self._note(index, output)
        if len(self._streams) == 1:
            if not self._is_finished[0]:
                async for output in self._streams[0]:
                    yield self._note(0, output)
            return
        async for index, output in self._merged():
            yield self._note(index, output)

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for output in self._streams[index]:
                    queue.put_nowait((index, output, None))
                queue.put_nowait((index, None, None))
            except Exception as exc:
                queue.put_nowait((index, None, exc))

        tasks = [asyncio.ensure_future(pump(i)) for i, done in enumerate(self._is_finished) if not done]
        try:
            num_open = len(tasks)
            while num_open:
                index, output, error = await queue.get()
                if error is not None:
                    raise error
                if output is None:
                    num_open -= 1
                else:
                    yield index, output
        finally:
            for task in tasks:
                task.cancel()

    def close(self, reason: str) -> None:
        """Abort every unfinished request (synchronously: this runs inside cancelled generators)."""
        for index, request_id in enumerate(self.ids):
            if not self._is_finished[index]:
                self._is_finished[index] = True
                self._engine.abort(request_id)
                self._timers[index].finish(reason)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around consuming outputs(): errors count as "error", cancellation or an early exit as "abort"."""
        try:
            yield
        except Exception:
            self.close("error")
            raise
        finally:
            self.close("abort")


async def submit(
    state: GatewayState,
    request_id: str,
    body: GenerationRequest,
    prompts: Sequence[Prompt],
    tool_constraint: Constraint | None = None,
    skip_special_tokens: bool = True,
) -> EngineRequests:
    """Check the body against the server, then start one engine request per prompt (engine errors raise here).

    The output is constrained by `tool_constraint` or else by the body's response_format / structured_outputs.
    """
    settings = state.settings
    if settings.log_requests:  # opt-in only: bodies and prompts may hold private data
        logger.info("request %s body %s", request_id, body.model_dump_json(exclude_none=True, by_alias=True))
    adapter = check_model(body.model, settings.model_name, state.lora_names)
    body.check(settings)
    constraint = tool_constraint or request_constraint(body)
    structured = constraint.outputs if constraint is not None else None
    params = body.sampling_params(settings.max_tokens_limit, structured, skip_special_tokens)
    params.lora = adapter
    if adapter is not None:
        state.metrics.lora_requests.labels(adapter).inc()
    requests = EngineRequests(state.require_engine(), state.metrics, request_id, prompts, params)
    try:
        await requests.start()
    except InvalidRequestError as exc:
        if constraint is not None and exc.param == "structured_outputs":  # name the field the grammar came from
            raise bad_request(str(exc), param=constraint.param, code="invalid_value") from exc
        raise
    return requests


@dataclass
class ChoiceTotal:
    """A whole choice, joined from its deltas."""

    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # when asked (echo with logprobs)


async def collect(requests: EngineRequests, num_choices: int, n: int) -> tuple[list[ChoiceTotal], list[Usage]]:
    """Join every delta into whole choices (index p * n + i) and the usage of each engine request."""
    choices = [ChoiceTotal() for _ in range(num_choices)]
    usages: list[Usage] = []
    with requests.guard():
        async for prompt_index, output in requests.outputs():
            for choice in choices[prompt_index * n : (prompt_index + 1) * n]:
                choice.prompt_token_ids = output.prompt_token_ids
                choice.prompt_logprobs = output.prompt_logprobs or choice.prompt_logprobs
            for delta in output.outputs:
                choice = choices[prompt_index * n + delta.index]
                choice.text += delta.text
                choice.logprobs.extend(delta.logprobs or [])
                choice.finish_reason = delta.finish_reason or choice.finish_reason
            if output.usage is not None:
                usages.append(output.usage)
    return choices, usages


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_unless_disconnected(
    request: Request, requests: EngineRequests, num_choices: int, n: int
) -> tuple[list[ChoiceTotal], list[Usage]] | None:
    """collect(), but a client that hangs up first cancels it (its requests are aborted); None then."""
    collecting = asyncio.ensure_future(collect(requests, num_choices, n))
    watching = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
    return None if collecting.cancelled() else collecting.result()


async def sse_events(
    requests: EngineRequests, chunks: AsyncIterator[BaseModel], retry_after_s: int
) -> AsyncIterator[ServerSentEvent]:
    """Chunks as `data:` events, then `[DONE]`; a failure is one final error event instead."""
    try:
        async for chunk in chunks:
            yield _event(chunk.model_dump_json())
    except Exception as exc:
        requests.close("error")
        yield _event(json.dumps(error_body(from_engine_error(exc, retry_after_s))))
        return
    finally:
        requests.close("abort")  # a no-op once every request has finished
    yield _event("[DONE]")


def _event(data: str) -> ServerSentEvent:
    return ServerSentEvent(data=data, sep=SSE_SEPARATOR)


class _EventStream(EventSourceResponse):
    """EventSourceResponse without a per-event cancel scope when there is no send timeout (the default here).

    sse-starlette wraps every send in anyio.move_on_after(send_timeout), even for None: a quarter of the server's CPU per
    streamed token went there. With no timeout the scope can never fire, so sending directly is the same behaviour.
    """

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def sse_response(events: AsyncIterator[ServerSentEvent], headers: dict[str, str] | None = None) -> EventSourceResponse:
    return _EventStream(events, headers=headers, sep=SSE_SEPARATOR)
