"""RMSNorm, rotary embedding (rotate-half, as Hugging Face's Llama/Mistral), gated MLP.

On CUDA tensors the residual add + RMSNorm and SiLU * up run as fused Triton kernels (triton_layers.py), which tests
check against the PyTorch code here; CPU tensors never reach them. On CPU the same arithmetic runs with fewer passes and
new tensors (in-place ops, rotate-half as a roll by a sign-folded sine table), giving Hugging Face's results bit for bit.
On fp32 CPU models the engine hands the norms and the rotary a C kernel (cpu_layers.py, set by engine/rank.py), which
tests check against the PyTorch code here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.model.config import ModelConfig
from engine.model.cpu_layers import LayerKernel, fits
from engine.model.lora import LoraBatch, project
from engine.model.parallel import Partition, RowParallelLinear


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.cpu_kernel: LayerKernel | None = None  # fp32 CPU models: the C kernel (cpu_layers.py), set by the engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel is not None and fits(x):  # CPU-only speedup: one C call instead of seven ops
            return self.cpu_kernel.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 and cast back before the weight, exactly as Hugging Face does.
        x32 = x.float()
        inv_rms = x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()  # [num_tokens, 1]
        return (x32 * inv_rms).to(x.dtype).mul_(self.weight)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [num_tokens, hidden] -> (norm(x + residual), x + residual)."""
        if x.is_cuda:  # GPU-only speedup: one kernel, both results written in place of x and residual
            from engine.model import triton_layers  # Triton comes with CUDA builds of torch; CPU installs need not have it

            return triton_layers.add_rms_norm(x, residual, self.weight, self.eps)
        if self.cpu_kernel is not None and fits(x, residual):  # CPU-only speedup: one C call, in place like the GPU's
            return self.cpu_kernel.add_rms_norm(x, residual, self.weight, self.eps)
        residual = residual.add_(x)  # the stream is the model's own tensor (embeddings, then these sums): add in place
        return self(residual), residual


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with linear or Llama 3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        old_len = config.rope_original_max_position_embeddings
        low_wavelen = old_len / config.rope_low_freq_factor
        high_wavelen = old_len / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / config.rope_factor, inv_freq)
        smooth = (old_len / wavelen - config.rope_low_freq_factor) / (config.rope_high_freq_factor - config.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, looked up by the flat `positions` of a step."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.cos_sin: torch.Tensor | None = None  # [2, max_positions, head_dim]: cos, sin; built by build() (CUDA kernels)
        self.cos_signed_sin: torch.Tensor | None = None  # [2, max_positions, head_dim]: cos, sin with its first half negated
        # fp32 CPU models: the C kernel (cpu_layers.py) that attention calls instead of forward + write_kv; set by the engine
        self.cpu_kernel: LayerKernel | None = None

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        positions = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(self.config))  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos_sin = torch.stack((emb.cos(), emb.sin())).to(device=device, dtype=dtype)  # [2, max_positions, head_dim]
        if device.type == "cpu":  # rotate_half(x) * sin == roll(x, half) * signed_sin, bit for bit: no neg, no cat
            sin, half = emb.sin(), emb.shape[-1] // 2
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # [max_positions, head_dim]
            self.cos_signed_sin = torch.stack((emb.cos(), signed_sin)).to(dtype=dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU: q [num_tokens, num_heads, head_dim], k [num_tokens, num_kv_heads, head_dim] -> both rotated (new tensors)."""
        assert self.cos_signed_sin is not None, "RotaryEmbedding.build() was not called on the CPU"
        cos, signed_sin = self.cos_signed_sin[:, positions].unsqueeze(2)  # [num_tokens, 1, head_dim] each
        return _rotate(q, cos, signed_sin), _rotate(k, cos, signed_sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) as Hugging Face's, in four ops instead of seven."""
    out = x * cos
    return out.add_(x.roll(x.shape[-1] // 2, dims=-1).mul_(signed_sin))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused matrix [2 * intermediate, hidden]."""

    def __init__(self, config: ModelConfig, partition: Partition) -> None:
        super().__init__()
        self.intermediate_size = partition.intermediate_size(config)  # this rank's columns
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = RowParallelLinear(self.intermediate_size, config.hidden_size, partition)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        gate_up = project(self.gate_up_proj, x, lora)  # [num_tokens, 2 * intermediate]
        if gate_up.is_cuda:  # GPU-only speedup: one kernel instead of silu and mul
            from engine.model import triton_layers

            return project(self.down_proj, triton_layers.silu_mul(gate_up), lora)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [num_tokens, intermediate] x2
        # silu(gate) * up in place of gate: no two new [num_tokens, intermediate] tensors, the same values
        return project(self.down_proj, nn.functional.silu(gate, inplace=True).mul_(up), lora)
