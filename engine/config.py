"""EngineConfig: every knob of the engine, frozen, checked on construction. Built by the gateway's Settings or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A setting the engine cannot run with; `field` names the EngineConfig field, so callers can name their own flag."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def setting(default: Any, description: str, **bounds: float) -> Any:
    """A field the gateway's Settings offers as it is (flag, environment variable, docs row, chart value): its default,
    its one-line description, and bounds the Settings check first (ge, gt, le: pydantic's names)."""
    return field(default=default, metadata={"description": description, **bounds})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Every field is a setting (gateway/settings.py derives its engine part from these); __post_init__ checks them."""

    model: str | None = setting(
        None, "Local directory, .gguf file or Hugging Face repo id; unset: the embedded SmolLM2-135M-Instruct"
    )
    gguf_file: str | None = setting(
        None, "GGUF file to serve from the model's folder or Hub repo; unset: its only one, if it has no safetensors"
    )
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) of the model")
    hf_token: str | None = setting(None, "Hugging Face token for gated or private repos (also read from HF_TOKEN)")
    download_dir: str | None = setting(
        None, "Hugging Face cache directory for downloads; unset: huggingface_hub's default (HF_HOME)"
    )
    cache_dir: str | None = setting(None, "Sirocco's cache (GGUF model directories, compiled kernels); unset: ~/.cache/sirocco")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "Weight dtype; auto: bfloat16 on CUDA, float32 on CPU"
    )
    device: str | None = setting(None, "cuda, cuda:N or cpu; unset: cuda when available")
    max_model_len: int | None = setting(None, "Context length (prompt + output); unset: the model's", ge=1)
    block_size: int = setting(16, "Tokens per KV-cache block")
    num_kv_blocks: int | None = setting(None, "KV-cache blocks; unset: sized from memory", ge=1)
    kv_cache_gib: float | None = setting(None, "KV-cache size in GiB; unset: 1 on CPU, gpu_memory_utilization on CUDA", gt=0)
    gpu_memory_utilization: float = setting(0.9, "Fraction of GPU memory for weights, activations and KV cache", gt=0, le=1)
    max_num_seqs: int = setting(128, "Most sequences running at once", ge=1)
    max_num_batched_tokens: int = setting(2048, "Token budget of one engine step", ge=1)
    max_waiting_requests: int = setting(1024, "Waiting-queue bound; beyond it requests get 429", ge=1)
    enable_prefix_caching: bool = setting(True, "Reuse KV blocks of shared prompt prefixes")
    enforce_eager: bool = setting(False, "Disable CUDA graphs")
    seed: int = setting(0, "Seed for requests that do not give one")
    # Default: the CPUs this process may use; steps under 4 tokens run on one of them (engine/threads.py).
    num_threads: int | None = setting(
        None, "Torch threads on CPU; unset: the usable CPUs (affinity, cgroup limit); steps under 4 tokens use one", ge=1
    )
    # >1 starts ranks 1..N-1 as worker processes (distributed.py).
    tensor_parallel_size: int = setting(1, "Processes (GPUs on CUDA) the model is split over by tensor parallelism", ge=1)
    distributed_timeout_s: float = setting(
        120.0, "Seconds a tensor-parallel step collective may take before the engine fails", gt=0
    )
    engine_process: bool = setting(
        False, "Run the engine's step loop in its own process, away from the HTTP side's GIL"
    )  # engine_core.py, core_client.py
    # Postprocess step N-1 (detokenize, stop strings, deltas) while the device runs step N; None: on CUDA without tensor
    # parallelism. On CPU the forward runs on the calling thread, so overlap would only delay each step's outputs.
    async_output: bool | None = setting(
        None, "Postprocess a step while the device runs the next; unset: on CUDA without tensor parallelism"
    )
    # Look-ahead scheduling: launch step N+1 before waiting for step N, feeding N's sampled tokens to N+1 on the device
    # (llm_engine.py). Off by default until a GPU run measures it. Steps with a live request that needs N's token on the
    # host (structured outputs, penalties, n > 1, prompt logprobs) and tensor parallelism fall back to the usual order.
    # Greedy and seeded outputs are the same as with it off; unseeded sampling may differ. Implies async output.
    async_scheduling: bool = setting(
        False, "Launch each step before the previous one is read back (look-ahead scheduling; implies async_output)"
    )
    # Weight-only quantization of a safetensors model's projections and lm_head at load (engine/model/quant_linear.py):
    # int8 symmetric or int4 asymmetric, one scale (and zero) per quantization_group_size weights along the input.
    quantization: Literal["int8", "int4"] | None = setting(
        None, "Quantize a safetensors model's linear layers and lm_head at load (int8 or int4); unset: float weights"
    )
    quantization_group_size: int = setting(32, "Weights sharing one quantization scale (a multiple of 32)", ge=32)

    # LoRA (engine/lora.py): on when lora_modules names an adapter or runtime updates are allowed.
    lora_modules: str | None = setting(
        None, "LoRA adapters served beside the base model: comma-separated name=path (PEFT folder or Hub repo id)"
    )
    max_loras: int = setting(4, "LoRA adapters resident on the device at once (the adapter slots of each step)", ge=1)
    max_lora_rank: int = setting(16, "Highest LoRA rank accepted; adapters above it are refused at load", ge=1)
    max_cpu_loras: int | None = setting(
        None, "LoRA adapters kept in host memory (least recently used re-read from disk); unset: max_loras", ge=1
    )
    enable_lora_runtime_updates: bool = setting(
        False, "Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (adapters loaded from paths the server reads)"
    )

    @property
    def is_lora_enabled(self) -> bool:
        return bool(self.lora_modules and self.lora_modules.strip()) or self.enable_lora_runtime_updates

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("dtype", f"dtype must be one of auto, float32, bfloat16, float16 (got {self.dtype!r})")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError("block_size", f"block_size must be 8, 16, 32, 64 or 128 (got {self.block_size})")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting_requests", "num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"{name} must be at least 1 (got {value})")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("num_threads", f"num_threads must be at least 1 (got {self.num_threads})")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ConfigError("kv_cache_gib", f"kv_cache_gib must be positive (got {self.kv_cache_gib})")
        if self.tensor_parallel_size < 1:
            message = f"tensor_parallel_size must be at least 1 (got {self.tensor_parallel_size})"
            raise ConfigError("tensor_parallel_size", message)
        if self.distributed_timeout_s <= 0:
            message = f"distributed_timeout_s must be positive (got {self.distributed_timeout_s})"
            raise ConfigError("distributed_timeout_s", message)
        if self.async_scheduling and self.async_output is False:
            message = "async_scheduling needs async_output (a step's outputs come after the next step is launched)"
            raise ConfigError("async_scheduling", message)
        if self.quantization not in (None, "int8", "int4"):
            raise ConfigError("quantization", f"quantization must be int8, int4 or unset (got {self.quantization!r})")
        if self.quantization_group_size < 32 or self.quantization_group_size % 32:
            message = f"quantization_group_size must be a positive multiple of 32 (got {self.quantization_group_size})"
            raise ConfigError("quantization_group_size", message)
        if self.quantization is not None and self.tensor_parallel_size > 1:
            message = "quantization with tensor_parallel_size > 1 is not supported yet: use one or the other"
            raise ConfigError("quantization", message)
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"{name} must be at least 1 (got {value})")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            message = f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})"
            raise ConfigError("max_cpu_loras", message)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            message = f"gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})"
            raise ConfigError("gpu_memory_utilization", message)
