"""RMSNorm (with its residual add) and rotary embedding (with the K/V cache write) for fp32 CPU tensors in C
(csrc/cpu_layers.c): build, load, call.

Why C: at decode a step's norms and rotary work on a few rows of 576 floats, and their time went to the overhead of
the many small torch ops they were made of (add_, pow, mean, add_, rsqrt_, mul, mul_ per norm; an index, mul, roll,
mul_, add_ per rotated tensor, two index_copy_ for the cache), 61 norms and 30 rotaries a step. One ctypes call each
instead. Built and loaded like the decode-attention kernel (cpu_attention.load_c_library); without it, or for tensors
it does not take (not fp32, not contiguous), layers.py and mistral.py run their PyTorch code, which stays the reference.

Rotary and the cache write give the PyTorch path's results bit for bit; RMSNorm sums its squares in double (in a fixed
order), so its inverse RMS can differ from torch's float32 one by an ulp (tests/engine/test_cpu_layers.py).

The same library holds LoRA's per-row update (`lora_add`, used by model/lora.py's LoraLinear): each row reads only its
own adapter slot's matrices instead of every slot's masked.
"""

from __future__ import annotations

import ctypes
import pathlib

import torch

from engine.model.cpu_attention import c_function, load_c_library

SOURCE = pathlib.Path(__file__).with_name("csrc") / "cpu_layers.c"


def fits(*tensors: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors as they are: fp32, on the CPU, contiguous."""
    return all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


class LayerKernel:
    """The loaded C functions, called with tensors the caller has checked with `fits`; see the C source for layouts."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._rms_norm = c_function(library, "rms_norm", None, [p, p, i, i, f, p])
        self._add_rms_norm = c_function(library, "add_rms_norm", None, [p, p, p, i, i, f, p])
        self._rotary_write_kv = c_function(library, "rotary_write_kv", ctypes.c_int, [p, p, p, p, *[i] * 6, p, p, p])
        self._lora_add = c_function(library, "lora_add", None, [p, p, p, p, p, i, i, i, i])

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., hidden] -> norm(x) * weight, a new tensor."""
        out = torch.empty_like(x)
        hidden = x.shape[-1]
        self._rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // hidden, hidden, eps, out.data_ptr())
        return out

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [..., hidden] -> (norm(x + residual) * weight, x + residual), written in place of x and
        residual (as the CUDA kernel does: x is a layer's output, read by nothing else)."""
        if x.shape != residual.shape:
            raise ValueError("add + RMSNorm kernel: x and residual of one shape")
        ptr, hidden = x.data_ptr(), x.shape[-1]
        self._add_rms_norm(ptr, residual.data_ptr(), weight.data_ptr(), x.numel() // hidden, hidden, eps, ptr)
        return x, residual

    def rotary_write_kv(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], as qkv_proj gives it
        num_heads: int,
        cos_signed_sin: torch.Tensor,  # [2, max_positions, head_dim] (RotaryEmbedding.build)
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64
    ) -> torch.Tensor:
        """Rotate q and k, store k and v at their slots -> q rotated [num_tokens, num_heads, head_dim], a new tensor."""
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        num_tokens, max_positions = qkv.shape[0], cos_signed_sin.shape[1]
        if positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64 or positions.shape[0] != num_tokens:
            raise ValueError("rotary kernel: int64 positions and slots, one per token")
        if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or cos_signed_sin.shape[2] != head_dim:
            raise ValueError("rotary kernel: qkv, cache and cos/sin table disagree on heads or head_dim")
        q = torch.empty(num_tokens, num_heads, head_dim)  # [num_tokens, num_heads, head_dim]
        status = self._rotary_write_kv(
            qkv.data_ptr(), positions.data_ptr(), slot_mapping.data_ptr(), cos_signed_sin.data_ptr(), num_tokens,
            num_heads, num_kv_heads, head_dim, max_positions, k_cache.shape[0] * k_cache.shape[1], q.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError("rotary kernel: a position or cache slot out of range")
        return q

    def lora_add(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> None:
        """out [num_tokens, n_out] += each row's B_s A_s x (model/lora.py's layout: a [num_slots, width, in], b [num_slots,
        width, n_out], slots [num_tokens] int64, 0 for none), in place."""
        num_tokens, (num_slots, width, n_in), n_out = x.shape[0], a.shape, b.shape[2]
        if out.shape != (num_tokens, n_out) or x.shape[1] != n_in or b.shape[:2] != (num_slots, width):
            raise ValueError("LoRA kernel: shapes do not match")
        if slots.dtype != torch.int64 or slots.shape != (num_tokens,) or not slots.is_contiguous():
            raise ValueError("LoRA kernel: slots must be int64 [num_tokens]")
        self._lora_add(out.data_ptr(), x.data_ptr(), a.data_ptr(), b.data_ptr(), slots.data_ptr(), num_tokens, n_in, n_out, width)


def load_layer_kernel(cache_dir: pathlib.Path) -> LayerKernel | None:
    """The kernel, built into cache_dir/kernels on first use; None (PyTorch path) where it cannot be had."""
    library = load_c_library(SOURCE, cache_dir, "CPU norm, rotary and LoRA")
    return None if library is None else LayerKernel(library)
