"""AsyncEngine: the engine client the gateway sees (engine.EngineClient). It streams deltas to asyncio callers from an
EngineCore that a thread runs in this process, or a child process runs (EngineConfig.engine_process; core_client.py).

Requests, aborts and LoRA adapter updates reach the core through one inbox, whichever client runs it; each step
report's outputs reach the requests' asyncio queues through loop.call_soon_threadsafe (one call per step), and its
adapter-update outcomes the waiting callers; deltas that queued up while a reader was busy are joined into one.
If the loop dies, every pending request fails with EngineDeadError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import replace

from engine.config import EngineConfig
from engine.core_client import CoreHooks, ProcessCoreClient, ThreadCoreClient
from engine.engine_core import InboxItem, LoraUpdate, MakeEngine, StepReport
from engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.lora import parse_lora_modules
from engine.outputs import EngineStats, RequestOutput, merge_delta
from engine.prompts import Prompt
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Item = RequestOutput | Exception


class AsyncEngine:
    def __init__(self, config: EngineConfig, make_engine: MakeEngine = LLMEngine) -> None:
        """Starts the core (on a thread, or in the engine-core process) and waits until it is loaded; start() then lets
        requests in. A load error is raised here. `make_engine` builds what the core steps (tests and benchmarks inject
        stand-ins; with engine_process it must pickle)."""
        self.max_waiting_requests = config.max_waiting_requests
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._is_started = False
        self._inbox: list[InboxItem] = []
        self._num_in_flight = 0  # adds taken by the core that no step report has counted yet
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]] = {}
        self._stopping = False
        self._error: str | None = None
        self._has_failed_all = False  # pending requests were failed: a request registered later must not wait
        self._lora_updates: dict[int, tuple[LoraUpdate, Future[None]]] = {}  # updates sent to the core, by update_id
        self._num_lora_updates = 0
        hooks = CoreHooks(self._wakeup, self._take_inbox, self._on_report, self._on_exit)
        client_type = ProcessCoreClient if config.engine_process else ThreadCoreClient
        self.client: ThreadCoreClient | ProcessCoreClient = client_type(config, make_engine, hooks)
        self._stats = self.client.initial_stats
        self.max_model_len = self.client.max_model_len
        self.fingerprint = self.client.fingerprint  # changes when the model or an output-changing setting does
        self.chat_template_info = self.client.tokenizer.chat_template_info
        self.lora_names: list[str] = list(parse_lora_modules(config.lora_modules))  # served adapters, in load order

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._is_started = True

    def shutdown(self) -> None:
        self._stopping = True
        self.client.shutdown()

    @property
    def is_alive(self) -> bool:
        return self._is_started and self.client.is_running and not self._stopping and self._error is None

    def stats(self) -> EngineStats:
        with self._lock:
            stats, num_waiting = self._stats, self._num_waiting()
        return replace(stats, is_alive=self.is_alive, error=self._error, num_waiting=num_waiting)

    def decode(self, token_ids: list[int]) -> str:
        return self.client.tokenizer.decode(token_ids)

    # --- tokenizer (any thread may call these: they touch no engine state) ----------------------------------

    def tokenize(
        self, prompt: str | list[dict[str, str]], *, add_special_tokens: bool, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a text, or of chat messages rendered by the chat template; raises InvalidRequestError."""
        tokenizer = self.client.tokenizer
        if isinstance(prompt, str):
            return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return tokenizer.apply_chat_template(
            prompt, add_generation_prompt=add_generation_prompt, add_special_tokens=add_special_tokens
        )

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids, special tokens kept (so it round-trips tokenize); raises InvalidRequestError."""
        vocab = self.client.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", param="tokens")
        return self.client.tokenizer.decode(token_ids, skip_special_tokens=False)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (what logprobs show for it)."""
        return [self.client.tokenizer.token_text(t) for t in token_ids]

    # --- requests ------------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; raises InvalidRequestError, EngineOverloadedError or EngineDeadError before the first."""
        if not self.is_alive:
            raise EngineDeadError(self._error or "the engine is not running")
        # Tokenizing and rendering the chat template take a while for long prompts: off the event loop.
        prompt_ids = await asyncio.to_thread(self.client.prepare, prompt, params)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        with self._lock:
            if self._has_failed_all:
                raise EngineDeadError(self._error or "the engine was shut down")
            if self._num_waiting() >= self.max_waiting_requests:
                raise EngineOverloadedError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append((request_id, prompt_ids, params))
        self._wakeup.set()
        finished = False
        error: Exception | None = None  # queued behind deltas that were joined: raised on the next read
        try:
            while not finished:
                item = error or await queue.get()
                if isinstance(item, Exception):
                    raise item
                error = _join_queued(item, queue)
                item.prompt_token_ids = prompt_ids  # the engine-core process does not send them back with every delta
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Load and serve an adapter between two steps; raises LoraError (bad folder, name taken, LoRA off)."""
        await self._update_lora(name, path)

    async def unload_lora_adapter(self, name: str) -> None:
        """Stop serving an adapter (its running requests finish with it); raises LoraError when it is not served."""
        await self._update_lora(name, None)

    async def _update_lora(self, name: str, path: str | None) -> None:
        """Send the update through the inbox (to the loop thread or the engine-core process, like a request) and wait
        for its outcome in a step report (which updates lora_names, even if this caller is gone by then);
        EngineDeadError if the engine ends first."""
        if not self.is_alive:
            raise EngineDeadError(self._error or "the engine is not running")
        done: Future[None] = Future()
        # Running: a caller that gives up (asyncio cancels the future it waits on) cannot cancel this one, so the step
        # report can always set its outcome (setting a cancelled future raises, on the thread that delivers reports).
        done.set_running_or_notify_cancel()
        with self._lock:
            if self._has_failed_all:
                raise EngineDeadError(self._error or "the engine was shut down")
            self._num_lora_updates += 1
            update = LoraUpdate(self._num_lora_updates, name, path)
            self._lora_updates[update.update_id] = (update, done)
            self._inbox.append(update)
        self._wakeup.set()
        await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(request_id)
        self._wakeup.set()

    def _num_waiting(self) -> int:
        """Requests not yet running (caller holds the lock)."""
        num_new = sum(1 for item in self._inbox if isinstance(item, tuple))
        return self._stats.num_waiting + num_new + self._num_in_flight

    # --- the core client's hooks (its loop thread, or its sender and reader threads) -------------------------

    def _take_inbox(self) -> list[InboxItem]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            self._num_in_flight += sum(1 for item in inbox if isinstance(item, tuple))
        return inbox

    def _on_report(self, report: StepReport) -> None:
        with self._lock:
            # Stats first: whoever receives a final output must not then read stats that still show it running.
            self._stats = report.stats
            self._num_in_flight -= report.num_adds
            updates = []
            for update_id, exc in report.lora_results:
                update, done = self._lora_updates.pop(update_id)
                if exc is None and update.path is None:
                    self.lora_names.remove(update.name)
                elif exc is None:
                    self.lora_names.append(update.name)
                updates.append((done, exc))
        items: list[tuple[str, _Item]] = [(output.request_id, output) for output in report.outputs]
        items += report.failures
        self._deliver_all(items)
        for done, exc in updates:  # after the lock: the waiting coroutine's loop may run at once
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    def _on_exit(self, why: str | None) -> None:
        self._error = why
        self._fail_all(EngineDeadError(why or "the engine was shut down"))

    def _deliver_all(self, items: list[tuple[str, _Item]]) -> None:
        """One call_soon_threadsafe per event loop, not per request: each call wakes the loop through its self-pipe."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        with self._lock:
            for request_id, item in items:
                target = self._queues.get(request_id)
                if target is not None:  # else the caller is gone; its abort is in the inbox
                    by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, puts in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
                loop.call_soon_threadsafe(_put_all, puts)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            self._has_failed_all = True
            request_ids = list(self._queues)
            updates, self._lora_updates = list(self._lora_updates.values()), {}
        self._deliver_all([(request_id, exc) for request_id in request_ids])
        for _, done in updates:  # an adapter update the core never answered
            done.set_exception(exc)


def _put_all(puts: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
    for queue, item in puts:
        queue.put_nowait(item)


def _join_queued(output: RequestOutput, queue: asyncio.Queue[_Item]) -> Exception | None:
    """Join the deltas queued behind `output` into it, so a reader that fell behind catches up in one delta.

    Under load this keeps the HTTP side's cost per token down: one SSE chunk carries every token the engine made while
    that stream waited. Returns an error found in the queue (the deltas before it are joined; it is for the next read).
    """
    while not output.finished and not queue.empty():
        later = queue.get_nowait()
        if isinstance(later, Exception):
            return later
        merge_delta(output, later)
    return None
