"""One rank's share of the model, built in one place for rank 0 (LLMEngine) and for ranks 1..N-1 (distributed.py):
its slice of the weights, its slice of the paged KV cache, and the CPU kernels (decode attention; norms and rotary).
Weight formats and adapter slots plug in here (and in model/layers.py), not in LLMEngine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.embedded import cache_root
from engine.kv_cache import allocate_kv_cache
from engine.loader import Quantization, load_model, quantization_of
from engine.model.config import ModelConfig
from engine.model.cpu_attention import DecodeKernel, load_decode_kernel
from engine.model.cpu_layers import load_layer_kernel
from engine.model.lora import AdapterWeights, LoraLinear, attach_lora, load_slot, shard_adapter
from engine.model.mistral import KVCache, MistralForCausalLM
from engine.model.parallel import Partition

logger = logging.getLogger(__name__)

SizeCache = Callable[[MistralForCausalLM, int], int]  # (loaded model, KV heads of this rank) -> KV blocks


@dataclass(frozen=True, slots=True)
class RankSpec:
    """What rank `rank` of `world_size` is built from; pickled into each spawned rank."""

    rank: int
    world_size: int
    model_dir: str
    model_config: ModelConfig
    device: str
    dtype: torch.dtype
    block_size: int
    kernel_dir: Path | None  # where the C kernels are built (fp32 on CPU); None: the PyTorch reference path
    quantization: Quantization | None = None  # weight-only quantization at load (loader.quantize); None: float weights
    max_loras: int = 0  # LoRA adapter slots (besides slot 0, the base model); 0: no LoRA layers
    max_lora_rank: int = 0

    @classmethod
    def first(
        cls, config: EngineConfig, model_dir: Path, model_config: ModelConfig, device: torch.device, dtype: torch.dtype
    ) -> RankSpec:
        """Rank 0's spec, from the engine's settings; the other ranks' are derived from it (`for_rank`)."""
        has_kernel = device.type == "cpu" and dtype == torch.float32
        kernel_dir = cache_root(config.cache_dir) if has_kernel else None
        args = (str(model_dir), model_config, str(device), dtype, config.block_size, kernel_dir)
        lora = (config.max_loras, config.max_lora_rank) if config.is_lora_enabled else (0, 0)
        quantization = quantization_of(config, cache_root(config.cache_dir))
        return cls(0, config.tensor_parallel_size, *args, quantization, *lora)


@dataclass(slots=True)
class Rank:
    model: MistralForCausalLM
    kv_cache: KVCache
    num_blocks: int
    num_kv_heads: int  # this rank's share of the model's K/V heads
    kernel: DecodeKernel | None  # the C decode-attention kernel for fp32 CPU caches, or None
    lora_layers: list[dict[str, LoraLinear]] | None = None  # per layer, its LoRA-wrapped projections (model/lora.py)

    def load_lora(self, slot: int, weights: AdapterWeights) -> None:
        """Write a whole adapter ((layer, PEFT module) -> (A, B scaled)) into `slot`, cut to this rank's slices."""
        assert self.lora_layers is not None, "this rank was built without LoRA slots"
        load_slot(self.lora_layers, slot, shard_adapter(weights, self.model.partition, self.model.config))


def build_rank(spec: RankSpec, num_blocks: int | SizeCache) -> Rank:
    """Load this rank's weights, size its KV cache (`num_blocks`, or rank 0's sizing of the loaded model), allocate it."""
    device = torch.device(spec.device)
    partition = Partition(spec.rank, spec.world_size)
    partition.check(spec.model_config)
    model = load_model(Path(spec.model_dir), spec.model_config, device, spec.dtype, partition, spec.quantization)
    lora_layers = attach_lora(model, spec.max_loras, spec.max_lora_rank) if spec.max_loras else None
    num_kv_heads = partition.num_kv_heads(spec.model_config)
    if not isinstance(num_blocks, int):
        num_blocks = num_blocks(model, num_kv_heads)
    start_s = time.perf_counter()
    kv_cache = allocate_kv_cache(spec.model_config, num_blocks, spec.block_size, device, spec.dtype, num_kv_heads)
    logger.info(
        "KV cache: %d blocks of %d tokens, allocated and zeroed in %.1fs",
        num_blocks,
        spec.block_size,
        time.perf_counter() - start_s,
    )
    kernel = load_decode_kernel(spec.kernel_dir) if spec.kernel_dir is not None else None
    layer_kernel = load_layer_kernel(spec.kernel_dir) if spec.kernel_dir is not None else None
    if layer_kernel is not None:
        model.use_cpu_layer_kernel(layer_kernel)
        for modules in lora_layers or []:
            for linear in modules.values():
                linear.cpu_kernel = layer_kernel
    return Rank(model, kv_cache, num_blocks, num_kv_heads, kernel, lora_layers)
