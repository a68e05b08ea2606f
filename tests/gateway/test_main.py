"""`sirocco serve` flags over Settings, and the SIGTERM drain of DrainingServer (without a real socket)."""

from __future__ import annotations

import asyncio
import signal

import pytest
import uvicorn
from fake_engine import FakeEngine

from gateway.__main__ import DrainingServer, parse_settings
from gateway.app import create_app
from gateway.settings import Settings


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIROCCO_PORT", "1234")
    monkeypatch.setenv("SIROCCO_HOST", "0.0.0.0")
    settings = parse_settings(["serve", "--port", "9000", "--enforce-eager", "--api-keys", "a,b", "--model", "/models/x"])
    assert (settings.port, settings.host, settings.enforce_eager, settings.model) == (9000, "0.0.0.0", True, "/models/x")
    assert [key.get_secret_value() for key in settings.api_keys] == ["a", "b"]
    assert parse_settings(["serve", "--no-enable-prefix-caching"]).enable_prefix_caching is False


def test_defaults_serve_the_embedded_model_on_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SIROCCO_MODEL", "SIROCCO_HOST", "SIROCCO_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = parse_settings(["serve"])
    assert (settings.model, settings.host, settings.port, settings.model_name) == (
        None,
        "127.0.0.1",
        8000,
        "SmolLM2-135M-Instruct",
    )


def test_bad_flag_value_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(["serve", "--port", "not-a-port"])
    assert caught.value.code == 2
    assert "port" in capsys.readouterr().err


def test_sigterm_drains_until_nothing_is_in_flight() -> None:
    app = create_app(Settings(drain_timeout_s=30), FakeEngine())  # type: ignore[arg-type]
    state = app.state.gateway
    server = DrainingServer(uvicorn.Config(app), state)
    state.num_in_flight = 1
    server.handle_exit(signal.SIGTERM, None)
    assert state.is_draining and not server.should_exit
    assert asyncio.run(server.on_tick(1)) is False
    state.num_in_flight = 0
    assert asyncio.run(server.on_tick(2)) is True


def test_drain_timeout_ends_the_drain() -> None:
    app = create_app(Settings(drain_timeout_s=0), FakeEngine())  # type: ignore[arg-type]
    state = app.state.gateway
    server = DrainingServer(uvicorn.Config(app), state)
    state.num_in_flight = 3
    server.handle_exit(signal.SIGTERM, None)
    assert asyncio.run(server.on_tick(1)) is True
