"""The engine core in its own process: a spawned child owns the LLMEngine and its step loop, so the HTTP side's GIL
never delays a step. EngineCoreClient is the parent's side; AsyncEngine uses it when EngineConfig.engine_process is set.

Parent -> child (one pipe): batches of inbox items (adds and aborts), None to stop; the child drains them once per step
and blocks on the pipe when idle. Child -> parent (another pipe): one StepReport per step. Errors cross as (type name,
message, param) and are rebuilt, since engine exceptions with keyword fields do not round-trip through pickle. The child
exits when the parent's pipe reads EOF (the parent is gone); its tensor-parallel ranks follow it through their lifeline.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection, get_context
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from engine.config import ConfigError, EngineConfig
from engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    RankFailedError,
    RequestFailedError,
)
from engine.llm_engine import LLMEngine
from engine.loader import ModelLoadError
from engine.outputs import EngineStats, RequestOutput
from engine.prompts import Prompt, check_prompt, tokenize_prompt
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

InboxItem = tuple[str, list[int], SamplingParams] | str  # a new request (id, prompt ids, params), or an id to abort
ErrorInfo = tuple[str, str, str | None]  # (exception type name, message, param or config field)

_STOP_TIMEOUT_S = 30.0  # after the stop message, how long the child gets to finish its step and exit
_KILL_TIMEOUT_S = 5.0  # after terminate() (SIGTERM), before kill()
_ERRORS: dict[str, type[Exception]] = {  # the engine's own types whose constructor takes just a message
    cls.__name__: cls
    for cls in (EngineError, EngineOverloadedError, EngineDeadError, RequestFailedError, RankFailedError, ModelLoadError)
}


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the parent needs from the loaded engine: its tokenizer's directory and the numbers prompts are checked by."""

    model_dir: str
    vocab_size: int
    max_model_len: int
    fingerprint: str
    stats: EngineStats


@dataclass(slots=True)
class StepReport:
    """One step's news. Deltas carry no prompt_token_ids (AsyncEngine.generate has them): a long prompt is not resent."""

    stats: EngineStats  # after the step: applied before the outputs are handed out
    num_adds: int  # new requests the child took from the pipe for this step
    outputs: list[RequestOutput]
    failures: list[tuple[str, ErrorInfo]]  # requests that failed (refused on add, or failed in the step)


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


# --- the parent's side ---------------------------------------------------------------------------------------


class EngineCoreClient:
    """Starts the child and waits until it has loaded the model (re-raising its load error), then runs two threads.

    The sender waits on `wakeup`, takes the inbox and sends it as one batch. The reader hands each StepReport to
    `on_report` and, once the pipe reads EOF or the child is dead, calls `on_exit` once with why (None after shutdown).
    Holds the tokenizer and model facts that AsyncEngine needs without the model (`prepare`, `max_model_len`, ...).
    """

    def __init__(
        self,
        config: EngineConfig,
        wakeup: threading.Event,
        take_inbox: Callable[[], list[InboxItem]],
        on_report: Callable[[StepReport], None],
        on_exit: Callable[[str | None], None],
    ) -> None:
        self._wakeup, self._take_inbox, self._on_report, self._on_exit = wakeup, take_inbox, on_report, on_exit
        self._is_stopping = False
        context = get_context("spawn")  # never fork a process that holds torch threads (and maybe CUDA)
        child_requests, self._requests = context.Pipe(duplex=False)
        self._outputs, child_outputs = context.Pipe(duplex=False)
        # Not a daemon: a daemonic process may not start children, and tensor-parallel ranks are the child's children.
        self.process = context.Process(
            target=run_engine_core, args=(config, child_requests, child_outputs, _log_setup()), name="sirocco-engine-core"
        )
        self.process.start()
        child_requests.close()  # the child holds its own copies: its ends now close when it exits
        child_outputs.close()
        # At exit multiprocessing joins non-daemon children; closing our end first lets the child read EOF and exit, so
        # a program that never called shutdown() does not hang there (atexit runs this before multiprocessing's hook).
        atexit.register(self._requests.close)
        try:
            facts = self._wait_loaded()
            self.tokenizer = Tokenizer(facts.model_dir)
        except BaseException:
            self._stop_process(timeout_s=_STOP_TIMEOUT_S)
            raise
        self.vocab_size = facts.vocab_size
        self.max_model_len = facts.max_model_len
        self.fingerprint = facts.fingerprint
        self.initial_stats = facts.stats
        self._sender = threading.Thread(target=self._send_loop, name="sirocco-engine-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="sirocco-engine-reader", daemon=True)
        self._sender.start()
        self._reader.start()

    def prepare(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """LLMEngine.prepare without the model: tokenize and check; raises InvalidRequestError."""
        prompt_ids = tokenize_prompt(self.tokenizer, prompt)
        check_prompt(prompt_ids, params, self.vocab_size, self.max_model_len)
        return prompt_ids

    @property
    def is_running(self) -> bool:
        return self._reader.is_alive()

    def shutdown(self) -> None:
        """Stop message, then wait for the child (terminate, then kill, if it does not exit); idempotent."""
        self._is_stopping = True
        self._wakeup.set()
        self._sender.join(timeout=_STOP_TIMEOUT_S)
        self._stop_process(timeout_s=_STOP_TIMEOUT_S)
        self._reader.join(timeout=_STOP_TIMEOUT_S)

    def _wait_loaded(self) -> ModelFacts:
        try:
            kind, body = self._outputs.recv()  # loading may take minutes; EOF if the child dies
        except (EOFError, OSError):
            raise EngineDeadError(f"the engine process ended while loading the model: {self._exit_reason()}") from None
        if kind == "load_failed":
            raise rebuild_error(body)
        assert kind == "loaded", kind
        return body

    def _stop_process(self, timeout_s: float) -> None:
        self.process.join(timeout=timeout_s)
        if self.process.exitcode is None:
            logger.warning("the engine process did not exit within %.0f s: terminating it", timeout_s)
            self.process.terminate()
            self.process.join(timeout=_KILL_TIMEOUT_S)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        self._requests.close()

    def _send_loop(self) -> None:
        with contextlib.suppress(OSError):  # the child is gone: the reader reports it
            while not self._is_stopping:
                self._wakeup.wait()
                self._wakeup.clear()
                inbox = self._take_inbox()
                if inbox:
                    self._requests.send(inbox)
            self._requests.send(None)

    def _read_loop(self) -> None:
        why: str | None = None
        try:
            while True:
                ready = connection.wait([self._outputs, self.process.sentinel])
                if self._outputs not in ready:
                    break  # the child is dead and nothing more can arrive
                kind, body = self._outputs.recv()
                if kind == "step":
                    self._on_report(body)
                else:  # "died": the step loop itself failed; EOF follows
                    why = body
        except (EOFError, OSError):
            pass
        except BaseException as exc:
            logger.exception("the engine reader thread died")
            why = f"the engine reader thread died: {exc!r}"
        if why is None and not self._is_stopping:
            why = f"the engine process died: {self._exit_reason()}"
            logger.error("%s", why)
        self._outputs.close()
        self._on_exit(why)

    def _exit_reason(self) -> str:
        self.process.join(timeout=_KILL_TIMEOUT_S)  # its pipe closes a moment before its exit status is known
        code = self.process.exitcode
        if code is None:
            return "its pipe closed but it is still running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _log_setup() -> tuple[int, logging.Formatter | None]:
    """The parent's root log level and formatter, so the child's lines look like the parent's (None: not picklable)."""
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    try:
        ForkingPickler.dumps(formatter)  # what the pipe will do with it (serializing only: nothing is loaded here)
    except Exception:
        formatter = None
    return root.getEffectiveLevel(), formatter


# --- the child -----------------------------------------------------------------------------------------------


def run_engine_core(
    config: EngineConfig, requests: Connection, outputs: Connection, log_setup: tuple[int, logging.Formatter | None]
) -> None:
    """Entry point of the child: load the engine, report ("loaded", ModelFacts) or ("load_failed", ErrorInfo), then step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides, then stops us
    level, formatter = log_setup
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(level)
    try:
        engine = LLMEngine(config)
    except BaseException as exc:
        logger.debug("could not load the engine", exc_info=True)
        with contextlib.suppress(OSError):
            outputs.send(("load_failed", error_info(exc)))
        return
    try:
        vocab_size = engine.model_config.vocab_size
        facts = ModelFacts(str(engine.model_dir), vocab_size, engine.max_model_len, engine.fingerprint, engine.stats())
        outputs.send(("loaded", facts))
        _serve(engine, requests, outputs)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("the engine's parent process is gone: exiting")
    except BaseException as exc:
        logger.exception("engine loop died")
        with contextlib.suppress(OSError):
            outputs.send(("died", f"engine loop died: {exc!r}"))
    finally:
        engine.close()


def _serve(engine: LLMEngine, requests: Connection, outputs: Connection) -> None:
    """The step loop: take what the parent sent (waiting for it when idle), step, report. Returns on the stop message."""
    while True:
        batches = [] if engine.has_unfinished else [requests.recv()]
        while requests.poll():
            batches.append(requests.recv())
        if any(batch is None for batch in batches):
            return
        num_adds, failures = _take(engine, batches)
        step_outputs: list[RequestOutput] = []
        if engine.has_unfinished:
            result = engine.step()
            step_outputs = result.outputs
            for request_id, exc in result.failed:
                failures.append((request_id, error_info(RequestFailedError(f"request failed in the engine: {exc}"))))
        for output in step_outputs:
            output.prompt_token_ids = []
        outputs.send(("step", StepReport(engine.stats(), num_adds, step_outputs, failures)))


def _take(engine: LLMEngine, batches: list[list[InboxItem]]) -> tuple[int, list[tuple[str, ErrorInfo]]]:
    """Apply adds and aborts in the order the parent sent them -> (number of adds, the adds refused)."""
    num_adds = 0
    failures: list[tuple[str, ErrorInfo]] = []
    for batch in batches:
        for item in batch:
            if isinstance(item, str):
                engine.abort(item)
                continue
            num_adds += 1
            request_id, prompt_ids, params = item
            try:
                engine.add_request(request_id, prompt_ids, params)
            except Exception as exc:
                failures.append((request_id, error_info(exc)))
    return num_adds, failures
