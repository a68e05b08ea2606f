"""EngineConfig: every knob of the engine, frozen, checked on construction. Built by the gateway's Settings or by tests."""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A setting the engine cannot run with; `field` names the EngineConfig field, so callers can name their own flag."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # local directory, .gguf file or Hub repo id; None: the embedded SmolLM2 model
    gguf_file: str | None = None  # the GGUF file to serve from the model's folder or repo; None: its only one, if any
    revision: str | None = None
    hf_token: str | None = None
    download_dir: str | None = None  # Hub cache; None: huggingface_hub's default
    cache_dir: str | None = None  # Sirocco's own cache (GGUF model directories, kernels); None: ~/.cache/sirocco
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16
    device: str | None = None  # None: cuda if available, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_gib / gpu_memory_utilization
    kv_cache_gib: float | None = None  # None: 1 GiB on CPU, gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int = 1024
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs
    seed: int = 0
    num_threads: int | None = None  # torch threads on CPU; None: one fewer than the CPUs this process may use (engine/threads.py)
    tensor_parallel_size: int = 1  # ranks (processes) the model is split over; >1 starts ranks 1..N-1 as worker processes
    distributed_timeout_s: float = 120.0  # a tensor-parallel step collective not done by then fails the engine
    engine_process: bool = False  # True: the step loop runs in its own process (engine_core.py), not on a thread
    # Postprocess step N-1 (detokenize, stop strings, deltas) while the device runs step N; None: on CUDA without tensor
    # parallelism. On CPU the forward runs on the calling thread, so overlap would only delay each step's outputs.
    async_output: bool | None = None
    # Look-ahead scheduling: launch step N+1 before waiting for step N, feeding N's sampled tokens to N+1 on the device
    # (llm_engine.py). Off by default until a GPU run measures it. Steps with a live request that needs N's token on the
    # host (structured outputs, penalties, n > 1, prompt logprobs) and tensor parallelism fall back to the usual order.
    # Greedy and seeded outputs are the same as with it off; unseeded sampling may differ. Implies async output.
    async_scheduling: bool = False
    # Weight-only quantization of a safetensors model's linear layers and lm_head at load (engine/model/quant_linear.py):
    # None (float weights), int8 (symmetric) or int4 (asymmetric), with one scale per quantization_group_size weights.
    quantization: str | None = None
    quantization_group_size: int = 32

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
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            message = f"gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})"
            raise ConfigError("gpu_memory_utilization", message)
