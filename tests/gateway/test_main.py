"""`sirocco serve`: flags over Settings, errors that name the flag or variable, checks before loading, the port bound
first, and DrainingServer's signal handling (drain once loaded, exit at once while loading) without a real socket."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import signal
import socket

import pytest
import torch
import uvicorn
from fake_engine import FakeEngine

from gateway.__main__ import DrainingServer
from gateway.app import create_app
from gateway.settings import Settings
from gateway.startup import StartupError, bind_socket, check_settings, parse_settings, warn_unknown_environment
from tests.conditions import wait_until


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


def test_bad_flag_value_names_the_flag_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(["serve", "--port", "not-a-port"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "sirocco serve: error: --port 'not-a-port': Input should be a valid integer" in err
    assert "usage:" not in err and "validation error" not in err
    assert len(err.splitlines()) == 2  # the error and a pointer to --help


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SIROCCO_PORT", "70000")
    with pytest.raises(SystemExit):
        parse_settings(["serve"])
    assert "SIROCCO_PORT='70000': Input should be less than or equal to 65535" in capsys.readouterr().err


def test_log_level_accepts_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIROCCO_LOG_LEVEL", "DEBUG")
    assert parse_settings(["serve"]).log_level == "debug"
    assert parse_settings(["serve", "--log-level", "Warning"]).log_level == "warning"


def test_a_misspelled_variable_is_warned_about_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SIROCCO_MAX_MODEL_LENGTH", "512")
    with caplog.at_level(logging.WARNING, logger="sirocco"):
        warn_unknown_environment()
    assert "ignoring SIROCCO_MAX_MODEL_LENGTH: no setting has that name; did you mean SIROCCO_MAX_MODEL_LEN?" in caplog.text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("sirocco ")


def test_serve_help_shows_each_default_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Port to bind (default: 8000; env SIROCCO_PORT)" in text
    assert "(default: unset; env SIROCCO_NUM_THREADS)" in text


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"block_size": 0}, "--block-size / SIROCCO_BLOCK_SIZE: block_size must be 8, 16, 32, 64 or 128 (got 0)"),
        ({"model": "/nonexistent"}, "--model / SIROCCO_MODEL: model path '/nonexistent' does not exist"),
        ({"device": "mps"}, "--device / SIROCCO_DEVICE: device 'mps' is not supported; use cpu, cuda or cuda:N"),
        ({"lora_modules": "a=/none"}, "--lora-modules / SIROCCO_LORA_MODULES: LoRA adapter /none needs adapter_config.json"),
        ({"lora_modules": "a"}, "--lora-modules / SIROCCO_LORA_MODULES: lora_modules entry 'a' is not name=path"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "--max-cpu-loras / SIROCCO_MAX_CPU_LORAS: max_cpu_loras (2) must be at least"),
    ],
)
def test_bad_settings_fail_before_loading(settings: dict, expected: str) -> None:
    with pytest.raises(StartupError) as caught:
        check_settings(Settings(**settings))
    assert str(caught.value).startswith(expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_says_so() -> None:
    with pytest.raises(StartupError, match=r"^--device / SIROCCO_DEVICE: device 'cuda': .*use cpu$"):
        check_settings(Settings(device="cuda"))


def test_a_context_longer_than_the_model_fails_before_loading(tiny_mistral_dir: pathlib.Path) -> None:
    with pytest.raises(StartupError, match=r"^--max-model-len / SIROCCO_MAX_MODEL_LEN: max_model_len 100000 is above"):
        check_settings(Settings(model=str(tiny_mistral_dir), max_model_len=100000))
    assert check_settings(Settings(model=str(tiny_mistral_dir), num_threads=3)).num_threads == 3


def test_a_busy_port_is_found_before_loading() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"^--port / SIROCCO_PORT: port {port} on 127.0.0.1 is already in use"):
            bind_socket(Settings(port=port))
    with bind_socket(Settings(port=0)) as sock:
        assert sock.getsockname()[1] > 0


def test_sigterm_drains_until_nothing_is_in_flight() -> None:
    app = create_app(Settings(drain_timeout_s=30), FakeEngine())
    state = app.state.gateway
    server = DrainingServer(uvicorn.Config(app), state)
    state.num_in_flight = 1
    server.handle_exit(signal.SIGTERM, None)
    assert state.is_draining and not server.should_exit
    assert asyncio.run(server.on_tick(1)) is False
    state.num_in_flight = 0
    assert asyncio.run(server.on_tick(2)) is True


def test_drain_timeout_stops_the_engine_then_ends_the_drain() -> None:
    """At the timeout the engine stops (pending streams end with an error event); the server exits once they have."""
    engine = FakeEngine()
    app = create_app(Settings(drain_timeout_s=0), engine)
    state = app.state.gateway
    server = DrainingServer(uvicorn.Config(app), state)
    state.num_in_flight = 3
    server.handle_exit(signal.SIGTERM, None)
    asyncio.run(server.on_tick(1))
    assert not server.should_exit  # the streams get to send their error event first
    wait_until(lambda: not engine.is_alive, "the engine to be stopped at the drain timeout", 30)
    state.num_in_flight = 0
    assert asyncio.run(server.on_tick(2)) is True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_loading_exits_at_once_and_non_zero(sig: signal.Signals) -> None:
    app = create_app(Settings())  # no engine: loading
    state = app.state.gateway
    server = DrainingServer(uvicorn.Config(app), state)
    server.handle_exit(sig, None)
    assert server.should_exit and not state.is_draining
    assert server.exit_status == 128 + sig


def test_a_failed_load_stops_the_server_with_status_1() -> None:
    app = create_app(Settings())
    state = app.state.gateway
    server = DrainingServer(uvicorn.Config(app), state)
    assert asyncio.run(server.on_tick(1)) is False  # still loading
    state.load_error = "model 'x/y' is not in the Hugging Face cache"
    assert asyncio.run(server.on_tick(2)) is True
    assert server.exit_status == 1
