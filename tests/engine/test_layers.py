"""The CPU forms of RMSNorm, rotary embedding and the gated MLP (in-place ops, rotate-half as a roll by a signed sine)
give exactly, bit for bit, what Hugging Face's formulas give."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from engine.model.config import ModelConfig
from engine.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from engine.model.parallel import WHOLE

CONFIG = ModelConfig(
    model_type="llama", vocab_size=32, hidden_size=96, intermediate_size=160, num_hidden_layers=1,
    num_attention_heads=3, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_theta=10000.0,
)  # fmt: skip


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_rotary_is_hugging_face_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    rotary = RotaryEmbedding(CONFIG)
    rotary.build(torch.device("cpu"), torch.float32)
    assert rotary.cos_sin is not None
    for num_tokens in (1, 7, 300):
        qkv = torch.randn(num_tokens, 5 * 32, generator=gen)  # q (3 heads), k, v (1 head each), as qkv_proj gives them
        q, k, _ = qkv.split([96, 32, 32], dim=-1)
        q, k = q.view(num_tokens, 3, 32), k.view(num_tokens, 1, 32)
        positions = torch.randint(0, 4096, (num_tokens,), generator=gen)
        cos, sin = rotary.cos_sin[0, positions].unsqueeze(1), rotary.cos_sin[1, positions].unsqueeze(1)
        got_q, got_k = rotary(positions, q, k)
        assert torch.equal(got_q, q * cos + _rotate_half(q) * sin)
        assert torch.equal(got_k, k * cos + _rotate_half(k) * sin)
        assert got_q.is_contiguous()  # the C decode kernel reads q as it is


def test_rms_norm_and_its_in_place_residual_add_are_hugging_face_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=gen)
    for num_tokens in (1, 33):
        x, residual = torch.randn(num_tokens, 96, generator=gen), torch.randn(num_tokens, 96, generator=gen)
        total = x + residual
        expected = norm.weight * (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5))
        got, got_residual = norm.add_and_norm(x, residual.clone())
        assert torch.equal(got_residual, total) and torch.equal(got, expected)


def test_gated_mlp_is_silu_times_up_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(2)
    mlp = GatedMLP(CONFIG, WHOLE)
    mlp.gate_up_proj.weight.data = torch.randn(320, 96, generator=gen)
    mlp.down_proj.weight.data = torch.randn(96, 160, generator=gen)
    with torch.inference_mode():
        for num_tokens in (1, 40):
            x = torch.randn(num_tokens, 96, generator=gen)
            gate, up = F.linear(x, mlp.gate_up_proj.weight).split(160, dim=-1)
            assert torch.equal(mlp(x), F.linear(F.silu(gate) * up, mlp.down_proj.weight))
