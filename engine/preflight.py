"""check_config: what can be checked about an EngineConfig before anything loads (device, local model path, context length).

Raises ConfigError naming the field, so a bad setting fails in a second instead of after minutes of downloading or loading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ConfigError, EngineConfig
from engine.embedded import GGUF_FILE, find_gguf_dir
from engine.gguf_checkpoint import GGUFSelectionError, pick_gguf_file
from engine.gguf_file import read_gguf
from engine.gguf_weights import gguf_model_config
from engine.loader import ModelLoadError, check_max_model_len, read_model_config
from engine.lora import LoraError, parse_lora_modules, read_adapter_config
from engine.model.config import ModelConfig


def check_config(config: EngineConfig) -> None:
    """Raise ConfigError for a device this machine lacks, a local model path that holds no model, or a context too long."""
    check_device(config.device)
    check_lora_modules(config)
    model_path = _local_model_path(config)
    if model_path is None:
        return  # a Hub repo: its config.json arrives with the download, and LLMEngine checks it before the weights
    try:
        model_config = _read_config(model_path)
    except (ModelLoadError, ValueError, KeyError) as exc:
        raise ConfigError("model", f"model {str(model_path)!r} cannot be served: {exc}") from exc
    check_max_model_len(config, model_config)


def _read_config(model_path: Path) -> ModelConfig:
    """From a GGUF file's header, or a folder's config.json."""
    if model_path.is_file():
        return gguf_model_config(read_gguf(model_path))
    return read_model_config(model_path)


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


def _local_model_path(config: EngineConfig) -> Path | None:
    """The model when it is on this machine already (a local folder or GGUF file, the embedded GGUF), else None."""
    if config.model is None:
        try:
            return find_gguf_dir() / GGUF_FILE
        except RuntimeError as exc:
            raise ConfigError("model", f"no model given and {exc}") from exc
    path = Path(config.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        try:
            return pick_gguf_file(path, config.gguf_file) or path
        except GGUFSelectionError as exc:
            raise ConfigError("gguf_file", str(exc)) from exc
    if path.exists():
        raise ConfigError("model", f"model path {config.model!r} is neither a directory nor a .gguf file")
    if config.model.startswith((".", "/", "~")) or config.model.count("/") > 1:
        raise ConfigError("model", f"model path {config.model!r} does not exist (a Hub repo id looks like owner/name)")
    return None
