"""load_engine: builds the AsyncEngine on a daemon thread while the server already answers (/health 503 "loading").

The thread is never joined: a signal during loading ends the process at once instead of waiting minutes for a load that
cannot be interrupted. A load failure is logged as one line (the traceback only at debug level) and kept in the state,
which tells the server to exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from engine import AsyncEngine, EngineClient
from gateway.state import GatewayState

logger = logging.getLogger("sirocco")


async def load_engine(state: GatewayState) -> None:
    """Load, start and publish the engine on `state`; on failure set state.load_error. Cancelling abandons the load."""
    loop = asyncio.get_running_loop()
    loaded: asyncio.Future[EngineClient] = loop.create_future()

    def report(outcome: EngineClient | BaseException) -> None:
        if loaded.done():
            return  # the load was abandoned (shutdown during loading)
        if isinstance(outcome, BaseException):
            loaded.set_exception(outcome)
        else:
            loaded.set_result(outcome)

    def load() -> None:
        try:
            outcome: EngineClient | BaseException = AsyncEngine(state.settings.engine_config())
        except BaseException as exc:  # handed to the event loop, which logs it
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is gone
            loop.call_soon_threadsafe(report, outcome)

    start_s = time.perf_counter()
    logger.info("loading the model %s; /health answers 503 until it is ready", state.settings.model_name)
    threading.Thread(target=load, name="sirocco-load", daemon=True).start()
    try:
        engine = await loaded
    except Exception as exc:
        state.load_error = str(exc) or type(exc).__name__
        logger.error("could not load the model: %s", state.load_error, exc_info=logger.isEnabledFor(logging.DEBUG))
        return
    engine.start()
    state.engine = engine
    logger.info("ready in %.1fs: serving %s", time.perf_counter() - start_s, state.settings.model_name)
