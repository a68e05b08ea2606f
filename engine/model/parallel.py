"""Tensor parallelism inside the model: which slice of each checkpoint tensor a rank holds, and the row-parallel linear.

Megatron-style: q/k/v and gate/up are split by output rows (whole heads, intermediate columns) and need no
communication; o_proj and down_proj are split by input columns and their partial outputs summed by an all-reduce.
K/V heads are split across ranks, or replicated when there are fewer K/V heads than ranks. The embedding and lm_head
stay whole (docs/tensor-parallel.md says why). With world_size 1 nothing is sliced and no collective runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.model.config import ModelConfig

# Hugging Face module name -> the dimension it is split along (0: output rows, column parallel; 1: input columns, row parallel)
_SPLIT_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


@dataclass(frozen=True, slots=True)
class Partition:
    """This process's place among the tensor-parallel ranks."""

    rank: int = 0
    world_size: int = 1

    def check(self, config: ModelConfig) -> None:
        """Raise ValueError when the model's heads or MLP cannot be split evenly over world_size ranks."""
        n, kv = self.world_size, config.num_key_value_heads
        if config.num_attention_heads % n or config.intermediate_size % n:
            raise ValueError(
                f"tensor_parallel_size {n} must divide num_attention_heads ({config.num_attention_heads}) "
                f"and intermediate_size ({config.intermediate_size})"
            )
        if kv % n and n % kv:
            raise ValueError(f"tensor_parallel_size {n} and num_key_value_heads {kv}: one must divide the other")

    def num_heads(self, config: ModelConfig) -> int:
        return config.num_attention_heads // self.world_size

    def num_kv_heads(self, config: ModelConfig) -> int:
        """K/V heads this rank holds: a share of them, or one replicated head when there are fewer than ranks."""
        return max(1, config.num_key_value_heads // self.world_size)

    def intermediate_size(self, config: ModelConfig) -> int:
        return config.intermediate_size // self.world_size

    def shard(self, name: str, config: ModelConfig) -> tuple[int, int, int] | None:
        """Checkpoint tensor name -> (dim, start, stop) of this rank's slice, or None when the rank reads it whole."""
        if self.world_size == 1:
            return None
        module = next((part for part in name.split(".") if part in _SPLIT_DIM), None)
        if module is None or (module in ("o_proj", "down_proj") and not name.endswith(".weight")):
            return None
        if module in ("gate_proj", "up_proj", "down_proj"):
            size = self.intermediate_size(config)
            return _SPLIT_DIM[module], self.rank * size, (self.rank + 1) * size
        if module in ("k_proj", "v_proj"):
            # Rank r's query heads all share K/V head r * kv // n (when kv < n, several ranks hold the same head).
            first, count = self.rank * config.num_key_value_heads // self.world_size, self.num_kv_heads(config)
        else:
            first, count = self.rank * self.num_heads(config), self.num_heads(config)
        return _SPLIT_DIM[module], first * config.head_dim, (first + count) * config.head_dim


WHOLE = Partition()  # one rank holding the whole model: no tensor parallelism


class RowParallelLinear(nn.Linear):
    """A linear layer holding some input columns of the full matrix: each rank's partial product is summed over ranks."""

    def __init__(self, in_features: int, out_features: int, partition: Partition) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.is_sharded = partition.world_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # [num_tokens, out_features], this rank's share of the sum
        if self.is_sharded:
            dist.all_reduce(out)
        return out
