"""LoRA on the model's projections: slot-stacked A/B matrices and one batched low-rank update per projection.

Every adapted projection (qkv_proj, o_proj, gate_up_proj, down_proj) is wrapped in a LoraLinear that keeps its base
layer as it is (float or any other weight format) and adds, for each token row, the update of the adapter in that
row's slot: out = base(x) + B_slot A_slot x. Slot 0 is the base model: it holds no matrices and its rows' mask is 0.

The update is computed for the whole batch at once, never looping over adapters: x times the A matrices of every slot
side by side ([num_tokens, num_slots * parts * max_rank], "shrink"), masked to each row's own slot by the step's
one-hot slot mask, times the B matrices of every slot stacked ("expand"). A fused projection (q|k|v, gate|up) keeps
one A per part and a block-diagonal B, so its update equals PEFT's separate updates of each part exactly. Ranks below
max_rank are padded with zeros. A base-model row's update is an exact zero, so its output is the base model's.
On CUDA two gathered Triton kernels (triton_lora.py) replace the masked products: each row reads only its own slot; on
fp32 CPU tensors the C kernel of cpu_layers.py does the same (set by the rank builder, the masked products remaining
the reference and the fallback).

Under tensor parallelism each rank's A and B are cut like the layer they adapt (shard_adapter): a column-parallel
layer (qkv_proj, gate_up_proj) keeps all of A and its slice of B's rows, part by part; a row-parallel one (o_proj,
down_proj) keeps its slice of A's input columns and all of B, and adds its partial update before the all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.model.config import ModelConfig
from engine.model.cpu_layers import LayerKernel, fits
from engine.model.parallel import Partition

# Our module -> the PEFT modules it fuses, in the order of its output rows
FUSED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


@dataclass(slots=True)
class LoraBatch:
    """One step's adapter rows, built by the model runner (input_batch.py) and passed in the attention metadata."""

    mask: torch.Tensor  # [num_tokens, max_loras] in the model's dtype: 1 at each row's slot 1..max_loras, else 0
    slots: torch.Tensor  # [num_tokens] int64, each row's slot (0: no adapter), for the CUDA kernels

    @classmethod
    def of(cls, slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> LoraBatch:
        """slots [num_tokens] -> the batch with its one-hot mask of slots 1..num_slots - 1 (slot 0, the base model, has
        no column: its rows are all zero)."""
        return cls(nn.functional.one_hot(slots, num_slots)[:, 1:].to(dtype), slots)


class LoraLinear(nn.Module):
    """A base linear layer plus adapter slots 1..max_loras (stored at index slot - 1)."""

    def __init__(self, base: nn.Module, part_sizes: list[int], max_loras: int, max_rank: int, like: torch.Tensor) -> None:
        """`like`: a tensor of the model's activation dtype and device (the embedding matrix)."""
        super().__init__()
        self.base = base  # any linear layer with in_features (float or another weight format)
        self.part_sizes = part_sizes
        self.max_rank = max_rank
        width = len(part_sizes) * max_rank  # one max_rank block of A rows per fused part
        in_features, out_features = base.in_features, sum(part_sizes)
        kwargs = {"device": like.device, "dtype": like.dtype}
        # Each slot's block is contiguous, so loading an adapter writes whole rows
        self.lora_a = torch.zeros(max_loras, width, in_features, **kwargs)  # [max_loras, parts * max_rank, in]: A
        self.lora_b = torch.zeros(max_loras, width, out_features, **kwargs)  # [max_loras, parts * max_rank, out]: B^T
        # A row-parallel base (o_proj, down_proj under tensor parallelism) would all-reduce its partial output; the
        # all-reduce moves here, after this rank's partial update (its columns of A, all of B) is added, so the sum
        # over ranks is base(x) + B (A x): B is linear, each rank's share of A x is counted once.
        self.is_sharded = bool(getattr(base, "is_sharded", False))
        if self.is_sharded:
            base.is_sharded = False
        self.cpu_kernel: LayerKernel | None = None  # fp32 CPU: each row's update in C (set by use_cpu_kernel)

    def set_slot(self, slot: int, parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Write one adapter into `slot` (1..max_loras): per fused part (A [r, in], B [out_part, r]) or None."""
        index = slot - 1
        self.lora_a[index].zero_()
        self.lora_b[index].zero_()
        row = 0
        for part_index, (part, size) in enumerate(zip(parts, self.part_sizes, strict=True)):
            if part is not None:
                a, b = part
                rank, start = a.shape[0], part_index * self.max_rank
                self.lora_a[index, start : start + rank].copy_(a)
                self.lora_b[index, start : start + rank, row : row + size].copy_(b.t())
            row += size

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        """x [num_tokens, in] -> [num_tokens, out]: the base output plus each row's adapter update (none: the base's)."""
        out = self.base(x)  # a row-parallel base: this rank's partial output, not yet summed over ranks
        if lora is not None:  # a step with adapter rows
            out = self._add_update(out, x, lora)
        if self.is_sharded:
            dist.all_reduce(out)
        return out

    def _add_update(self, out: torch.Tensor, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        if out.is_cuda:  # GPU-only: each row reads only its own slot's matrices (triton_lora.py)
            from engine.model import triton_lora  # Triton comes with CUDA builds of torch; CPU installs need not have it

            return triton_lora.add_lora(out, x, self.lora_a, self.lora_b, lora.slots)
        if self.cpu_kernel is not None and fits(out, x, self.lora_a, self.lora_b):
            self.cpu_kernel.lora_add(out, x, self.lora_a, self.lora_b, lora.slots.contiguous())  # fits: x is
            return out
        num_tokens, num_slots, width = x.shape[0], self.lora_b.shape[0], self.lora_b.shape[1]
        shrink = nn.functional.linear(x, self.lora_a.view(num_slots * width, -1))  # [num_tokens, num_slots * width]
        shrink = shrink.view(num_tokens, num_slots, width).mul_(lora.mask.unsqueeze(-1))  # other slots' columns: 0
        update = shrink.view(num_tokens, -1) @ self.lora_b.view(num_slots * width, -1)  # [num_tokens, out]
        return out.add_(update)


def project(layer: nn.Module, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
    """layer(x), plus the step's adapter updates when the step runs adapters (the layer is then a LoraLinear)."""
    return layer(x) if lora is None else layer(x, lora)


def attach_lora(model: nn.Module, max_loras: int, max_rank: int) -> list[dict[str, LoraLinear]]:
    """Wrap every decoder layer's projections in LoraLinear -> per layer, our module name -> its LoraLinear."""
    wrapped, like = [], model.model.embed_tokens.weight
    for layer in model.model.layers:
        sizes = {
            "qkv_proj": model.packed_shard_sizes("qkv_proj"),
            "gate_up_proj": model.packed_shard_sizes("gate_up_proj"),
            "o_proj": [layer.self_attn.o_proj.out_features],
            "down_proj": [layer.mlp.down_proj.out_features],
        }
        owners = {"qkv_proj": layer.self_attn, "o_proj": layer.self_attn, "gate_up_proj": layer.mlp, "down_proj": layer.mlp}
        modules = {}
        for name, owner in owners.items():
            modules[name] = LoraLinear(getattr(owner, name), sizes[name], max_loras, max_rank, like)
            setattr(owner, name, modules[name])
        wrapped.append(modules)
    return wrapped


AdapterWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, PEFT module) -> (A, B scaled)


def shard_adapter(weights: AdapterWeights, partition: Partition, config: ModelConfig) -> AdapterWeights:
    """This rank's slice of an adapter, cut like the base weights (Partition.shard): for a column-parallel module
    (q/k/v, gate/up: a slice of output rows) all of A and those rows of B; for a row-parallel one (o_proj, down_proj:
    a slice of input columns) those columns of A and all of B."""
    if partition.world_size == 1:
        return weights
    sliced = {}
    for (layer, module), (a, b) in weights.items():  # a [r, in], b [out, r]
        split = partition.shard(f"model.layers.{layer}.{module}.weight", config)
        assert split is not None, module  # every LoRA target is split under tensor parallelism
        dim, start, stop = split
        sliced[(layer, module)] = (a, b[start:stop]) if dim == 0 else (a[:, start:stop], b)
    return sliced


def load_slot(wrapped: list[dict[str, LoraLinear]], slot: int, weights: AdapterWeights) -> None:
    """Write one adapter's weights ((layer, PEFT module) -> (A, B scaled)) into `slot` of every LoRA layer."""
    for index, modules in enumerate(wrapped):
        for name, linear in modules.items():
            linear.set_slot(slot, [weights.get((index, part)) for part in FUSED_PARTS[name]])
