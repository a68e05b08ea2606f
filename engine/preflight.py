"""check_config: what can be checked about an EngineConfig before anything loads (device, local model path, context length).

Raises ConfigError naming the field, so a bad setting fails in a second instead of after minutes of downloading or loading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ConfigError, EngineConfig
from engine.embedded import EMBEDDED_MODEL_NAME, cache_root, find_gguf_dir, is_complete
from engine.loader import ModelLoadError, check_max_model_len, read_model_config
from engine.lora import LoraError, parse_lora_modules, read_adapter_config


def check_config(config: EngineConfig) -> None:
    """Raise ConfigError for a device this machine lacks, a local model path that holds no model, or a context too long."""
    check_device(config.device)
    check_lora_modules(config)
    model_dir = _local_model_dir(config)
    if model_dir is None:
        return  # a Hub repo: its config.json arrives with the download, and LLMEngine checks it before the weights
    try:
        model_config = read_model_config(model_dir)
    except (ModelLoadError, ValueError, KeyError) as exc:
        raise ConfigError("model", f"model {str(model_dir)!r} cannot be served: {exc}") from exc
    check_max_model_len(config, model_config)


def check_lora_modules(config: EngineConfig) -> None:
    """Each adapter of lora_modules well formed, and each local one's adapter_config.json supported (its tensors are
    checked against the model when the engine loads)."""
    try:
        for path in parse_lora_modules(config.lora_modules).values():
            if Path(path).expanduser().is_dir() or path.startswith((".", "/", "~")):
                read_adapter_config(Path(path).expanduser(), config.max_lora_rank)
    except LoraError as exc:
        raise ConfigError("lora_modules", str(exc)) from exc


def check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError("device", f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from exc
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ConfigError("device", f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if torch.version.cuda is None:
        raise ConfigError("device", f"device {device!r}: this torch build ({torch.__version__}) has no CUDA support; use cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device", f"device {device!r}: no CUDA GPU is visible to this process; use cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError("device", f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")


def _local_model_dir(config: EngineConfig) -> Path | None:
    """The model's folder when it is on this machine already (a local path, or the converted embedded model), else None."""
    if config.model is None:
        converted = cache_root(config.cache_dir) / EMBEDDED_MODEL_NAME
        if is_complete(converted):
            return converted
        try:
            find_gguf_dir()  # converted on first use, from this package
        except RuntimeError as exc:
            raise ConfigError("model", f"no model given and {exc}") from exc
        return None
    path = Path(config.model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError("model", f"model path {config.model!r} is not a directory")
    if config.model.startswith((".", "/", "~")) or config.model.count("/") > 1:
        raise ConfigError("model", f"model path {config.model!r} does not exist (a Hub repo id looks like owner/name)")
    return None
