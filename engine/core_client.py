"""The two clients of EngineCore, one interface: ThreadCoreClient runs it on a thread of this process,
ProcessCoreClient in a spawned child behind two pipes, so the HTTP side's GIL never delays a step.

Both are given the AsyncEngine's side as CoreHooks: they take the inbox when woken, hand over one StepReport a step,
and say once why the loop ended. Both hold what AsyncEngine needs without
stepping: the tokenizer, `prepare`, vocab_size, max_model_len, fingerprint and the stats before the first step.

The child: parent -> child, batches of inbox items (None to stop), drained once per step, blocking when idle; child ->
parent, ("loaded", ModelFacts) or ("load_failed", ErrorInfo), then one ("step", StepReport) a step, ("died", why) if
the loop itself failed. It exits when the parent's pipe reads EOF; its tensor-parallel ranks follow through their lifeline.
"""

from __future__ import annotations

import atexit
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

from engine.config import EngineConfig
from engine.engine_core import EngineCore, InboxItem, MakeEngine, ModelFacts, StepReport, error_info, rebuild_error
from engine.errors import EngineDeadError
from engine.outputs import EngineStats
from engine.processes import exit_reason
from engine.prompts import Prompt, check_prompt, tokenize_prompt
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


_STOP_TIMEOUT_S = 30.0  # after the stop message, how long the loop gets to finish its step and exit
_KILL_TIMEOUT_S = 5.0  # after terminate() (SIGTERM), before kill()


@dataclass(frozen=True, slots=True)
class CoreHooks:
    """The AsyncEngine's side, as a client calls it."""

    wakeup: threading.Event  # set when the inbox has news or the client should stop
    take_inbox: Callable[[], list[InboxItem]]
    on_report: Callable[[StepReport], None]
    on_exit: Callable[[str | None], None]  # once, with why the loop ended (None after shutdown)


class ThreadCoreClient:
    """Builds the EngineCore on its loop thread, waits until it is loaded (re-raising a load error), then steps there.

    Every torch call runs on the loop thread, loading included. A thread that ever ran a parallel torch op keeps an
    OpenMP team of its own, and once OpenMP manages more threads than there are cores, its workers stop spin-waiting
    between ops: decode ran 7-15% slower on 2 cores when the engine was loaded on one thread and stepped on another.
    """

    def __init__(self, config: EngineConfig, make_engine: MakeEngine, hooks: CoreHooks) -> None:
        self._hooks = hooks
        self._is_stopping = False
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.core: EngineCore  # set on the loop thread
        self._thread = threading.Thread(target=self._main, args=(config, make_engine), name="sirocco-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        engine = self.core.engine
        self.tokenizer: Tokenizer = engine.tokenizer
        self.prepare = engine.prepare  # also compiles the request's grammar, off the loop thread
        self.vocab_size, self.max_model_len, self.fingerprint = engine.vocab_size, engine.max_model_len, engine.fingerprint
        self.initial_stats: EngineStats = engine.stats()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._is_stopping = True
        self._hooks.wakeup.set()
        self._thread.join(timeout=_STOP_TIMEOUT_S)

    def _main(self, config: EngineConfig, make_engine: MakeEngine) -> None:
        try:
            self.core = EngineCore(config, make_engine)
        except BaseException as exc:  # re-raised by __init__ on the caller's thread
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        why: str | None = None
        try:
            while not self._is_stopping:
                if not self.core.has_work:
                    self._hooks.wakeup.wait()
                self._hooks.wakeup.clear()
                self._hooks.on_report(self.core.step(self._hooks.take_inbox()))
        except BaseException as exc:  # the loop itself died: nobody pending may hang
            logger.exception("engine loop died")
            why = f"engine loop died: {exc!r}"
        finally:
            self._hooks.on_exit(why)
            self.core.close()


class ProcessCoreClient:
    """Starts the child and waits until it has loaded the model (re-raising its load error), then runs two threads.

    The sender waits on `wakeup`, takes the inbox and sends it as one batch. The reader hands each StepReport to
    `on_report` and, once the pipe reads EOF or the child is dead, calls `on_exit` once.
    """

    def __init__(self, config: EngineConfig, make_engine: MakeEngine, hooks: CoreHooks) -> None:
        self._hooks = hooks
        self._is_stopping = False
        context = get_context("spawn")  # never fork a process that holds torch threads (and maybe CUDA)
        child_requests, self._requests = context.Pipe(duplex=False)
        self._outputs, child_outputs = context.Pipe(duplex=False)
        # Not a daemon: a daemonic process may not start children, and tensor-parallel ranks are the child's children.
        self.process = context.Process(
            target=run_engine_core,
            args=(config, make_engine, child_requests, child_outputs, _log_setup()),
            name="sirocco-engine-core",
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
        self.vocab_size, self.max_model_len, self.fingerprint = facts.vocab_size, facts.max_model_len, facts.fingerprint
        self.initial_stats = facts.stats
        self._sender = threading.Thread(target=self._send_loop, name="sirocco-engine-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="sirocco-engine-reader", daemon=True)
        self._sender.start()
        self._reader.start()

    def prepare(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """LLMEngine.prepare without the model: tokenize and check (the child compiles the grammar); InvalidRequestError."""
        prompt_ids = tokenize_prompt(self.tokenizer, prompt)
        check_prompt(prompt_ids, params, self.vocab_size, self.max_model_len)
        return prompt_ids

    @property
    def is_running(self) -> bool:
        return self._reader.is_alive()

    def shutdown(self) -> None:
        """Stop message, then wait for the child (terminate, then kill, if it does not exit); idempotent."""
        self._is_stopping = True
        self._hooks.wakeup.set()
        self._sender.join(timeout=_STOP_TIMEOUT_S)
        self._stop_process(timeout_s=_STOP_TIMEOUT_S)
        self._reader.join(timeout=_STOP_TIMEOUT_S)

    def _wait_loaded(self) -> ModelFacts:
        try:
            kind, body = self._outputs.recv()  # loading may take minutes; EOF if the child dies
        except (EOFError, OSError):
            why = exit_reason(self.process)
            raise EngineDeadError(f"the engine process ended while loading the model: {why}") from None
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
                self._hooks.wakeup.wait()
                self._hooks.wakeup.clear()
                inbox = self._hooks.take_inbox()
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
                    self._hooks.on_report(body)
                else:  # "died": the step loop itself failed; EOF follows
                    why = body
        except (EOFError, OSError):
            pass
        except BaseException as exc:
            logger.exception("the engine reader thread died")
            why = f"the engine reader thread died: {exc!r}"
        if why is None and not self._is_stopping:
            why = f"the engine process died: {exit_reason(self.process)}"
            logger.error("%s", why)
        self._outputs.close()
        self._hooks.on_exit(why)


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
    config: EngineConfig,
    make_engine: MakeEngine,
    requests: Connection,
    outputs: Connection,
    log_setup: tuple[int, logging.Formatter | None],
) -> None:
    """Entry point of the child: load the core, report ("loaded", ModelFacts) or ("load_failed", ErrorInfo), then step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides, then stops us
    level, formatter = log_setup
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(level)
    try:
        core = EngineCore(config, make_engine)
    except BaseException as exc:
        logger.debug("could not load the engine", exc_info=True)
        with contextlib.suppress(OSError):
            outputs.send(("load_failed", error_info(exc)))
        return
    try:
        outputs.send(("loaded", core.facts()))
        _serve(core, requests, outputs)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("the engine's parent process is gone: exiting")
    except BaseException as exc:
        logger.exception("engine loop died")
        with contextlib.suppress(OSError):
            outputs.send(("died", f"engine loop died: {exc!r}"))
    finally:
        core.close()


def _serve(core: EngineCore, requests: Connection, outputs: Connection) -> None:
    """Take what the parent sent (waiting for it when idle), step, report. Returns on the stop message."""
    while True:
        batches = [] if core.has_work else [requests.recv()]
        while requests.poll():
            batches.append(requests.recv())
        if any(batch is None for batch in batches):
            return
        report = core.step([item for batch in batches for item in batch])
        for output in report.outputs:
            output.prompt_token_ids = []
        outputs.send(("step", report))
