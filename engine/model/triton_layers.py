"""Fused Triton kernels for the CUDA path of layers.py and mistral.py: residual add + RMSNorm, SiLU(gate) * up, and
rotary embedding on q and k together with the K/V write into the paged cache by slot.

Each replaces several PyTorch elementwise kernels per layer and rounds where the reference path rounds (to the model
dtype after each PyTorch op, to nearest even), so bf16 results match it but for fp32 summation order; tests compare
them under TRITON_INTERPRET=1. A slot < 0 (CUDA-graph padding) is not written, as in triton_attention.write_kv.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

SILU_BLOCK = 1024  # intermediate columns per program of the SiLU kernel
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _dtype_code(dtype: torch.dtype) -> int:
    """The DTYPE constexpr of the kernels: what a value is rounded to where the reference path rounds."""
    return _DTYPE_CODES[dtype]


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to the model dtype (0 fp32, 1 bf16, 2 fp16), to nearest even, returned as fp32.

    bf16 rounds by integer ops: the interpreter's own fp32 -> bf16 cast rounds ties up, not to even.
    """
    if DTYPE == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, stride_x, stride_r, eps,
    HIDDEN: tl.constexpr, HIDDEN_PAD: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    """One program per token: residual += x (rounded to the dtype), then x = weight * rmsnorm(residual)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, HIDDEN_PAD)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    total = _round(x + r, DTYPE)
    tl.store(residual_ptr + row * stride_r + offs, total, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(total * total, axis=0) / HIDDEN + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    normed = _round(total * rstd, DTYPE) * weight  # cast back before the weight, as the reference
    tl.store(x_ptr + row * stride_x + offs, _round(normed, DTYPE), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [num_tokens, hidden] -> (normed, updated residual), both written in place (x becomes normed)."""
    num_tokens, hidden = x.shape
    assert x.stride(1) == 1 and residual.stride(1) == 1 and weight.is_contiguous()
    assert x.dtype == residual.dtype == weight.dtype, "the reference rounds weight * x to their one dtype"
    if num_tokens:
        _add_rms_norm_kernel[(num_tokens,)](
            x, residual, weight, x.stride(0), residual.stride(0), eps,
            HIDDEN=hidden, HIDDEN_PAD=triton.next_power_of_2(hidden), DTYPE=_dtype_code(x.dtype),
        )  # fmt: skip
    return x, residual


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, intermediate, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """One program per (token, BLOCK columns): out = silu(gate) * up, rounded after each op like the reference."""
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < intermediate
    gate = tl.load(gate_up_ptr + tok * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + tok * stride_in + intermediate + offs, mask=mask, other=0.0).to(tl.float32)
    silu = _round(gate / (1.0 + tl.exp(-gate)), DTYPE)
    tl.store(out_ptr + tok * stride_out + offs, _round(silu * up, DTYPE), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [num_tokens, 2 * intermediate] (gate, then up) -> silu(gate) * up [num_tokens, intermediate]."""
    num_tokens, width = gate_up.shape
    intermediate = width // 2
    assert gate_up.stride(1) == 1
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)  # [num_tokens, intermediate]
    if num_tokens:
        grid = (num_tokens, triton.cdiv(intermediate, SILU_BLOCK))
        _silu_mul_kernel[grid](
            gate_up, out, gate_up.stride(0), out.stride(0), intermediate,
            BLOCK=SILU_BLOCK, DTYPE=_dtype_code(gate_up.dtype),
        )  # fmt: skip
    return out


@triton.jit
def _rotate_half(x1, x2, cos, sin, DTYPE: tl.constexpr):
    """Rotate-half RoPE on the two halves of a head, rounding each product and the sum as the reference does."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    out1 = _round(_round(x1 * cos, DTYPE) + _round(-(x2 * sin), DTYPE), DTYPE)
    out2 = _round(_round(x2 * cos, DTYPE) + _round(x1 * sin, DTYPE), DTYPE)
    return out1, out2


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_cs_table, stride_cache_slot,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    """One program per token: q rotated in place; k rotated and v copied into the cache at the token's slot."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < HALF
    # The table holds cat(freqs, freqs): the first half of each row serves both halves of a head.
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + stride_cs_table + pos * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    heads = tl.arange(0, HEADS_PAD)
    q_mask = (heads < NUM_HEADS)[:, None] & d_mask[None, :]
    q_rows = q_ptr + tok * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :]  # [HEADS_PAD, HALF_PAD]
    q1, q2 = _rotate_half(tl.load(q_rows, mask=q_mask), tl.load(q_rows + HALF, mask=q_mask), cos, sin, DTYPE)
    tl.store(q_rows, q1, mask=q_mask)
    tl.store(q_rows + HALF, q2, mask=q_mask)

    slot = tl.load(slot_ptr + tok).to(tl.int64)
    kv_heads = tl.arange(0, KV_HEADS_PAD)
    # (scalar & vector masks trip the interpreter, so the slot check is folded into the bound)
    kv_mask = (kv_heads < tl.where(slot >= 0, NUM_KV_HEADS, 0))[:, None] & d_mask[None, :]  # [KV_HEADS_PAD, HALF_PAD]
    k_rows = k_ptr + tok * stride_k_tok + kv_heads[:, None] * stride_k_head + offs_d[None, :]
    k1, k2 = _rotate_half(tl.load(k_rows, mask=kv_mask), tl.load(k_rows + HALF, mask=kv_mask), cos, sin, DTYPE)
    cache_rows = slot * stride_cache_slot + kv_heads[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(k_cache_ptr + cache_rows, k1, mask=kv_mask)
    tl.store(k_cache_ptr + cache_rows + HALF, k2, mask=kv_mask)
    v_rows = v_ptr + tok * stride_v_tok + kv_heads[:, None] * stride_v_head + offs_d[None, :]
    tl.store(v_cache_ptr + cache_rows, tl.load(v_rows, mask=kv_mask), mask=kv_mask)
    tl.store(v_cache_ptr + cache_rows + HALF, tl.load(v_rows + HALF, mask=kv_mask), mask=kv_mask)


def rotary_write_kv(
    positions: torch.Tensor,  # [num_tokens]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], read only: its rotation goes to the cache
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin: torch.Tensor,  # [2, max_positions, head_dim], RotaryEmbedding's table
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; slot -1 (a padded token) is not written
) -> None:
    """RotaryEmbedding + write_kv in one kernel: q rotated in place, rotated k and v stored at their slots."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and head_dim % 2 == 0
    assert cos_sin.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and cos_sin.dtype == q.dtype
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0), num_kv_heads * head_dim,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, HALF=head_dim // 2,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), DTYPE=_dtype_code(q.dtype),
    )  # fmt: skip
