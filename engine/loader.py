"""Find a checkpoint (local folder, GGUF file, Hub repo id, or the embedded model), read config.json, load its weights.

Weights are only ever read from safetensors or GGUF: folders with pickle files alone are refused, never unpickled.
The model is built on the meta device and each tensor goes from the file straight to its place on the target device.
A tensor-parallel rank reads only its own slice of each split tensor (safe_open's get_slice), never the whole tensor.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.config import ConfigError, EngineConfig
from engine.gguf_checkpoint import GGUFSelectionError, find_gguf_file, gguf_cache_root, gguf_model_dir, pick_gguf_file
from engine.gguf_file import GGUFError
from engine.gguf_layers import TensorReader, gguf_tensors, install_quantized
from engine.model.config import SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, ModelConfig
from engine.model.mistral import PACKED_MODULES, MistralForCausalLM
from engine.model.parallel import WHOLE, Partition
from engine.model.quant import QuantizedWeight
from engine.model.quant_kernels import load_quant_kernel
from engine.model.quant_linear import quantize_model

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
# Mistral's repos ship the same weights twice: Hugging Face shards and consolidated.safetensors (mistral-inference's
# own names, which this loader does not read). Skipping the latter halves the download (about 14 GB for a 7B model).
_HUB_IGNORE = ["consolidated*.safetensors"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(ValueError):
    """A checkpoint we cannot load, with a message the user can act on."""


def resolve_model_dir(config: EngineConfig) -> Path:
    """The local folder holding the checkpoint: the embedded model, a local directory, a GGUF file, or a Hub snapshot.
    A GGUF file (named by config.gguf_file, or the only one in a folder without safetensors) is served through the
    model directory gguf_checkpoint.py writes for it in Sirocco's cache."""
    if config.model is None:
        from engine.embedded import embedded_model_dir

        return _or_error(lambda: embedded_model_dir(config.cache_dir))
    path = Path(config.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _or_error(lambda: gguf_model_dir(path, config.cache_dir))
    if path.is_dir():
        return _or_error(lambda: _serve_from(path, config))
    if path.exists() or config.model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {config.model!r} is neither a directory nor a .gguf file")
    folder = _download(config)
    return _or_error(lambda: _serve_from(folder, config))


def _serve_from(folder: Path, config: EngineConfig) -> Path:
    """`folder` itself, or the model directory of the GGUF file chosen in it."""
    gguf_path = pick_gguf_file(folder, config.gguf_file)
    return folder if gguf_path is None else gguf_model_dir(gguf_path, config.cache_dir)


def _or_error(resolve: Callable[[], Path]) -> Path:
    try:
        return resolve()
    except (GGUFError, GGUFSelectionError) as exc:
        raise ModelLoadError(str(exc)) from exc


def _download(config: EngineConfig) -> Path:
    """A Hub snapshot (from the cache when it is there); any failure is one ModelLoadError saying what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    logger.info("downloading %s (revision %s)", config.model, config.revision or "main")
    try:
        folder = snapshot_download(
            config.model,
            revision=config.revision,
            token=config.hf_token,
            cache_dir=config.download_dir,
            allow_patterns=_hub_patterns(config),
            ignore_patterns=_HUB_IGNORE,
        )
    except GatedRepoError as exc:
        message = f"model {config.model!r} is gated: accept its licence on the Hub and give a token (HF_TOKEN)"
        raise ModelLoadError(message) from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"model {config.model!r} is neither a local directory nor a Hub repo this token can see; check the name"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelLoadError(f"revision {config.revision!r} of {config.model!r} does not exist on the Hub") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"model {config.model!r} is not a local directory and not in the Hugging Face cache, and the Hub cannot be "
            "reached (offline, HF_HUB_OFFLINE=1, or no network): check the name, or download it while online"
        ) from exc
    except OSError as exc:  # network errors, a full disk, an unwritable cache
        raise ModelLoadError(f"could not download {config.model!r}: {exc}") from exc
    return Path(folder)


def _hub_patterns(config: EngineConfig) -> list[str]:
    """What to download: safetensors and their metadata, or with gguf_file that one file instead of any safetensors."""
    if config.gguf_file is None:
        return _HUB_PATTERNS
    return [p for p in _HUB_PATTERNS if p != "*.safetensors"] + [config.gguf_file]


def check_max_model_len(config: EngineConfig, model_config: ModelConfig) -> None:
    """The context length asked for must fit the model's positions (raises ConfigError naming max_model_len)."""
    if config.max_model_len is not None and config.max_model_len > model_config.max_position_embeddings:
        raise ConfigError(
            "max_model_len",
            f"max_model_len {config.max_model_len} is above the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}); lower it or leave it unset",
        )


def read_model_config(model_dir: Path) -> ModelConfig:
    """config.json -> ModelConfig, refusing architectures we do not implement."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json")
    raw: dict[str, Any] = json.loads(config_path.read_text())
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    # transformers >= 5 writes rope settings under rope_parameters; older files use rope_theta + rope_scaling.
    rope = dict(raw.get("rope_scaling") or {})
    rope.update(raw.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    num_heads = raw["num_attention_heads"]
    return ModelConfig(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        rope_factor=rope.get("factor", 1.0),
        rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
        rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
        rope_original_max_position_embeddings=rope.get("original_max_position_embeddings", 8192),
        sliding_window=raw.get("sliding_window") if model_type == "mistral" else None,
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", False),
    )


def load_model(
    model_dir: Path,
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    partition: Partition = WHOLE,
    quantization: Quantization | None = None,
) -> MistralForCausalLM:
    """Build on the meta device, then fill every parameter from safetensors on `device` in `dtype` (this rank's slices);
    with `quantization`, the projections and lm_head are then quantized (the float copies freed as they are replaced)."""
    start = time.perf_counter()
    gguf_path = find_gguf_file(model_dir)
    files = [] if gguf_path is not None else _safetensors_files(model_dir)
    with torch.device("meta"):
        model = MistralForCausalLM(model_config, partition)
    model = model.to(dtype).to_empty(device=device)
    params = dict(model.named_parameters())
    expected = _checkpoint_names(params)
    seen: set[str] = set()
    unexpected: list[str] = []
    if gguf_path is not None and quantization is not None:
        raise ConfigError("quantization", "a GGUF file is served at its own precision: leave quantization unset")
    quantized: dict[str, QuantizedWeight] = {}  # a GGUF file's int4/int8 weights, kept as they are (one rank only)
    if gguf_path is not None:
        tensors = _gguf_readers(gguf_path, model_config, quantized if partition.world_size == 1 else None)
    else:
        tensors = _safetensors_tensors(files, device)
    for name, read in tensors:
        if name not in expected:
            if not (name == "lm_head.weight" and model.lm_head is None) and "rotary_emb" not in name:
                unexpected.append(name)
            continue
        target, rows = _target(model, name)
        tensor = read(partition.shard(name, model_config))
        if tensor is None:  # goes into a quantized layer as it is, after this loop
            seen.add(name)
            continue
        dest = params[target].data if rows is None else params[target].data[rows[0] : rows[1]]
        if dest.shape != tensor.shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(dest.shape)}")
        dest.copy_(tensor)
        seen.add(name)
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint does not match the model; missing tensors: {missing or 'none'}; unexpected: {unexpected or 'none'}"
        )
    model.model.rotary_emb.build(device, dtype)
    if quantization is not None:
        quantize(model, quantization, device, dtype)
    if quantized:
        install_quantized(model, quantized, gguf_cache_root(model_dir), device, dtype)
    if partition.rank == 0:  # only rank 0 computes logits
        model.pack_cpu_logits()
    model.eval().requires_grad_(False)
    logger.info("loaded %s in %.1fs (%s, %s)", gguf_path or model_dir, time.perf_counter() - start, device, dtype)
    return model


def _gguf_readers(
    gguf_path: Path, model_config: ModelConfig, quantized: dict[str, QuantizedWeight] | None
) -> Iterator[tuple[str, TensorReader]]:
    """gguf_layers.gguf_tensors, with a damaged file's error as a ModelLoadError."""
    try:
        yield from gguf_tensors(gguf_path, model_config, quantized)
    except GGUFError as exc:
        raise ModelLoadError(str(exc)) from exc


def _safetensors_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, TensorReader]]:
    """Each tensor's name and reader; a tensor is only read if the loader asks (safe_open stays open meanwhile)."""
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, functools.partial(_read_tensor, f, name)


@dataclass(frozen=True, slots=True)
class Quantization:
    """EngineConfig's quantization settings, and where the CPU kernel is built."""

    method: str  # "int8" | "int4"
    group_size: int
    kernel_dir: Path  # the C kernel's build cache (CPU fp32 only)


def quantization_of(config: EngineConfig, kernel_dir: Path) -> Quantization | None:
    return None if config.quantization is None else Quantization(config.quantization, config.quantization_group_size, kernel_dir)


def quantize(model: MistralForCausalLM, quantization: Quantization, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize a loaded float model in place; the group size must divide every projection's input size."""
    c = model.config
    in_sizes = {c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size // model.partition.world_size}
    if any(size % quantization.group_size for size in in_sizes):
        raise ConfigError(
            "quantization_group_size",
            f"quantization_group_size {quantization.group_size} must divide the model's layer input sizes "
            f"({', '.join(map(str, sorted(in_sizes)))}); try 32",
        )
    start = time.perf_counter()
    is_cpu_fp32 = device.type == "cpu" and dtype == torch.float32
    kernel = load_quant_kernel(quantization.kernel_dir) if is_cpu_fp32 else None
    quantize_model(model, quantization.method, quantization.group_size, kernel)
    path = "C kernel" if kernel is not None else "PyTorch dequantize + matmul"
    logger.info("quantized to %s (group %d, %s) in %.1fs", quantization.method, quantization.group_size, path,
                time.perf_counter() - start)  # fmt: skip


def _read_tensor(f: Any, name: str, shard: tuple[int, int, int] | None) -> torch.Tensor:
    """The whole tensor, or only the rows (dim 0) or columns (dim 1) of this rank's slice."""
    if shard is None:
        return f.get_tensor(name)
    dim, begin, end = shard
    view = f.get_slice(name)
    return view[begin:end] if dim == 0 else view[:, begin:end]


def _checkpoint_names(params: dict[str, torch.nn.Parameter]) -> set[str]:
    """The Hugging Face tensor names that fill our parameters (a fused matrix is filled by several)."""
    shards: dict[str, list[str]] = {}
    for hf_name, (fused, _) in PACKED_MODULES.items():
        shards.setdefault(fused, []).append(hf_name)
    names = set()
    for name in params:
        parts = name.split(".")
        fused = next((p for p in parts if p in shards), None)
        names.update([name] if fused is None else (name.replace(f".{fused}.", f".{hf}.") for hf in shards[fused]))
    return names


def _target(model: MistralForCausalLM, name: str) -> tuple[str, tuple[int, int] | None]:
    """Checkpoint tensor name -> (our parameter name, row range inside a fused matrix or None)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in PACKED_MODULES:
            fused, shard = PACKED_MODULES[part]
            sizes = model.packed_shard_sizes(fused)
            begin = sum(sizes[:shard])
            return ".".join([*parts[:i], fused, *parts[i + 1 :]]), (begin, begin + sizes[shard])
    return name, None


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{model_dir} holds only pickle weights ({', '.join(pickles)}); Sirocco loads safetensors only, because "
            "unpickling can run arbitrary code. Convert the checkpoint to safetensors first."
        )
    raise ModelLoadError(f"{model_dir} holds no *.safetensors weights")


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, config.dtype)
