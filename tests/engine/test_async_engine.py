"""AsyncEngine in both modes (the core on a thread, or in its own process): streamed deltas add up to the offline
engine's output, abort on close, the queue bound, per-request failure, loop death, a load failure raised by the
constructor; and, on a thread, loading and stepping on the loop thread. Faults are injected with make_engine
(faulty_engine.py). Each mode's engine is shared by the module's tests that leave it healthy."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import pathlib
import threading
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from typing import Any

import pytest

from engine import (
    LLM,
    AsyncEngine,
    EngineClient,
    EngineConfig,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestFailedError,
    SamplingParams,
)
from engine.llm_engine import LLMEngine
from engine.loader import ModelLoadError
from engine.outputs import RequestOutput
from tests.conditions import async_wait_until
from tests.engine.faulty_engine import CRASH, FaultyEngine

PROMPT = [100, 200, 300, 400, 500, 600, 700]
BOUND_S = 120.0  # turns a hang into a failure; never reached on a healthy run, however loaded the machine
LONG = SamplingParams(max_tokens=400, ignore_eos=True)  # outlasts anything the tests do while it runs
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=2)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True, n=2)
MODES: dict[str, dict[str, Any]] = {
    "thread": {"async_output": False},
    "thread_async_output": {"async_output": True},
    "process": {"engine_process": True},
}
# One request runs, two may wait: the queue-bound test fills exactly that.
SHARED = {"kv_cache_gib": 0.05, "max_num_seqs": 1, "max_waiting_requests": 2}


def _config(model_dir: pathlib.Path, mode: str, **kwargs: Any) -> EngineConfig:
    return EngineConfig(model=str(model_dir), **SHARED, **MODES[mode], **kwargs)


def _faulty(config: EngineConfig, gate: Event) -> AsyncEngine:
    engine = AsyncEngine(config, make_engine=functools.partial(FaultyEngine, gate=gate))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def gate() -> Event:
    """Open unless a test holds the loop inside a step; spawn's Event, so the engine-core process shares it."""
    gate = multiprocessing.get_context("spawn").Event()
    gate.set()
    return gate


@pytest.fixture(scope="module", params=list(MODES))
def engine(tiny_mistral_sliding_dir: pathlib.Path, gate: Event, request: pytest.FixtureRequest) -> Iterator[AsyncEngine]:
    engine = _faulty(_config(tiny_mistral_sliding_dir, request.param), gate)
    yield engine
    gate.set()
    engine.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_mistral_sliding_dir: pathlib.Path) -> dict[str, list[list[int]]]:
    """Each choice's tokens from the offline engine, with the same settings."""
    llm = LLM(str(tiny_mistral_sliding_dir), **SHARED)
    outputs = llm.generate([PROMPT, PROMPT], [GREEDY, SEEDED])
    llm.engine.close()
    return {name: [c.token_ids for c in out.outputs] for name, out in zip(("greedy", "seeded"), outputs, strict=True)}


async def _collect(engine: AsyncEngine, request_id: str, params: SamplingParams, prompt: Any = PROMPT) -> list[RequestOutput]:
    return [delta async for delta in engine.generate(request_id, prompt, params)]


def test_it_is_an_engine_client(engine: AsyncEngine) -> None:
    assert isinstance(engine, EngineClient)


@pytest.mark.parametrize("name", ["greedy", "seeded"])
def test_stream_adds_up_to_the_offline_result(engine: AsyncEngine, offline: dict[str, list[list[int]]], name: str) -> None:
    params = GREEDY if name == "greedy" else SEEDED
    deltas = asyncio.run(asyncio.wait_for(_collect(engine, name, params), BOUND_S))
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    final = deltas[-1]
    assert final.usage is not None and final.usage.prompt_tokens == len(PROMPT) and final.usage.completion_tokens == 24
    assert final.queue_s is not None and final.queue_s >= 0
    assert all(d.prompt_token_ids == PROMPT for d in deltas)  # restored by the client, not sent back every step
    for index in (0, 1):
        parts = [c for d in deltas for c in d.outputs if c.index == index]
        token_ids = [t for c in parts for t in c.token_ids]
        assert token_ids == offline[name][index]
        assert [c.finish_reason for c in parts if c.finish_reason] == ["length"]
        assert parts[-1].finish_reason == "length"
        assert "".join(c.text for c in parts) == engine.decode(token_ids)


def test_closing_the_stream_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    async def read_then_leave() -> None:
        stream = engine.generate("leaver", PROMPT, LONG)
        async for _ in stream:
            if engine.stats().kv_cache_usage > 0:
                break
        await stream.aclose()  # type: ignore[attr-defined]

        def is_idle() -> bool:
            stats = engine.stats()
            return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0

        await async_wait_until(is_idle, "the aborted request's blocks to be freed")

    asyncio.run(asyncio.wait_for(read_then_leave(), BOUND_S))
    assert engine.is_alive


def test_a_prompt_error_is_raised_with_its_param(engine: AsyncEngine) -> None:
    with pytest.raises(InvalidRequestError, match="maximum context length") as caught:
        asyncio.run(_collect(engine, "too-long", SamplingParams(max_tokens=engine.max_model_len)))
    assert caught.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="prompt token ids must be in") as caught:
        asyncio.run(asyncio.wait_for(_collect(engine, "ids", SamplingParams(max_tokens=2), [10**9]), BOUND_S))
    assert caught.value.param == "prompt"
    assert engine.is_alive


def test_full_queue_is_refused(engine: AsyncEngine, gate: Event) -> None:
    """One request runs, two wait, a third is refused. The loop is held inside a step while the queue fills, so the
    running request cannot finish first however slow or fast the machine is; requests the core has not counted yet count."""

    async def flood() -> None:
        running = engine.generate("running", PROMPT, LONG)
        await running.__anext__()  # type: ignore[attr-defined]
        gate.clear()  # the loop stops at its next step: nothing is admitted, nothing finishes
        try:
            waiting = [asyncio.ensure_future(_collect(engine, f"w{i}", SamplingParams(max_tokens=2))) for i in range(2)]
            await async_wait_until(lambda: engine.stats().num_waiting == 2, "two waiting requests")
            with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
                await _collect(engine, "refused", SamplingParams(max_tokens=2))
        finally:
            gate.set()
        await running.aclose()  # type: ignore[attr-defined]
        done = await asyncio.gather(*waiting)  # the queued ones are served once the long one leaves
        assert all(d[-1].finished for d in done)

    asyncio.run(asyncio.wait_for(flood(), BOUND_S))


def test_one_failing_request_does_not_hurt_the_others(engine: AsyncEngine) -> None:
    async def both() -> list[BaseException | list[RequestOutput]]:
        good = asyncio.ensure_future(_collect(engine, "good", SamplingParams(max_tokens=8, ignore_eos=True)))
        bad = asyncio.ensure_future(_collect(engine, "bad", SamplingParams(max_tokens=8, ignore_eos=True, logprobs=7)))
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(asyncio.wait_for(both(), BOUND_S))
    assert isinstance(bad, RequestFailedError) and "tokenizer exploded" in str(bad)
    assert isinstance(good, list) and good[-1].finished and good[-1].usage is not None
    stats = engine.stats()  # read right after the last delivery: the stats a caller sees are never behind its outputs
    assert engine.is_alive and stats.num_running == 0 and stats.kv_cache_usage == 0.0, stats


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_loop_death_fails_pending_requests_and_reports_it(tiny_mistral_sliding_dir: pathlib.Path, gate: Event, mode: str) -> None:
    engine = _faulty(_config(tiny_mistral_sliding_dir, mode), gate)
    try:
        with pytest.raises(EngineDeadError, match="the loop broke"):
            asyncio.run(asyncio.wait_for(_collect(engine, CRASH, SamplingParams(max_tokens=4)), BOUND_S))
        stats = engine.stats()
        assert not stats.is_alive and stats.error is not None and "the loop broke" in stats.error
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(_collect(engine, "after", SamplingParams(max_tokens=4)), BOUND_S))
    finally:
        engine.shutdown()


def test_loading_and_stepping_run_on_the_loop_thread(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    """Torch work on a second thread costs OpenMP its spin-waiting (see ThreadCoreClient): both stay on one thread."""
    threads: dict[str, set[str]] = {"load": set(), "step": set()}

    class Recording(LLMEngine):
        def __init__(self, config: EngineConfig) -> None:
            threads["load"].add(threading.current_thread().name)
            super().__init__(config)

        def step(self):  # type: ignore[no-untyped-def]
            threads["step"].add(threading.current_thread().name)
            return super().step()

    engine = AsyncEngine(_config(tiny_mistral_sliding_dir, "thread"), make_engine=Recording)
    engine.start()
    try:
        deltas = asyncio.run(asyncio.wait_for(_collect(engine, "r", SamplingParams(max_tokens=3, ignore_eos=True)), BOUND_S))
    finally:
        engine.shutdown()
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == 3
    assert threads == {"load": {"sirocco-engine"}, "step": {"sirocco-engine"}}


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_load_failure_is_raised_by_the_constructor(tmp_path: pathlib.Path, mode: str) -> None:
    before = multiprocessing.active_children()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        AsyncEngine(_config(tmp_path, mode))  # an empty folder: no config.json
    assert multiprocessing.active_children() == before  # a failed engine process was reaped by the constructor
