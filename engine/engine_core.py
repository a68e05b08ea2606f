"""EngineCore: the step loop written once. It takes an inbox of new requests and aborts and returns one StepReport per
step; a thread runs it in this process, or a spawned child runs it behind pipes (core_client.py has both clients).

Errors cross the pipe as (type name, message, param) and are rebuilt, since engine exceptions with keyword fields do
not round-trip through pickle: StepReport pickles its failures that way.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from engine.config import ConfigError, EngineConfig
from engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    RankFailedError,
    RequestFailedError,
)
from engine.llm_engine import LLMEngine, StepResult
from engine.loader import ModelLoadError
from engine.lora import LoraError
from engine.outputs import EngineStats, RequestOutput
from engine.prompts import Prompt
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class LoraUpdate:
    """Load (path set) or unload (path None) a LoRA adapter between steps. Plain data, so it crosses the engine-core
    pipe like a request; its outcome comes back in that step's report (StepReport.lora_results, by update_id)."""

    update_id: int
    name: str
    path: str | None


# A new request (id, prepared prompt ids, params), an id to abort, or an adapter update
InboxItem = tuple[str, list[int], SamplingParams] | str | LoraUpdate
ErrorInfo = tuple[str, str, str | None]  # (exception type name, message, param or config field)

_ERRORS: dict[str, type[Exception]] = {  # the engine's own types whose constructor takes just a message
    cls.__name__: cls
    for cls in (
        EngineError,
        EngineOverloadedError,
        EngineDeadError,
        RequestFailedError,
        RankFailedError,
        ModelLoadError,
        LoraError,
    )
}


class CoreEngine(Protocol):
    """What the core and its clients call on an LLMEngine: a stand-in (bench/engine_stand_ins.py) implements this."""

    model_dir: Path
    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    fingerprint: str

    @property
    def has_unfinished(self) -> bool: ...

    def prepare(self, prompt: Prompt, params: SamplingParams) -> list[int]: ...

    def add_prepared(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> StepResult: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


MakeEngine = Callable[[EngineConfig], CoreEngine]  # LLMEngine, or a stand-in (tests inject faults, benchmarks a paced core)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What a client needs from the loaded engine: its tokenizer's directory and the numbers prompts are checked by."""

    model_dir: str
    vocab_size: int
    max_model_len: int
    fingerprint: str
    stats: EngineStats


@dataclass(slots=True)
class StepReport:
    """One step's news. Across the pipe, deltas carry no prompt_token_ids (AsyncEngine.generate has them)."""

    stats: EngineStats  # after the step: applied before the outputs are handed out
    num_adds: int  # new requests the core took from the inbox for this step
    outputs: list[RequestOutput]
    failures: list[tuple[str, Exception]]  # requests that failed (refused on add, or failed in the step)
    lora_results: list[tuple[int, Exception | None]] = field(default_factory=list)  # (update_id, its error or None)

    def __getstate__(self) -> tuple:
        failures = [(request_id, error_info(exc)) for request_id, exc in self.failures]
        lora_results = [(update_id, None if exc is None else error_info(exc)) for update_id, exc in self.lora_results]
        return self.stats, self.num_adds, self.outputs, failures, lora_results

    def __setstate__(self, state: tuple) -> None:
        self.stats, self.num_adds, self.outputs, failures, lora_results = state
        self.failures = [(request_id, rebuild_error(info)) for request_id, info in failures]
        self.lora_results = [(update_id, None if info is None else rebuild_error(info)) for update_id, info in lora_results]


class EngineCore:
    """Owns the LLMEngine; step(inbox) applies the adds and aborts in order, steps if there is work, and reports."""

    def __init__(self, config: EngineConfig, make_engine: MakeEngine = LLMEngine) -> None:
        self.engine = make_engine(config)

    @property
    def has_work(self) -> bool:
        return self.engine.has_unfinished

    def facts(self) -> ModelFacts:
        engine = self.engine
        return ModelFacts(str(engine.model_dir), engine.vocab_size, engine.max_model_len, engine.fingerprint, engine.stats())

    def step(self, inbox: list[InboxItem]) -> StepReport:
        num_adds = 0
        failures: list[tuple[str, Exception]] = []
        lora_results: list[tuple[int, Exception | None]] = []
        for item in inbox:
            if isinstance(item, str):
                self.engine.abort(item)
                continue
            if isinstance(item, LoraUpdate):
                lora_results.append((item.update_id, _update_lora(self.engine, item)))
                continue
            num_adds += 1
            request_id, prompt_ids, params = item
            try:
                self.engine.add_prepared(request_id, prompt_ids, params)
            except Exception as exc:
                failures.append((request_id, exc))
        outputs: list[RequestOutput] = []
        if self.engine.has_unfinished:
            result = self.engine.step()
            outputs = result.outputs
            for request_id, exc in result.failed:
                failures.append((request_id, RequestFailedError(f"request failed in the engine: {exc}")))
        return StepReport(self.engine.stats(), num_adds, outputs, failures, lora_results)

    def close(self) -> None:
        self.engine.close()


def _update_lora(engine: CoreEngine, update: LoraUpdate) -> Exception | None:
    """Apply one adapter update -> None, or the caller's error to report (bad folder, unknown name), not the loop's."""
    if not isinstance(engine, LLMEngine):
        return LoraError("this engine serves no LoRA adapters")
    try:
        if update.path is None:
            engine.remove_lora(update.name)
        else:
            engine.add_lora(update.name, update.path)
    except Exception as exc:
        return exc
    return None


def error_info(exc: BaseException) -> ErrorInfo:
    param = getattr(exc, "param", None) if isinstance(exc, InvalidRequestError) else getattr(exc, "field", None)
    return type(exc).__name__, str(exc), param


def rebuild_error(info: ErrorInfo) -> Exception:
    """The exception error_info described: engine and builtin types as themselves, anything else as a RuntimeError."""
    name, message, param = info
    if name == InvalidRequestError.__name__:
        return InvalidRequestError(message, param=param)
    if name == ConfigError.__name__:
        return ConfigError(param or "", message)
    if name in _ERRORS:
        return _ERRORS[name](message)
    builtin = getattr(builtins, name, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        with contextlib.suppress(Exception):  # a builtin whose constructor wants more than a message
            return builtin(message)
    return RuntimeError(f"{name}: {message}")
