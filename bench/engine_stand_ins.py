"""Engine stand-ins for bench/http_ceiling.py: ZeroCostEngine (AsyncEngine's interface, every delta ready at once) and
PacedCore (LLMEngine's interface as AsyncEngine drives it, stepping at a fixed rate, under the real AsyncEngine).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from engine import AsyncEngine, CompletionOutput, EngineConfig, EngineStats, RequestOutput, SamplingParams, Usage, async_engine
from engine.llm_engine import StepResult

WORD = " x"  # the text of one token: a chunk's token count is its number of words


class ZeroCostEngine:
    """AsyncEngine's interface (what the gateway calls); every delta is ready at once, `tokens_per_delta` tokens each.

    One `asyncio.sleep(0)` before each delta gives the other streams their turn, as a real engine's per-step delivery does.
    """

    def __init__(self, tokens_per_delta: int, max_model_len: int = 1 << 20) -> None:
        self.tokens_per_delta = tokens_per_delta
        self.max_model_len = max_model_len
        self.is_alive = True
        self.num_running = 0
        self.num_generation_tokens = 0

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        self.is_alive = False

    def abort(self, request_id: str) -> None:
        pass

    def decode(self, token_ids: list[int]) -> str:
        return WORD * len(token_ids)

    def stats(self) -> EngineStats:
        return EngineStats(
            is_alive=self.is_alive,
            error=None,
            num_running=self.num_running,
            num_waiting=0,
            num_kv_blocks=1,
            num_free_kv_blocks=1,
            kv_cache_usage=0.0,
            num_prompt_tokens=0,
            num_generation_tokens=self.num_generation_tokens,
            num_preemptions=0,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
        )

    async def generate(self, request_id: str, prompt: object, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        prompt_ids = [1, 2, 3]
        max_tokens = params.max_tokens or 16
        num_sent = 0
        self.num_running += 1
        try:
            while num_sent < max_tokens:
                await asyncio.sleep(0)
                num_new = min(self.tokens_per_delta, max_tokens - num_sent)
                num_sent += num_new
                finished = num_sent == max_tokens
                choice = CompletionOutput(
                    index=0,
                    text=WORD * num_new,
                    token_ids=list(range(num_sent - num_new, num_sent)),
                    finish_reason="length" if finished else None,
                )
                usage = Usage(len(prompt_ids), num_sent, cached_tokens=0) if finished else None
                self.num_generation_tokens += num_new
                yield RequestOutput(
                    request_id, prompt_ids, [choice], finished=finished, usage=usage, queue_s=0.0 if finished else None
                )
        finally:
            self.num_running -= 1


class PacedCore:
    """LLMEngine's interface as AsyncEngine drives it, stepping at a fixed rate: the REAL AsyncEngine runs on top.

    A step waits (time.sleep, GIL released, like a GPU forward) until its slot, then gives every running request one
    token. If the process's other Python work (the HTTP side) holds the GIL, steps start late: the engine's achieved
    tokens/s (sirocco_generation_tokens on /metrics) falls below the target. That is the cost of sharing one process.
    """

    def __init__(self, config: EngineConfig, step_s: float, report_path: str | None = None) -> None:
        self.step_s = step_s
        self.report_path = report_path  # (num_steps, late_s) so far, rewritten every 20 steps
        self.num_steps = 0
        self.late_s = 0.0
        self.max_model_len = 1 << 20
        self.tokenizer = self
        self._running: dict[str, list[int]] = {}  # request id -> [max_tokens, tokens sent]
        self._next_step_s = time.perf_counter()
        self.num_generation_tokens = 0

    def decode(self, token_ids: list[int]) -> str:
        return WORD * len(token_ids)

    def prepare(self, prompt: object, params: SamplingParams) -> list[int]:
        return [1, 2, 3]

    @property
    def has_unfinished(self) -> bool:
        return bool(self._running)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not self._running:  # out of idle: the first step is due now
            self._next_step_s = time.perf_counter() - self.step_s
        self._running[request_id] = [params.max_tokens or 16, 0]

    def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    def step(self) -> StepResult:
        due_s = self._next_step_s + self.step_s
        if time.perf_counter() < due_s:
            time.sleep(due_s - time.perf_counter())
        start_s = time.perf_counter()
        self._next_step_s = start_s  # a late step shifts the schedule: lost time is not made up
        self.num_steps += 1
        self.late_s += start_s - due_s  # waiting for the GIL (or, on a loaded machine, for a core)
        if self.report_path and self.num_steps % 20 == 0:
            with open(self.report_path, "w", encoding="ascii") as f:
                json.dump({"num_steps": self.num_steps, "late_s": self.late_s}, f)
        outputs = []
        for request_id, counts in list(self._running.items()):
            counts[1] += 1
            finished = counts[1] == counts[0]
            choice = CompletionOutput(0, WORD, [counts[1]], finish_reason="length" if finished else None)
            usage = Usage(3, counts[1], cached_tokens=0) if finished else None
            outputs.append(RequestOutput(request_id, [1, 2, 3], [choice], finished, usage, 0.0 if finished else None))
            if finished:
                del self._running[request_id]
        self.num_generation_tokens += len(outputs)
        return StepResult(outputs, [])

    def stats(self) -> EngineStats:
        return replace(
            ZeroCostEngine(1).stats(), num_running=len(self._running), num_generation_tokens=self.num_generation_tokens
        )


def paced_engine(step_s: float, report_path: str) -> AsyncEngine:
    """The real AsyncEngine (thread, queues, delta joining) over PacedCore instead of a model."""
    core = functools.partial(PacedCore, step_s=step_s, report_path=report_path)
    async_engine.LLMEngine = core  # type: ignore[misc]  # in this server process only
    engine = AsyncEngine(EngineConfig())
    engine.start()
    return engine
