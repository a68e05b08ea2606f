"""The engine loop in its own process (engine_core.py) behind AsyncEngine: same outputs as the thread loop, aborts, the
queue bound, errors across the pipe, a killed child, shutdown, and a load failure raised by the constructor."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pathlib
import pickle
import signal
from collections.abc import Iterator

import pytest

from engine import (
    AsyncEngine,
    ConfigError,
    EngineConfig,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestFailedError,
    SamplingParams,
)
from engine.engine_core import error_info, rebuild_error
from engine.loader import ModelLoadError
from engine.outputs import RequestOutput
from tests.conditions import async_wait_until

PROMPT = [100, 200, 300, 400, 500, 600, 700]
BOUND_S = 120.0  # turns a hang into a failure; never reached on a healthy run, however loaded the machine
LONG = SamplingParams(max_tokens=400, ignore_eos=True)  # outlasts anything the tests do while it runs


def _config(model_dir: pathlib.Path, **kwargs: object) -> EngineConfig:
    return EngineConfig(model=str(model_dir), kv_cache_gib=0.05, **kwargs)  # type: ignore[arg-type]


def _child_pid(engine: AsyncEngine) -> int:
    assert engine.core is not None and engine.core.process.pid is not None
    return engine.core.process.pid


def _child_pids() -> set[int | None]:
    return {p.pid for p in multiprocessing.active_children()}


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def engine(tiny_mistral_sliding_dir: pathlib.Path) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(_config(tiny_mistral_sliding_dir, engine_process=True))
    engine.start()
    yield engine
    engine.shutdown()


async def _collect(engine: AsyncEngine, request_id: str, params: SamplingParams) -> list[RequestOutput]:
    return [delta async for delta in engine.generate(request_id, PROMPT, params)]


def _choices(deltas: list[RequestOutput]) -> dict[int, tuple[list[int], str]]:
    joined: dict[int, tuple[list[int], str]] = {}
    for delta in deltas:
        for choice in delta.outputs:
            token_ids, text = joined.get(choice.index, ([], ""))
            joined[choice.index] = (token_ids + choice.token_ids, text + choice.text)
    return joined


def test_outputs_equal_the_thread_loops(engine: AsyncEngine, tiny_mistral_sliding_dir: pathlib.Path) -> None:
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, n=2)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True, n=2)
    in_process = [asyncio.run(_collect(engine, name, params)) for name, params in (("greedy", greedy), ("seeded", seeded))]
    thread_engine = AsyncEngine(_config(tiny_mistral_sliding_dir))
    thread_engine.start()
    try:
        on_thread = [asyncio.run(_collect(thread_engine, name, p)) for name, p in (("greedy", greedy), ("seeded", seeded))]
    finally:
        thread_engine.shutdown()
    assert engine.fingerprint == thread_engine.fingerprint and engine.max_model_len == thread_engine.max_model_len
    for process_deltas, thread_deltas in zip(in_process, on_thread, strict=True):
        assert _choices(process_deltas) == _choices(thread_deltas)
        assert all(len(tokens) == 16 for tokens, _ in _choices(process_deltas).values())
        final = process_deltas[-1]
        assert final.finished and final.usage == thread_deltas[-1].usage
        assert all(d.prompt_token_ids == PROMPT for d in process_deltas)  # restored in the parent, not sent per step


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

        await async_wait_until(is_idle, "the aborted request's blocks to be freed in the engine process")

    asyncio.run(asyncio.wait_for(read_then_leave(), BOUND_S))
    assert engine.is_alive


def test_a_prompt_error_is_raised_with_its_param(engine: AsyncEngine) -> None:
    too_long = SamplingParams(max_tokens=engine.max_model_len)
    with pytest.raises(InvalidRequestError, match="maximum context length") as caught:
        asyncio.run(_collect(engine, "too-long", too_long))
    assert caught.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="prompt token ids must be in") as caught:
        asyncio.run(asyncio.wait_for(_collect_ids(engine, [10**9]), BOUND_S))
    assert caught.value.param == "prompt"
    assert engine.is_alive


async def _collect_ids(engine: AsyncEngine, prompt_ids: list[int]) -> list[RequestOutput]:
    return [delta async for delta in engine.generate("ids", prompt_ids, SamplingParams(max_tokens=2))]


@pytest.mark.parametrize(
    "exc",
    [
        InvalidRequestError("the prompt is empty", param="prompt"),
        ConfigError("max_model_len", "max_model_len 9999 is above the model's"),
        ModelLoadError("no config.json"),
        RequestFailedError("request failed in the engine: boom"),
        EngineOverloadedError("full"),
        FileNotFoundError("/nowhere"),
    ],
)
def test_errors_cross_the_pipe_intact(exc: Exception) -> None:
    rebuilt = rebuild_error(pickle.loads(pickle.dumps(error_info(exc))))
    assert type(rebuilt) is type(exc) and str(rebuilt) == str(exc)
    assert getattr(rebuilt, "param", None) == getattr(exc, "param", None)
    assert getattr(rebuilt, "field", None) == getattr(exc, "field", None)


def test_an_unknown_error_type_becomes_a_runtime_error_naming_it() -> None:
    class OddError(Exception):
        def __init__(self, code: int, why: str) -> None:
            super().__init__(f"{code}: {why}")

    rebuilt = rebuild_error(error_info(OddError(3, "odd")))
    assert isinstance(rebuilt, RuntimeError) and str(rebuilt) == "OddError: 3: odd"


def test_a_full_queue_is_refused(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    """One request runs, two wait, a third is refused. The child is stopped (SIGSTOP) while the queue fills, so the
    running request cannot finish first however slow or fast the machine is; requests it has not counted yet count."""
    engine = AsyncEngine(_config(tiny_mistral_sliding_dir, engine_process=True, max_num_seqs=1, max_waiting_requests=2))
    engine.start()
    pid = _child_pid(engine)

    async def flood() -> None:
        running = engine.generate("running", PROMPT, LONG)
        await running.__anext__()  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGSTOP)
        try:
            waiting = [asyncio.ensure_future(_collect(engine, f"w{i}", SamplingParams(max_tokens=2))) for i in range(2)]
            await async_wait_until(lambda: engine.stats().num_waiting == 2, "two waiting requests")
            with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
                await _collect(engine, "refused", SamplingParams(max_tokens=2))
        finally:
            os.kill(pid, signal.SIGCONT)
        await running.aclose()  # type: ignore[attr-defined]
        done = await asyncio.gather(*waiting)  # the queued ones are served once the long one leaves
        assert all(d[-1].finished for d in done)

    try:
        asyncio.run(asyncio.wait_for(flood(), BOUND_S))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        engine.shutdown()


def test_a_killed_child_fails_pending_requests(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    engine = AsyncEngine(_config(tiny_mistral_sliding_dir, engine_process=True))
    engine.start()
    pid = _child_pid(engine)

    async def killed_midway() -> None:
        stream = engine.generate("doomed", PROMPT, LONG)
        await stream.__anext__()  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            async for _ in stream:
                pass

    try:
        asyncio.run(asyncio.wait_for(killed_midway(), BOUND_S))
        stats = engine.stats()
        assert not engine.is_alive and not stats.is_alive and stats.error is not None and "SIGKILL" in stats.error
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(_collect(engine, "after", SamplingParams(max_tokens=2)), BOUND_S))
    finally:
        engine.shutdown()
    assert not _is_running(pid)


def test_shutdown_fails_pending_requests_and_leaves_no_child(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    engine = AsyncEngine(_config(tiny_mistral_sliding_dir, engine_process=True))
    engine.start()
    pid = _child_pid(engine)
    assert _is_running(pid)

    async def shut_down_midway() -> None:
        stream = engine.generate("pending", PROMPT, LONG)
        await stream.__anext__()  # type: ignore[attr-defined]
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(shut_down_midway(), BOUND_S))
    assert engine.core is not None and engine.core.process.exitcode == 0  # it stopped on the stop message, not a signal
    assert not _is_running(pid) and pid not in _child_pids()
    assert not engine.is_alive and engine.stats().error is None


def test_a_load_failure_is_raised_by_the_constructor(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    before = _child_pids()
    with pytest.raises(ConfigError, match="above the model's max_position_embeddings") as caught:
        AsyncEngine(_config(tiny_mistral_sliding_dir, engine_process=True, max_model_len=100_000))
    assert caught.value.field == "max_model_len"
    assert _child_pids() == before  # the failed engine process was reaped by the constructor
