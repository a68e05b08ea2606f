"""`sirocco serve [--model ...] [--host ...] [--port ...]`: check the settings, bind the port, then serve while the model loads.

Order: flags over Settings (gateway/startup.py) -> every setting checked -> port bound -> uvicorn, whose lifespan loads the
engine in the background (/health 503 "loading" meanwhile). A startup failure is one log line and exit 1 (the traceback
only with --log-level debug). SIGINT or SIGTERM while loading exits at once with 128 + the signal number, leaving the
load where it is (exit_abandoning_the_load). Once loaded, SIGTERM drains: new requests get 503 (and /health 503) while
in-flight ones run up to drain_timeout_s, then exit 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import uvicorn

if TYPE_CHECKING:
    from gateway.state import GatewayState

logger = logging.getLogger("sirocco")
_GRACEFUL_SHUTDOWN_S = 2.0  # after the drain: time for idle keep-alive connections to close
_EXPIRED_DRAIN_GRACE_S = 5.0  # after the drain timeout: time for the streams to send their final error event
_CHILD_EXIT_TIMEOUT_S = 5.0  # after SIGTERM to a child process still loading, before SIGKILL


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that exits at once on a signal while loading, drains on the first SIGTERM once loaded, and exits
    when the load fails. A second signal, or SIGINT once loaded, exits as uvicorn does."""

    def __init__(self, config: uvicorn.Config, state: GatewayState) -> None:
        super().__init__(config)
        self._state = state
        self._drain_deadline_s: float | None = None
        self._engine_stop_s: float | None = None  # when the drain timed out and the engine was stopped
        self.interrupted_by: int | None = None  # the signal that stopped a load still under way

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._state.is_loading:
            self.interrupted_by = sig  # not re-raised by uvicorn at exit: main() turns it into the exit status
            self.should_exit = True
            return
        if sig == signal.SIGTERM and self._drain_deadline_s is None:
            self._state.begin_drain()  # only flags here: this runs inside a signal handler
            self._drain_deadline_s = time.monotonic() + self._state.settings.drain_timeout_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._state.load_error is not None:
            self.should_exit = True
        elif self._drain_deadline_s is not None and not self.should_exit:
            num_in_flight = self._state.num_in_flight
            if num_in_flight == 0:
                logger.info("drained; shutting down")
                self.should_exit = True
            elif self._engine_stop_s is not None:
                if time.monotonic() >= self._engine_stop_s + _EXPIRED_DRAIN_GRACE_S:
                    logger.warning("drain timeout: closing %d connections that did not end", num_in_flight)
                    self.should_exit = True
            elif time.monotonic() >= self._drain_deadline_s:
                # Stop the engine instead of cutting connections: every pending request then ends with an error (one
                # final SSE error event, or a 503), so no client sees a stream that simply stops mid-way.
                logger.warning("drain timeout: ending %d in-flight requests with an error", num_in_flight)
                self._engine_stop_s = time.monotonic()
                self._state.stop_engine_in_background()
            elif counter % 10 == 0:
                logger.info("draining: %d requests in flight", num_in_flight)
        return await super().on_tick(counter)

    @property
    def exit_status(self) -> int:
        if self.interrupted_by is not None:
            logger.info("interrupted by %s while loading; exiting", signal.Signals(self.interrupted_by).name)
            return 128 + self.interrupted_by
        return 1 if self._state.load_error is not None or not self.started else 0


def main(argv: Sequence[str] | None = None) -> None:
    try:
        sys.exit(serve(argv))
    except KeyboardInterrupt:  # Ctrl+C while importing torch (seconds), or once loaded (uvicorn re-raises it at exit)
        if logging.getLogger().handlers:
            logger.info("interrupted; exiting")
        else:
            print("sirocco: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def serve(argv: Sequence[str] | None = None) -> int:
    """Run `sirocco ...` and return the exit status; a signal while loading ends the process here instead."""
    # Imported here so that main() catches a Ctrl+C during these imports (torch, transformers) and ends quietly.
    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.startup import StartupError, bind_socket, check_settings, parse_settings, warn_unknown_environment

    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_json)
    warn_unknown_environment()
    try:
        check_settings(settings)
        sock = bind_socket(settings)
    except StartupError as exc:
        logger.error("%s", exc, exc_info=logger.isEnabledFor(logging.DEBUG))
        return 1
    logger.info("listening on http://%s:%d", settings.host, sock.getsockname()[1])
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # GatewayMiddleware writes the access log, with the request id
        timeout_graceful_shutdown=int(_GRACEFUL_SHUTDOWN_S),
        lifespan="on",
    )
    server = DrainingServer(config, app.state.gateway)
    server.run(sockets=[sock])
    if server.interrupted_by is not None:
        exit_abandoning_the_load(server.exit_status)
    return server.exit_status


def exit_abandoning_the_load(status: int) -> NoReturn:
    """Exit with `status` at once, skipping the interpreter's shutdown, while the load thread is still at work.

    The load runs on a daemon thread, mostly inside torch with the GIL released (reading the weights, zeroing the KV
    cache). A normal exit finalizes the interpreter; a daemon thread that then comes back for the GIL is ended with
    pthread_exit, whose unwinding through torch's C++ frames calls std::terminate: "terminate called without an active
    exception" and SIGABRT instead of 128 + the signal. So nothing more runs in Python: the logs are flushed, child
    processes still loading (the engine-core process, tensor-parallel ranks) are stopped, and os._exit ends the process.
    """
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(_CHILD_EXIT_TIMEOUT_S)
        if child.exitcode is None:
            child.kill()
            child.join()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
