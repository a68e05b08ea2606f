"""`sirocco serve [--model ...] [--host ...] [--port ...]`: Settings from the environment, overridden by flags; uvicorn.

SIGTERM drains: new requests get 503 (and /health 503) while in-flight ones run up to drain_timeout_s, then uvicorn exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError

from gateway.app import create_app
from gateway.logs import configure_logging
from gateway.settings import Settings
from gateway.state import GatewayState

logger = logging.getLogger("sirocco")
_GRACEFUL_SHUTDOWN_S = 2.0  # after the drain: time for idle keep-alive connections to close


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of exiting; a second signal, or SIGINT, exits as usual."""

    def __init__(self, config: uvicorn.Config, state: GatewayState) -> None:
        super().__init__(config)
        self._state = state
        self._drain_deadline_s: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_deadline_s is None:
            self._state.begin_drain()  # only flags here: this runs inside a signal handler
            self._drain_deadline_s = time.monotonic() + self._state.settings.drain_timeout_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline_s is not None and not self.should_exit:
            num_in_flight = self._state.num_in_flight
            if num_in_flight == 0:
                logger.info("drained; shutting down")
                self.should_exit = True
            elif time.monotonic() >= self._drain_deadline_s:
                logger.warning("drain timeout: cancelling %d in-flight requests", num_in_flight)
                self.should_exit = True
            elif counter % 10 == 0:
                logger.info("draining: %d requests in flight", num_in_flight)
        return await super().on_tick(counter)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sirocco", description="OpenAI-compatible inference server for Mistral-family models")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve the model over HTTP", description="Flags override SIROCCO_* environment variables."
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            serve.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            serve.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=field.description)
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if name != "command" and value is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_json)
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
    server.run()
    if not server.started:
        sys.exit(1)  # the lifespan failed (model not found, ...)


if __name__ == "__main__":
    main()
