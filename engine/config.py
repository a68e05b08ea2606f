"""EngineConfig: every knob of the engine, frozen, checked on construction. Built by the gateway's Settings or by tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # local directory or Hub repo id; None: the embedded SmolLM2 model
    revision: str | None = None
    hf_token: str | None = None
    download_dir: str | None = None  # Hub cache; None: huggingface_hub's default
    cache_dir: str | None = None  # Sirocco's own cache (converted embedded model); None: ~/.cache/sirocco
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
    tensor_parallel_size: int = 1  # ranks (processes) the model is split over; >1 starts ranks 1..N-1 as worker processes
    distributed_timeout_s: float = 120.0  # a tensor-parallel step collective not done by then fails the engine

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("dtype must be one of auto, float32, bfloat16, float16")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError("block_size must be 8, 16, 32, 64 or 128")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be at least 1")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.distributed_timeout_s <= 0:
            raise ValueError("distributed_timeout_s must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
