"""QuantLinear, a linear layer holding a quantized weight (quant.py's formats), and quantize_model, which swaps a loaded
float model's projections for them.

On CPU with the C kernel (quant_kernels.py) a layer keeps only the kernel's layout; elsewhere (CUDA, no gcc, no AVX2, a
group size the kernel cannot take) it keeps the canonical format and dequantizes it before a float matmul each call:
correct everywhere, fast only where the kernel runs. The embedding stays float: a lookup reads a few rows, so
quantizing it saves memory but no time; a tied lm_head gets its own quantized copy of the embedding matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.model.mistral import MistralForCausalLM
from engine.model.quant import Int4Weight, QuantizedWeight, dequantize, quantize_int4, quantize_int8, weight_shape
from engine.model.quant_kernels import PackedWeight, QuantKernel, can_pack, pack_for_cpu

QUANTIZATION_METHODS = ("int8", "int4")
_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class QuantLinear(nn.Module):
    """y = x @ w.T (+ bias) with w quantized; forward(x [num_tokens, K]) -> [num_tokens, N] in x's dtype."""

    def __init__(
        self, weight: QuantizedWeight, bias: torch.Tensor | None, kernel: QuantKernel | None, is_sharded: bool = False
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_shape(weight)
        self.group_size = weight.group_size
        self.kind = "int4" if isinstance(weight, Int4Weight) else "int8"
        use_kernel = kernel is not None and weight.scales.device.type == "cpu" and can_pack(weight)
        self.kernel = kernel if use_kernel else None
        self.packed: PackedWeight | None = pack_for_cpu(weight) if use_kernel else None
        self.weight: QuantizedWeight | None = None if use_kernel else weight  # the canonical form, for the torch path
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.is_sharded = is_sharded  # a row-parallel slice: partial outputs are summed over ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.kernel is not None and x.dtype == torch.float32:
            out = self.kernel.linear(x, self.packed)  # [num_tokens, N]
            if self.bias is not None:
                out += self.bias
        else:
            assert self.weight is not None, "a kernel-only QuantLinear needs fp32 input"
            out = F.linear(x, dequantize(self.weight).to(x.dtype), self.bias)  # [num_tokens, N]
        if self.is_sharded:
            dist.all_reduce(out)
        return out

    def extra_repr(self) -> str:
        path = "C kernel" if self.packed is not None else "dequantize + matmul"
        return f"{self.in_features} -> {self.out_features}, {self.kind}, group {self.group_size}, {path}"


def quantize_weight(weight: torch.Tensor, method: str, group_size: int) -> QuantizedWeight:
    """A float [N, K] weight -> method's format, on the weight's device."""
    if method == "int8":
        return quantize_int8(weight, group_size)
    if method == "int4":
        return quantize_int4(weight, group_size)
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (got {method!r})")


def quantize_model(model: MistralForCausalLM, method: str, group_size: int, kernel: QuantKernel | None) -> None:
    """Replace every decoder layer's projections, and the lm_head, by QuantLinear (in place, after the float load)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in _PROJECTIONS:
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    weight = quantize_weight(linear.weight.data, method, group_size)
                    bias = None if linear.bias is None else linear.bias.data
                    is_sharded = bool(getattr(linear, "is_sharded", False))
                    setattr(parent, name, QuantLinear(weight, bias, kernel, is_sharded))
    if model.partition.rank == 0:  # only rank 0 computes logits
        logits = quantize_weight(model.logits_weight.data, method, group_size)
        model.quant_lm_head = QuantLinear(logits, None, kernel)
        model.lm_head = None  # untied: the float matrix is no longer used (tied: it is the embedding, which stays)
