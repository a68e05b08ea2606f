"""EngineCore (one step loop: inbox in, one StepReport out) and what only the process client has: errors crossing the
pipe, a killed child, shutdown leaving no child. test_async_engine.py runs AsyncEngine's behaviour in both modes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pathlib
import pickle
import signal

import pytest

from engine import AsyncEngine, ConfigError, EngineConfig, SamplingParams
from engine.core_client import ProcessCoreClient
from engine.engine_core import EngineCore, StepReport, error_info, rebuild_error
from engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError
from engine.loader import ModelLoadError
from engine.lora import LoraError
from engine.outputs import EngineStats, RequestOutput

PROMPT = [100, 200, 300, 400, 500, 600, 700]
BOUND_S = 120.0  # turns a hang into a failure; never reached on a healthy run, however loaded the machine
LONG = SamplingParams(max_tokens=400, ignore_eos=True)  # outlasts anything the tests do while it runs


def _config(model_dir: pathlib.Path, **kwargs: object) -> EngineConfig:
    return EngineConfig(model=str(model_dir), kv_cache_gib=0.05, **kwargs)  # type: ignore[arg-type]


def _child_pid(engine: AsyncEngine) -> int:
    assert isinstance(engine.client, ProcessCoreClient) and engine.client.process.pid is not None
    return engine.client.process.pid


def _child_pids() -> set[int | None]:
    return {p.pid for p in multiprocessing.active_children()}


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _collect(engine: AsyncEngine, request_id: str, params: SamplingParams) -> list[RequestOutput]:
    return [delta async for delta in engine.generate(request_id, PROMPT, params)]


def test_core_applies_the_inbox_in_order_and_reports_each_step(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    core = EngineCore(_config(tiny_mistral_sliding_dir))
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        report = core.step([("a", PROMPT, params), ("a", PROMPT, params), ("b", PROMPT, params), "b"])
        assert report.num_adds == 3
        ((failed_id, exc),) = report.failures  # the second "a" is refused; "b" is aborted before the step
        assert failed_id == "a" and isinstance(exc, InvalidRequestError) and "already in use" in str(exc)
        assert [o.request_id for o in report.outputs] == ["a"] and report.stats.num_running == 1
        while core.has_work:
            report = core.step([])
        assert report.outputs[-1].finished and report.stats.num_running == 0 and report.stats.kv_cache_usage == 0.0
        idle = core.step([])  # nothing to do: no step, the stats only
        assert idle.outputs == [] and idle.failures == [] and idle.num_adds == 0
    finally:
        core.close()


ERRORS = [
    InvalidRequestError("the prompt is empty", param="prompt"),
    ConfigError("max_model_len", "max_model_len 9999 is above the model's"),
    ModelLoadError("no config.json"),
    RequestFailedError("request failed in the engine: boom"),
    EngineOverloadedError("full"),
    LoraError("LoRA adapter 'x' is already loaded"),
    FileNotFoundError("/nowhere"),
]


@pytest.mark.parametrize("exc", ERRORS)
def test_errors_cross_the_pipe_intact(exc: Exception) -> None:
    rebuilt = rebuild_error(pickle.loads(pickle.dumps(error_info(exc))))
    assert type(rebuilt) is type(exc) and str(rebuilt) == str(exc)
    assert getattr(rebuilt, "param", None) == getattr(exc, "param", None)
    assert getattr(rebuilt, "field", None) == getattr(exc, "field", None)


def test_a_step_report_pickles_its_failures_and_adapter_outcomes_as_error_info() -> None:
    stats = EngineStats(True, None, 3, 0, 8, 5, 0.375, 7, 2, 0, 7, 0)
    failures = [(f"r{i}", exc) for i, exc in enumerate(ERRORS)]
    lora_results: list[tuple[int, Exception | None]] = [(1, None), (2, LoraError("LoRA adapter folder /x does not exist"))]
    report = StepReport(stats, 2, [RequestOutput("r", [], [])], failures, lora_results)
    back = pickle.loads(pickle.dumps(report))
    assert back.stats == stats and back.num_adds == 2 and back.outputs[0].request_id == "r"
    assert [(r, type(e), str(e)) for r, e in back.failures] == [(r, type(e), str(e)) for r, e in report.failures]
    assert back.failures[0][1].param == "prompt"  # type: ignore[attr-defined]
    (first, no_error), (second, error) = back.lora_results  # adapter updates' outcomes, by update id
    assert (first, no_error, second) == (1, None, 2) and isinstance(error, LoraError) and "/x" in str(error)


def test_an_unknown_error_type_becomes_a_runtime_error_naming_it() -> None:
    class OddError(Exception):
        def __init__(self, code: int, why: str) -> None:
            super().__init__(f"{code}: {why}")

    rebuilt = rebuild_error(error_info(OddError(3, "odd")))
    assert isinstance(rebuilt, RuntimeError) and str(rebuilt) == "OddError: 3: odd"


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
    assert isinstance(engine.client, ProcessCoreClient)
    assert engine.client.process.exitcode == 0  # it stopped on the stop message, not a signal
    assert not _is_running(pid) and pid not in _child_pids()
    assert not engine.is_alive and engine.stats().error is None
