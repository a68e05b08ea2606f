"""AsyncEngine: runs the LLMEngine loop on a background thread, or in its own process, and streams deltas to asyncio callers.

Requests and aborts reach the loop through an inbox; outputs reach each request's asyncio queue through
loop.call_soon_threadsafe (one call per step); deltas that queued up while a reader was busy are joined into one.
If the loop dies, every pending request fails with EngineDeadError. With EngineConfig.engine_process the loop runs in
a child process (engine_core.py): a sender thread ships the inbox there, a reader thread delivers its step reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

from engine.config import EngineConfig
from engine.engine_core import EngineCoreClient, InboxItem, StepReport, rebuild_error
from engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput, merge_delta
from engine.prompts import Prompt
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Item = RequestOutput | Exception


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        """Builds the LLMEngine (on the loop thread, or in the engine-core process) and waits until it is loaded; start()
        then lets requests in. A load error is raised here.

        Every torch call runs on the loop thread, loading included. A thread that ever ran a parallel torch op keeps an
        OpenMP team of its own, and once OpenMP manages more threads than there are cores, its workers stop spin-waiting
        between ops: decode ran 7-15% slower on 2 cores when the engine was loaded on one thread and stepped on another.
        """
        self.max_waiting_requests = config.max_waiting_requests
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._started = threading.Event()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._inbox: list[InboxItem] = []
        self._num_in_flight = 0  # adds sent to the engine-core process that no step report has counted yet
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]] = {}
        self._stopping = False
        self._error: str | None = None
        self._has_failed_all = False  # pending requests were failed: a request registered later must not wait
        self.core: EngineCoreClient | None = None  # the engine-core process (engine_process), else None
        self._front: LLMEngine | EngineCoreClient  # the tokenizer and model facts, in this process
        if config.engine_process:
            self.core = EngineCoreClient(config, self._wakeup, self._take_inbox, self._on_report, self._on_core_exit)
            self._front = self.core
            self._stats = self.core.initial_stats
        else:
            self.engine: LLMEngine  # set on the loop thread
            self._thread = threading.Thread(target=self._main, args=(config,), name="sirocco-engine", daemon=True)
            self._thread.start()
            self._loaded.wait()
            if self._load_error is not None:
                raise self._load_error
            self._front = self.engine
            self._stats = self.engine.stats()
        self.max_model_len = self._front.max_model_len
        self.fingerprint = self._front.fingerprint  # changes when the model or an output-changing setting does
        self.chat_template_info = self._front.tokenizer.chat_template_info

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._started.set()

    def shutdown(self) -> None:
        self._stopping = True
        if self.core is not None:
            self.core.shutdown()
            return
        self._wakeup.set()
        self._started.set()
        self._thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        is_running = self.core.is_running if self.core is not None else self._thread.is_alive()
        return self._started.is_set() and is_running and not self._stopping and self._error is None

    def stats(self) -> EngineStats:
        with self._lock:
            stats, num_waiting = self._stats, self._num_waiting()
        return replace(stats, is_alive=self.is_alive, error=self._error, num_waiting=num_waiting)

    def decode(self, token_ids: list[int]) -> str:
        return self._front.tokenizer.decode(token_ids)

    # --- tokenizer (any thread may call these: they touch no engine state) ----------------------------------

    def tokenize(
        self, prompt: str | list[dict[str, str]], *, add_special_tokens: bool, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a text, or of chat messages rendered by the chat template; raises InvalidRequestError."""
        tokenizer = self._front.tokenizer
        if isinstance(prompt, str):
            return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return tokenizer.apply_chat_template(
            prompt, add_generation_prompt=add_generation_prompt, add_special_tokens=add_special_tokens
        )

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids, special tokens kept (so it round-trips tokenize); raises InvalidRequestError."""
        vocab = self._front.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", param="tokens")
        return self._front.tokenizer.decode(token_ids, skip_special_tokens=False)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (what logprobs show for it)."""
        return [self._front.tokenizer.token_text(t) for t in token_ids]

    # --- requests ------------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; raises InvalidRequestError, EngineOverloadedError or EngineDeadError before the first."""
        if not self.is_alive:
            raise EngineDeadError(self._error or "the engine is not running")
        # Tokenizing and rendering the chat template take a while for long prompts: off the event loop.
        prompt_ids = await asyncio.to_thread(self._front.prepare, prompt, params)
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

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(request_id)
        self._wakeup.set()

    def _num_waiting(self) -> int:
        """Requests not yet running (caller holds the lock)."""
        num_new = sum(1 for item in self._inbox if not isinstance(item, str))
        return self._stats.num_waiting + num_new + self._num_in_flight

    # --- the engine-core process's callbacks (sender and reader threads) -----------------------------------

    def _take_inbox(self) -> list[InboxItem]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            self._num_in_flight += sum(1 for item in inbox if not isinstance(item, str))
        return inbox

    def _on_report(self, report: StepReport) -> None:
        with self._lock:
            self._stats = report.stats  # first, as in the thread loop
            self._num_in_flight -= report.num_adds
        items: list[tuple[str, _Item]] = [(output.request_id, output) for output in report.outputs]
        items += [(request_id, rebuild_error(info)) for request_id, info in report.failures]
        self._deliver_all(items)

    def _on_core_exit(self, why: str | None) -> None:
        self._error = why
        self._fail_all(EngineDeadError(why or "the engine was shut down"))

    # --- the loop thread -----------------------------------------------------------------------------------

    def _main(self, config: EngineConfig) -> None:
        try:
            self.engine = LLMEngine(config)
        except BaseException as exc:  # re-raised by __init__ on the caller's thread
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        self._started.wait()
        self._run()

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.engine.has_unfinished:
                    self._wakeup.wait()
                self._wakeup.clear()
                self._drain_inbox()
                if self.engine.has_unfinished:
                    result = self.engine.step()
                    # Stats first: whoever receives a final output must not then read stats that still show it running.
                    self._stats = self.engine.stats()
                    items: list[tuple[str, _Item]] = [(output.request_id, output) for output in result.outputs]
                    for request_id, exc in result.failed:
                        items.append((request_id, RequestFailedError(f"request failed in the engine: {exc}")))
                    self._deliver_all(items)
        except BaseException as exc:  # the loop itself died: nobody pending may hang
            logger.exception("engine loop died")
            self._error = f"engine loop died: {exc!r}"
        finally:
            self._fail_all(EngineDeadError(self._error or "the engine was shut down"))
            self.engine.close()

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for item in inbox:
            if isinstance(item, str):
                self.engine.abort(item)
                continue
            request_id, prompt_ids, params = item
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except Exception as exc:
                self._deliver(request_id, exc)
        # Count the new requests as waiting now, not after the next step: until then the queue bound would not see them.
        self._stats = self.engine.stats()

    def _deliver(self, request_id: str, item: _Item) -> None:
        self._deliver_all([(request_id, item)])

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
        self._deliver_all([(request_id, exc) for request_id in request_ids])


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
