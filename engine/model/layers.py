"""RMSNorm, rotary embedding (rotate-half, as Hugging Face's Llama/Mistral), gated MLP.

On CUDA tensors the residual add + RMSNorm and SiLU * up run as fused Triton kernels (triton_layers.py), which tests
check against the PyTorch code here; CPU tensors never reach them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.model.config import ModelConfig
from engine.model.parallel import Partition, RowParallelLinear


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as Hugging Face does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [num_tokens, hidden] -> (norm(x + residual), x + residual)."""
        if x.is_cuda:  # GPU-only speedup: one kernel, both results written in place of x and residual
            from engine.model import triton_layers  # Triton comes with CUDA builds of torch; CPU installs need not have it

            return triton_layers.add_rms_norm(x, residual, self.weight, self.eps)
        residual = x + residual
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
        self.cos_sin: torch.Tensor | None = None  # [max_positions, head_dim] x2, built by build()

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        positions = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(self.config))  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos_sin = torch.stack((emb.cos(), emb.sin())).to(device=device, dtype=dtype)  # [2, max_positions, head_dim]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cos_sin is not None, "RotaryEmbedding.build() was not called"
        cos = self.cos_sin[0, positions].unsqueeze(1)  # [num_tokens, 1, head_dim]
        sin = self.cos_sin[1, positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused matrix [2 * intermediate, hidden]."""

    def __init__(self, config: ModelConfig, partition: Partition) -> None:
        super().__init__()
        self.intermediate_size = partition.intermediate_size(config)  # this rank's columns
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = RowParallelLinear(self.intermediate_size, config.hidden_size, partition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate]
        if gate_up.is_cuda:  # GPU-only speedup: one kernel instead of silu and mul
            from engine.model import triton_layers

            return self.down_proj(triton_layers.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [num_tokens, intermediate] x2
        return self.down_proj(nn.functional.silu(gate) * up)
