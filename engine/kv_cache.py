"""KV-cache tensors: one key and one value tensor per layer, [num_blocks, block_size, num_kv_heads, head_dim].

Sizing: on CUDA, what gpu_memory_utilization leaves after the weights and a profiling pass; on CPU, kv_cache_gib
(1 GiB by default); num_kv_blocks overrides both. Under tensor parallelism each rank holds the same blocks with only
its own K/V heads, and these budgets apply per rank.
"""

from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.model.config import ModelConfig
from engine.model.mistral import KVCache

_GIB = 1 << 30


def block_bytes(model_config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """Bytes one block takes across all layers, keys and values (num_kv_heads: a tensor-parallel rank's share)."""
    num_kv_heads = num_kv_heads or model_config.num_key_value_heads
    per_token = 2 * model_config.num_hidden_layers * num_kv_heads * model_config.head_dim
    return per_token * block_size * dtype.itemsize


def num_blocks_for(
    config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype, free_bytes: int | None, num_kv_heads: int | None = None
) -> int:
    """How many blocks fit: num_kv_blocks if set, else kv_cache_gib, else `free_bytes` (CUDA), else 1 GiB."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_gib is not None:
        budget = int(config.kv_cache_gib * _GIB)
    elif free_bytes is not None:
        budget = free_bytes
    else:
        budget = _GIB
    num_blocks = budget // block_bytes(model_config, config.block_size, dtype, num_kv_heads)
    if num_blocks < 1:
        raise ValueError("the KV cache budget holds no block; raise kv_cache_gib or gpu_memory_utilization")
    return num_blocks


def allocate_kv_cache(
    model_config: ModelConfig,
    num_blocks: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    num_kv_heads: int | None = None,
) -> KVCache:
    shape = (num_blocks, block_size, num_kv_heads or model_config.num_key_value_heads, model_config.head_dim)
    return [
        (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        for _ in range(model_config.num_hidden_layers)
    ]
