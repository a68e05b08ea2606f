"""The engine's fingerprint: a short hash of everything that decides its outputs (model, weights' config, dtype, device,
context length, default seed, Sirocco's version), so a client can tell when the same request may answer differently.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from engine.config import EngineConfig


def _sirocco_version() -> str:
    try:
        return version("sirocco")
    except PackageNotFoundError:
        return "0.0.0"


def engine_fingerprint(
    config: EngineConfig, model_dir: Path, dtype: torch.dtype, device: torch.device, max_model_len: int
) -> str:
    """Hex digest (16 characters). Knobs that only change speed (batch sizes, KV-cache size, CUDA graphs, prefix caching)
    are left out: by design they never change an output."""
    config_json = model_dir / "config.json"
    facts = {
        "model": config.model or "embedded:SmolLM2-135M-Instruct",
        "revision": config.revision,
        "model_config_sha256": hashlib.sha256(config_json.read_bytes()).hexdigest() if config_json.is_file() else None,
        "dtype": str(dtype),
        "device": device.type,
        "max_model_len": max_model_len,
        "seed": config.seed,
        "sirocco": _sirocco_version(),
    }
    if config.quantization is not None:  # only then, so float setups keep their fingerprints
        facts["quantization"] = f"{config.quantization}-g{config.quantization_group_size}"
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
