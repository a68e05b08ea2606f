"""What `sirocco serve` does before the server starts: flags over Settings, every setting checked, the port bound.

Each failure is a StartupError whose message is one line naming the flag or variable and what to do; nothing here
loads the model, so a bad setting or a busy port is reported in a second rather than after minutes of loading.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from collections.abc import Sequence

from pydantic import ValidationError

from engine import ConfigError, EngineConfig, check_config
from gateway.app import package_version
from gateway.response_store import ResponseStoreConfigError, check_store
from gateway.settings import Settings, env_name, unknown_environment_names
from gateway.settings_doc import default_text

logger = logging.getLogger("sirocco")


class StartupError(Exception):
    """A reason not to start, worded for the user (one line)."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def setting_names(field: str) -> str:
    """How a user sets a field: '--block-size / SIROCCO_BLOCK_SIZE'."""
    return f"{flag_name(field)} / {env_name(field)}"


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `sirocco` parser and its `serve` subparser (one flag per Settings field; help shows default and variable)."""
    parser = argparse.ArgumentParser(prog="sirocco", description="OpenAI-compatible inference server for Mistral-family models")
    parser.add_argument("--version", action="version", version=f"sirocco {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve the model over HTTP", description="Flags override SIROCCO_* environment variables."
    )
    for name, field in Settings.model_fields.items():
        help_text = f"{field.description} (default: {default_text(name)}; env {env_name(name)})".replace("%", "%%")
        if field.annotation is bool:
            serve.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            serve.add_argument(flag_name(name), dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser, serve


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from the environment with flags on top; a bad value exits 2 with one line per bad flag or variable."""
    parser, serve = build_parser()
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if name != "command" and value is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:  # one line per bad value, without the 60-line usage: --help has it
        lines = [f"{serve.prog}: error: {_describe(error, overrides)}" for error in exc.errors()]
        serve.exit(2, "\n".join([*lines, f"(all settings: {serve.prog} --help)"]) + "\n")


def _describe(error: dict, overrides: dict[str, str]) -> str:
    """One pydantic error as '--port 70000: Input should be ...' or 'SIROCCO_PORT=70000: ...'."""
    loc = error.get("loc") or ("?",)
    key = str(loc[0])
    field = key if key in Settings.model_fields else key.removeprefix("SIROCCO_").lower()
    value = error.get("input")
    if field in overrides:
        where = f"{flag_name(field)} {value!r}"
    else:
        where = f"{env_name(field) if field in Settings.model_fields else key}={value!r}"
    return f"{where}: {error['msg']}"


def warn_unknown_environment() -> None:
    for name, closest in unknown_environment_names():
        hint = f"; did you mean {closest}?" if closest else ""
        logger.warning("ignoring %s: no setting has that name%s", name, hint)


def check_settings(settings: Settings) -> EngineConfig:
    """The engine's config, checked against this machine (device, local model path, context length) before any load,
    and the response store's settings."""
    try:
        config = settings.engine_config()
        check_config(config)
    except ConfigError as exc:
        raise StartupError(f"{setting_names(exc.field)}: {exc}") from exc
    try:
        check_store(settings)
    except ResponseStoreConfigError as exc:
        raise StartupError(f"{setting_names(exc.field)}: {exc}") from exc
    return config


def bind_socket(settings: Settings) -> socket.socket:
    """The listening socket, bound now so a busy port is found before the model loads."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            message = f"port {settings.port} on {settings.host} is already in use: stop the other server or pick another port"
            raise StartupError(f"{setting_names('port')}: {message}") from exc
        raise StartupError(f"{setting_names('host')}: cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock
