"""Fused Triton layer kernels (add + RMSNorm, SiLU * up, rotary + K/V write) against the PyTorch reference path, on CPU
through TRITON_INTERPRET=1, at tiny odd shapes, in fp32 and bf16.

As in test_triton_attention.py, the kernels run in one subprocess with TRITON_INTERPRET=1 set and each case is reported
as its own test. On a CUDA machine tests/engine/test_cuda.py runs the same cases compiled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch
from torch.nn import functional as F

from tests.engine.triton_helpers import interpreted_report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Largest error relative to the reference's largest magnitude. bf16 may differ by one rounding of the RMSNorm output
# (fp32 sums in another order); the rest rounds exactly where the reference does.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


@dataclass(frozen=True)
class LayerCase:
    name: str
    kernel: str  # "add_rms_norm", "silu_mul" or "rotary_write_kv"
    num_tokens: int
    width: int  # hidden (norm), intermediate (SiLU) or head_dim (rotary)
    num_heads: int = 0
    num_kv_heads: int = 0
    padded_slot: bool = False  # the last token has slot -1 and must write nothing


CASES = [
    LayerCase("norm_odd_hidden", "add_rms_norm", 5, 40),
    LayerCase("norm_hidden_100", "add_rms_norm", 3, 100),
    LayerCase("norm_one_token", "add_rms_norm", 1, 64),
    LayerCase("silu_odd", "silu_mul", 3, 50),
    LayerCase("silu_two_blocks", "silu_mul", 2, 1500),
    LayerCase("rotary_head_dim_24", "rotary_write_kv", 7, 24, num_heads=3, num_kv_heads=1),
    LayerCase("rotary_gqa", "rotary_write_kv", 5, 16, num_heads=4, num_kv_heads=2, padded_slot=True),
    LayerCase("rotary_head_dim_64", "rotary_write_kv", 4, 64, num_heads=8, num_kv_heads=2),
]


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1.0)).item()


def _norm_error(case: LayerCase, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> float:
    from engine.model import triton_layers
    from engine.model.layers import RMSNorm

    x = torch.randn(case.num_tokens, case.width, generator=gen).to(dtype)  # [num_tokens, hidden]
    residual = torch.randn(case.num_tokens, case.width, generator=gen).to(dtype) * 4
    norm = RMSNorm(case.width, 1e-5).to(dtype)
    norm.weight.data = torch.randn(case.width, generator=gen).to(dtype)
    expected_residual = x + residual
    expected = norm(expected_residual)
    got, got_residual = triton_layers.add_rms_norm(x.to(device), residual.to(device), norm.weight.data.to(device), 1e-5)
    return max(_relative(got.cpu(), expected), _relative(got_residual.cpu(), expected_residual))


def _silu_error(case: LayerCase, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> float:
    from engine.model import triton_layers

    gate_up = (torch.randn(case.num_tokens, 2 * case.width, generator=gen) * 3).to(dtype)  # [num_tokens, 2 * inter]
    expected = F.silu(gate_up[:, : case.width]) * gate_up[:, case.width :]
    return _relative(triton_layers.silu_mul(gate_up.to(device)).cpu(), expected)


def _rotary_error(case: LayerCase, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> float:
    from engine.model import attention, triton_layers
    from engine.model.config import ModelConfig
    from engine.model.layers import RotaryEmbedding

    config = ModelConfig(
        model_type="mistral", vocab_size=32, hidden_size=case.num_heads * case.width, intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=case.num_heads, num_key_value_heads=case.num_kv_heads,
        head_dim=case.width, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
    )  # fmt: skip
    rotary = RotaryEmbedding(config)
    rotary.build(torch.device("cpu"), dtype)
    assert rotary.cos_sin is not None
    n, q_size, kv_size = case.num_tokens, case.num_heads * case.width, case.num_kv_heads * case.width
    qkv = torch.randn(n, q_size + 2 * kv_size, generator=gen).to(dtype)  # [num_tokens, q + k + v], as qkv_proj gives
    positions = torch.randint(0, 512, (n,), generator=gen)
    block_size, num_blocks = 4, n + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    if case.padded_slot:
        slots[-1] = -1
    cache_shape = (num_blocks, block_size, case.num_kv_heads, case.width)
    k_cache, v_cache = torch.randn(cache_shape, generator=gen).to(dtype), torch.randn(cache_shape, generator=gen).to(dtype)

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = t.split([q_size, kv_size, kv_size], dim=-1)
        return [q.view(n, case.num_heads, case.width), k.view(n, -1, case.width), v.view(n, -1, case.width)]

    q, k, v = split(qkv)
    expected_q, expected_k = rotary(positions, q, k)
    written = slots >= 0
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    attention.write_kv(expected_k_cache, expected_v_cache, expected_k[written], v[written], slots[written])

    got_qkv, got_k_cache, got_v_cache = qkv.to(device), k_cache.to(device), v_cache.to(device)
    got_q, got_k, got_v = split(got_qkv)
    cos_sin = rotary.cos_sin.to(device)
    triton_layers.rotary_write_kv(positions.to(device), got_q, got_k, got_v, cos_sin, got_k_cache, got_v_cache, slots.to(device))
    errors = [
        _relative(got_q.cpu(), expected_q),
        _relative(got_k_cache.cpu(), expected_k_cache),
        _relative(got_v_cache.cpu(), expected_v_cache),
    ]
    return max(errors)


def case_error(case: LayerCase, device: torch.device, dtype: torch.dtype) -> float:
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    check = {"add_rms_norm": _norm_error, "silu_mul": _silu_error, "rotary_write_kv": _rotary_error}[case.kernel]
    return check(case, device, dtype, gen)


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, dict[str, float]]:
    return interpreted_report("tests.engine.test_triton_layers")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_interpreted_layer_kernels_match_reference(
    case: LayerCase, dtype: str, interpreted_errors: dict[str, dict[str, float]]
) -> None:
    error = interpreted_errors[dtype][case.name]
    assert error < TOLERANCE[dtype], f"{case.name} {dtype}: relative error {error}"


def test_cases_cover_the_kernels() -> None:
    """Every kernel; odd widths and a non-power-of-2 head count; GQA; a padded slot; SiLU over more than one block."""
    pytest.importorskip("triton")
    from engine.model.triton_layers import SILU_BLOCK

    assert {c.kernel for c in CASES} == {"add_rms_norm", "silu_mul", "rotary_write_kv"}
    assert any(c.width & (c.width - 1) for c in CASES if c.kernel == "add_rms_norm")
    assert any(c.num_heads & (c.num_heads - 1) and c.width & (c.width - 1) for c in CASES if c.kernel == "rotary_write_kv")
    assert any(c.num_heads > c.num_kv_heads > 1 and c.padded_slot for c in CASES)
    assert any(c.width > SILU_BLOCK for c in CASES if c.kernel == "silu_mul")


def main() -> None:
    """Subprocess entry point: every case on CPU in fp32 and bf16, relative errors as one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    cpu = torch.device("cpu")
    print(json.dumps({name: {c.name: case_error(c, cpu, dtype) for c in CASES} for name, dtype in DTYPES.items()}))


if __name__ == "__main__":
    main()
