"""AsyncEngine: one thread for all torch work, streaming deltas, abort on close, queue bound, per-request failure, loop death."""

from __future__ import annotations

import asyncio
import pathlib
import threading
from collections.abc import Iterator

import pytest

from engine import AsyncEngine, EngineConfig, EngineDeadError, EngineOverloadedError, RequestFailedError, SamplingParams
from engine.llm_engine import LLMEngine
from engine.loader import ModelLoadError
from engine.outputs import RequestOutput
from tests.conditions import async_wait_until

PROMPT = [100, 200, 300, 400, 500, 600, 700]
BOUND_S = 120.0  # turns a hang into a failure; never reached on a healthy run, however loaded the machine


@pytest.fixture(params=[False, True], ids=["sync_output", "async_output"])
def engine(tiny_mistral_sliding_dir: pathlib.Path, request: pytest.FixtureRequest) -> Iterator[AsyncEngine]:
    config = EngineConfig(model=str(tiny_mistral_sliding_dir), max_waiting_requests=4, async_output=request.param)
    engine = AsyncEngine(config)
    engine.start()
    yield engine
    engine.shutdown()


async def _collect(engine: AsyncEngine, request_id: str, params: SamplingParams) -> list[RequestOutput]:
    return [delta async for delta in engine.generate(request_id, PROMPT, params)]


def test_stream_adds_up_to_the_offline_result(engine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=2)
    deltas = asyncio.run(_collect(engine, "a", params))
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    final = deltas[-1]
    assert final.usage is not None and final.usage.prompt_tokens == len(PROMPT) and final.usage.completion_tokens == 24
    assert final.queue_s is not None and final.queue_s >= 0
    for index in (0, 1):
        parts = [c for d in deltas for c in d.outputs if c.index == index]
        assert sum(len(c.token_ids) for c in parts) == 12
        assert [c.finish_reason for c in parts if c.finish_reason] == ["length"]
        assert parts[-1].finish_reason == "length"
        offline = engine.engine.tokenizer.decode([t for c in parts for t in c.token_ids])
        assert "".join(c.text for c in parts) == offline


def test_closing_the_stream_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    async def read_two_then_leave() -> None:
        stream = engine.generate("leaver", PROMPT, SamplingParams(max_tokens=400, ignore_eos=True))
        async for _ in stream:
            if engine.stats().kv_cache_usage > 0:
                break
        await stream.aclose()  # type: ignore[attr-defined]

        def is_freed() -> bool:
            stats = engine.stats()
            return stats.num_running == 0 and stats.kv_cache_usage == 0.0

        await async_wait_until(is_freed, "the aborted request's blocks to be freed")

    asyncio.run(asyncio.wait_for(read_two_then_leave(), BOUND_S))


def test_full_queue_is_refused(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    """Two requests wait behind a running one; a third is refused. The loop is held inside a step while the queue
    fills, so the running request cannot finish first however slow or fast the machine is."""
    engine = AsyncEngine(EngineConfig(model=str(tiny_mistral_sliding_dir), max_num_seqs=1, max_waiting_requests=2))
    step_may_run = threading.Event()
    step_may_run.set()
    real_step = engine.engine.step

    def gated_step():  # type: ignore[no-untyped-def]
        if not step_may_run.wait(BOUND_S):
            raise AssertionError("the test never released the engine loop")
        return real_step()

    engine.engine.step = gated_step  # type: ignore[method-assign]
    engine.start()

    async def flood() -> None:
        running = engine.generate("running", PROMPT, SamplingParams(max_tokens=400, ignore_eos=True))
        await running.__anext__()  # type: ignore[attr-defined]
        step_may_run.clear()  # the loop stops at its next step: nothing is admitted, nothing finishes
        waiting = [asyncio.ensure_future(_collect(engine, f"w{i}", SamplingParams(max_tokens=2))) for i in range(2)]
        await async_wait_until(lambda: engine.stats().num_waiting == 2, "two waiting requests")
        with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
            await _collect(engine, "refused", SamplingParams(max_tokens=2))
        step_may_run.set()
        await running.aclose()  # type: ignore[attr-defined]
        done = await asyncio.gather(*waiting)  # the queued ones are served once the long one leaves
        assert all(d[-1].finished for d in done)

    try:
        asyncio.run(asyncio.wait_for(flood(), BOUND_S))
    finally:
        step_may_run.set()
        engine.shutdown()


def test_one_failing_request_does_not_hurt_the_others(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.engine.tokenizer.token_text

    def broken(token_id: int) -> str:  # only requests asking for logprobs call it
        raise RuntimeError("tokenizer exploded")

    async def both() -> tuple[BaseException | list[RequestOutput], BaseException | list[RequestOutput]]:
        good = asyncio.ensure_future(_collect(engine, "good", SamplingParams(max_tokens=8, ignore_eos=True)))
        bad = asyncio.ensure_future(_collect(engine, "bad", SamplingParams(max_tokens=8, ignore_eos=True, logprobs=7)))
        return tuple(await asyncio.gather(good, bad, return_exceptions=True))  # type: ignore[return-value]

    monkeypatch.setattr(engine.engine.tokenizer, "token_text", broken)
    good, bad = asyncio.run(asyncio.wait_for(both(), BOUND_S))
    assert isinstance(bad, RequestFailedError) and "tokenizer exploded" in str(bad)
    assert isinstance(good, list) and good[-1].finished and good[-1].usage is not None
    monkeypatch.setattr(engine.engine.tokenizer, "token_text", real)
    stats = engine.stats()  # read right after the last delivery: the stats a caller sees are never behind its outputs
    assert engine.is_alive and stats.num_running == 0 and stats.kv_cache_usage == 0.0, stats


def test_loop_death_fails_pending_requests_and_reports_it(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash() -> None:
        raise SystemError("the loop broke")

    monkeypatch.setattr(engine.engine, "step", crash)
    with pytest.raises(EngineDeadError, match="the loop broke"):
        asyncio.run(_collect(engine, "doomed", SamplingParams(max_tokens=4)))
    stats = engine.stats()
    assert not stats.is_alive and stats.error is not None and "the loop broke" in stats.error
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(engine, "after", SamplingParams(max_tokens=4)))


def test_loading_and_stepping_run_on_the_loop_thread(
    tiny_mistral_sliding_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Torch work on a second thread costs OpenMP its spin-waiting (see AsyncEngine.__init__): both stay on one thread."""
    threads: dict[str, set[str]] = {"load": set(), "step": set()}

    class Recording(LLMEngine):
        def __init__(self, config: EngineConfig) -> None:
            threads["load"].add(threading.current_thread().name)
            super().__init__(config)

        def step(self):  # type: ignore[no-untyped-def]
            threads["step"].add(threading.current_thread().name)
            return super().step()

    monkeypatch.setattr("engine.async_engine.LLMEngine", Recording)
    engine = AsyncEngine(EngineConfig(model=str(tiny_mistral_sliding_dir)))
    engine.start()
    try:
        deltas = asyncio.run(_collect(engine, "r", SamplingParams(max_tokens=3, ignore_eos=True)))
    finally:
        engine.shutdown()
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == 3
    assert threads == {"load": {"sirocco-engine"}, "step": {"sirocco-engine"}}


def test_a_load_failure_is_raised_by_the_constructor(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError):
        AsyncEngine(EngineConfig(model=str(tmp_path)))  # an empty folder: no config.json
