"""AsyncEngine: runs the LLMEngine loop on a background thread and streams deltas to asyncio callers.

Requests and aborts reach the loop through an inbox; outputs reach each request's asyncio queue through
loop.call_soon_threadsafe. If the loop dies, every pending request fails with EngineDeadError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineOverloadedError, RequestFailedError
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Item = RequestOutput | Exception


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        """Builds the LLMEngine on the loop thread and waits until it is loaded; start() then begins the loop.

        Every torch call runs on that one thread, loading included. A thread that ever ran a parallel torch op keeps an
        OpenMP team of its own, and once OpenMP manages more threads than there are cores, its workers stop spin-waiting
        between ops: decode ran 7-15% slower on 2 cores when the engine was loaded on one thread and stepped on another.
        """
        self.max_waiting_requests = config.max_waiting_requests
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._started = threading.Event()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._inbox: list[tuple[str, list[int], SamplingParams] | str] = []  # new requests, or request ids to abort
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]] = {}
        self._stopping = False
        self._error: str | None = None
        self.engine: LLMEngine  # set on the loop thread
        self._thread = threading.Thread(target=self._main, args=(config,), name="sirocco-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        self.max_model_len = self.engine.max_model_len
        self._stats = self.engine.stats()

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._started.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._started.set()
        self._thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        return self._started.is_set() and self._thread.is_alive() and not self._stopping and self._error is None

    def stats(self) -> EngineStats:
        with self._lock:
            num_new = sum(1 for item in self._inbox if not isinstance(item, str))
        stats = self._stats
        return replace(stats, is_alive=self.is_alive, error=self._error, num_waiting=stats.num_waiting + num_new)

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids)

    # --- requests ------------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; raises InvalidRequestError, EngineOverloadedError or EngineDeadError before the first."""
        if not self.is_alive:
            raise EngineDeadError(self._error or "the engine is not running")
        # Tokenizing and rendering the chat template take a while for long prompts: off the event loop.
        prompt_ids = await asyncio.to_thread(self.engine.prepare, prompt, params)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        with self._lock:
            if self._num_waiting() >= self.max_waiting_requests:
                raise EngineOverloadedError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append((request_id, prompt_ids, params))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
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
        return self._stats.num_waiting + sum(1 for item in self._inbox if not isinstance(item, str))

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
                    for output in result.outputs:
                        self._deliver(output.request_id, output)
                    for request_id, exc in result.failed:
                        self._deliver(request_id, RequestFailedError(f"request failed in the engine: {exc}"))
                self._stats = self.engine.stats()
        except BaseException as exc:  # the loop itself died: nobody pending may hang
            logger.exception("engine loop died")
            self._error = f"engine loop died: {exc!r}"
        finally:
            self._fail_all(EngineDeadError(self._error or "the engine was shut down"))
            self.engine.structured.close()  # stop the grammar compiler's child process, if one was started

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
        with self._lock:
            target = self._queues.get(request_id)
        if target is None:
            return  # the caller is gone; its abort is in the inbox
        loop, queue = target
        with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            request_ids = list(self._queues)
        for request_id in request_ids:
            self._deliver(request_id, exc)
