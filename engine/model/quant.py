"""Weight-only quantized formats: the canonical int4 / int8 weights every loader (safetensors, GGUF) produces.

Owns only the formats and their arithmetic (quantize, dequantize, fuse along N); kernels and layers live elsewhere.
GGUF maps in directly: Q4_0 is Int4Weight with zeros = -8 * scale, Q4_1 is scale d and zero m, Q8_0 is Int8Weight group 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """w[n, k] = q[n, k] * scales[n, k // group_size] + zeros[n, k // group_size], q in 0..15."""

    packed: torch.Tensor  # uint8 [N, K // 2]: byte j of row n holds q[n, 2j] in its low nibble, q[n, 2j+1] in its high
    scales: torch.Tensor  # float32 [N, K // group_size]
    zeros: torch.Tensor  # float32 [N, K // group_size]
    group_size: int


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """w[n, k] = q[n, k] * scales[n, k // group_size]."""

    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N, K // group_size]; group_size == K means per-channel
    group_size: int


QuantizedWeight = Int4Weight | Int8Weight


def weight_shape(w: QuantizedWeight) -> tuple[int, int]:
    """(N, K) of the float weight this stands for."""
    if isinstance(w, Int4Weight):
        return w.packed.shape[0], w.packed.shape[1] * 2
    return w.qweight.shape[0], w.qweight.shape[1]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] of the 4-bit values, low nibble first."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)  # [N, K]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 (K even) -> uint8 [N, K // 2], q[:, 2j] in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K // 2]


def dequantize(w: QuantizedWeight) -> torch.Tensor:
    """The float32 [N, K] weight that w stands for."""
    n, k = weight_shape(w)
    if isinstance(w, Int4Weight):
        q = unpack_int4(w.packed).float().view(n, k // w.group_size, w.group_size)  # [N, groups, group_size]
        out = q * w.scales.float().unsqueeze(-1) + w.zeros.float().unsqueeze(-1)
        return out.view(n, k)  # [N, K]
    q = w.qweight.float().view(n, k // w.group_size, w.group_size)  # [N, groups, group_size]
    return (q * w.scales.float().unsqueeze(-1)).view(n, k)  # [N, K]


def concat_rows(ws: list[QuantizedWeight]) -> QuantizedWeight:
    """Fuse weights along N (q/k/v into qkv, gate/up into gate_up): all of one kind, one K and one group size."""
    first = ws[0]
    if any(type(w) is not type(first) or w.group_size != first.group_size for w in ws):
        raise ValueError("concat_rows needs weights of one kind and one group size")
    if len({weight_shape(w)[1] for w in ws}) != 1:
        raise ValueError("concat_rows needs weights with one input size K")
    if isinstance(first, Int4Weight):
        return Int4Weight(
            packed=torch.cat([w.packed for w in ws]),  # type: ignore[union-attr]
            scales=torch.cat([w.scales for w in ws]),
            zeros=torch.cat([w.zeros for w in ws]),  # type: ignore[union-attr]
            group_size=first.group_size,
        )
    return Int8Weight(
        qweight=torch.cat([w.qweight for w in ws]),  # type: ignore[union-attr]
        scales=torch.cat([w.scales for w in ws]),
        group_size=first.group_size,
    )


def _check_groups(k: int, group_size: int) -> None:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} must divide the input size {k}")


def quantize_int8(w: torch.Tensor, group_size: int | None) -> Int8Weight:
    """float [N, K] -> symmetric int8 (round to nearest, q in -127..127); group_size None means per-channel (K)."""
    n, k = w.shape
    group_size = k if group_size is None else group_size
    _check_groups(k, group_size)
    groups = w.float().reshape(n, k // group_size, group_size)  # [N, groups, group_size]
    scales = groups.abs().amax(dim=-1) / 127.0  # [N, groups]
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round(groups * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)  # [N, groups, group_size]
    return Int8Weight(qweight=q.reshape(n, k), scales=scales.contiguous(), group_size=group_size)


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Weight:
    """float [N, K] -> asymmetric 4-bit per group: min/max range mapped onto 0..15, round to nearest."""
    n, k = w.shape
    _check_groups(k, group_size)
    if group_size % 2:
        raise ValueError(f"int4 group size {group_size} must be even")
    groups = w.float().reshape(n, k // group_size, group_size)  # [N, groups, group_size]
    low = groups.amin(dim=-1)  # [N, groups]
    high = groups.amax(dim=-1)  # [N, groups]
    scales = (high - low) / 15.0  # [N, groups]
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round((groups - low.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15)  # [N, groups, group_size]
    packed = pack_int4(q.reshape(n, k))  # [N, K // 2]
    return Int4Weight(packed=packed, scales=scales.contiguous(), zeros=low.contiguous(), group_size=group_size)
