"""The CUDA path of LoraLinear (model/lora.py): the batched LoRA update as two gathered Triton kernels.

On the GPU the update need not pay for every slot: each token row reads only its own slot's matrices. `shrink` (one
program per token row) computes h = A_slot x over the input in BLOCK_K chunks into an fp32 buffer [num_tokens,
width]; `expand` (one program per token row and BLOCK_N output columns) adds B_slot h to the base output in place.
Rows of slot 0 (the base model) do no work and leave the output as it is. Accumulation is fp32; the result is rounded
to the output dtype once. Tests compare it with the PyTorch path under TRITON_INTERPRET=1 (tests/engine/test_triton_lora.py).
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

BLOCK_K = 64  # input columns per iteration of shrink
BLOCK_N = 64  # output columns per program of expand


@triton.jit
def _shrink(
    x_ptr, a_ptr, slots_ptr, h_ptr, in_features, width, stride_x, stride_a_slot, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if slot > 0:
        a_base = a_ptr + (slot - 1) * stride_a_slot  # A of the slot: [width, in], rows contiguous
        for k0 in range(0, in_features, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + t * stride_x + cols, mask=cols < in_features, other=0.0).to(tl.float32)
            a_mask = (rows[:, None] < width) & (cols[None, :] < in_features)
            a = tl.load(a_base + rows[:, None] * in_features + cols[None, :], mask=a_mask, other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    tl.store(h_ptr + t * width + rows, acc, mask=rows < width)


@triton.jit
def _expand(
    h_ptr, b_ptr, slots_ptr, y_ptr, out_features, width, stride_y, stride_b_slot, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot > 0:
        rows = tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        h = tl.load(h_ptr + t * width + rows, mask=rows < width, other=0.0)
        b_mask = (rows[:, None] < width) & (cols[None, :] < out_features)
        b_base = b_ptr + (slot - 1) * stride_b_slot  # B^T of the slot: [width, out], rows contiguous
        b = tl.load(b_base + rows[:, None] * out_features + cols[None, :], mask=b_mask, other=0.0).to(tl.float32)
        update = tl.sum(b * h[:, None], axis=0)  # [BLOCK_N]
        y_ptrs = y_ptr + t * stride_y + cols
        y = tl.load(y_ptrs, mask=cols < out_features, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + update).to(y_ptr.dtype.element_ty), mask=cols < out_features)


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """out [num_tokens, out] += B_slot A_slot x per token row, in place. lora_a [max_loras, width, in], lora_b
    [max_loras, width, out] (B^T), slots [num_tokens] int64 (0: no adapter) -> out."""
    num_tokens, in_features = x.shape
    _, width, out_features = lora_b.shape
    assert x.stride(1) == 1 and out.stride(1) == 1 and lora_a.is_contiguous() and lora_b.is_contiguous()
    block_r = triton.next_power_of_2(width)
    h = torch.empty(num_tokens, width, dtype=torch.float32, device=x.device)  # [num_tokens, width]
    _shrink[(num_tokens,)](x, lora_a, slots, h, in_features, width, x.stride(0), lora_a.stride(0), block_r, BLOCK_K)
    grid = (num_tokens, triton.cdiv(out_features, BLOCK_N))
    _expand[grid](h, lora_b, slots, out, out_features, width, out.stride(0), lora_b.stride(0), block_r, BLOCK_N)
    return out
