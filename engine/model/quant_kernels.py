"""CPU kernels for quantized weights (csrc/quant_matmul.c): the kernel-ready weight form, build, load, call.

The C kernel reads weights in blocks of 32 along K with fp16 scales (quant_matmul.c says the layouts); `pack_for_cpu`
builds that form once from quant.py's canonical formats (a group of g > 32 becomes g / 32 blocks sharing one scale).
Every batch size runs the kernel: float32 activations against the weights unpacked to float, one FMA chain per output
in ascending k, so a row's result is the same bit for bit whatever batch it comes in (quant_matmul.c). Few rows
(decode) unpack in registers; from PANEL_MIN_ROWS rows on (prefill, batched decode) the kernel unpacks a panel of
weights once and sweeps every row over it with a register tile, which beats dequantizing the whole weight for torch's
float GEMM at every batch size we measured (bench/quant_kernels.py).
Built like the decode-attention kernel (cpu_attention.load_c_library); where it cannot be built, or the CPU lacks
AVX2/FMA/F16C, load_quant_kernel returns None and quantized layers run the PyTorch dequantize-then-matmul path.
"""

from __future__ import annotations

import ctypes
import logging
import pathlib
from dataclasses import dataclass

import torch

from engine.model.cpu_attention import c_function, load_c_library
from engine.model.quant import Int4Weight, QuantizedWeight, unpack_int4, weight_shape

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("csrc") / "quant_matmul.c"
BLOCK = 32  # weights per block along K in the kernel-ready form
# From this many rows on the kernel unpacks weights into a panel shared by all rows rather than in registers per call
# (the same floats either way). bench/quant_kernels.py, int4 g32 gate_up, 2 threads, ms direct vs panel: 1 row 0.11 vs
# 0.17, 8 rows 0.33 vs 0.26 (bench/results/quant-kernels-cpu.jsonl); at 3 rows the shapes split, panel ahead on two of three.
PANEL_MIN_ROWS = 3


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A quantized weight in the C kernel's layout: w = q * d (+ z for int4), per block of 32 along K."""

    kind: str  # "int4" | "int8"
    qs: (
        torch.Tensor
    )  # 8 rows interleaved (quant_matmul.c): int4 uint8 [N // 8, K // 32, 4, 8, 4]; int8 [N // 8, K // 32, 8, 8, 4]
    d: torch.Tensor  # float16 [N // 8, K // 32, 8]
    z: torch.Tensor | None  # float16 [N // 8, K // 32, 8] for int4, None for int8
    shape: tuple[int, int]  # (N, K)


def can_pack(w: QuantizedWeight) -> bool:
    """Whether the kernel can take w: K and the group size whole numbers of blocks, N whole groups of 8 rows."""
    n, k = weight_shape(w)
    return k % BLOCK == 0 and w.group_size % BLOCK == 0 and n % 8 == 0


def pack_for_cpu(w: QuantizedWeight) -> PackedWeight:
    """The canonical format -> the kernel's (scales rounded to fp16, as GGUF stores them)."""
    n, k = weight_shape(w)
    nb, repeat = k // BLOCK, w.group_size // BLOCK
    d = w.scales.float().repeat_interleave(repeat, dim=1).half()  # [N, nb]
    if isinstance(w, Int4Weight):
        q = unpack_int4(w.packed.cpu()).view(n // 8, 8, nb, 2, 4, 4)  # [groups, row i, block, half, step t, j]
        q = q.permute(0, 2, 3, 4, 1, 5)  # [groups, block, half, t, i, j]: k = 32 block + 16 half + 4 t + j
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).contiguous()  # [N // 8, nb, 4, 8, 4]
        z = _interleave_scales(w.zeros.float().repeat_interleave(repeat, dim=1).half())  # [N // 8, nb, 8]
        return PackedWeight("int4", qs, _interleave_scales(d).cpu(), z.cpu(), (n, k))
    q8 = w.qweight.cpu().view(n // 8, 8, nb, 8, 4).permute(0, 2, 3, 1, 4)  # [groups, block, step s, row i, j]
    return PackedWeight("int8", q8.contiguous(), _interleave_scales(d).cpu(), None, (n, k))


def _interleave_scales(scales: torch.Tensor) -> torch.Tensor:
    """[N, nb] -> [N // 8, nb, 8]: a group's 8 rows' scales of one block side by side."""
    n, nb = scales.shape
    return scales.view(n // 8, 8, nb).transpose(1, 2).contiguous()


class QuantKernel:
    """The loaded C functions, called with tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i = ctypes.c_void_p, ctypes.c_int64
        self._q4_matmul = c_function(library, "q4_matmul", ctypes.c_int, [p, i, i, p, p, p, i, p, i])
        self._q8_matmul = c_function(library, "q8_matmul", ctypes.c_int, [p, i, i, p, p, i, p, i])
        self._q4_dequantize = c_function(library, "q4_dequantize", None, [p, p, p, i, i, p])
        self._q8_dequantize = c_function(library, "q8_dequantize", None, [p, p, i, i, p])

    def linear(self, x: torch.Tensor, w: PackedWeight, panel_min_rows: int = PANEL_MIN_ROWS) -> torch.Tensor:
        """x fp32 [M, K] -> fp32 [M, N]; panel_min_rows picks the path (tests and benchmarks force one), never the result."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"quantized linear: fp32 CPU input [M, {w.shape[1]}] expected, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        m, (n, k) = x.shape[0], w.shape
        out = torch.empty(m, n, dtype=torch.float32)  # [M, N]
        if w.kind == "int4":
            assert w.z is not None
            status = self._q4_matmul(
                x.data_ptr(), m, k, w.qs.data_ptr(), w.d.data_ptr(), w.z.data_ptr(), n, out.data_ptr(), panel_min_rows
            )
        else:
            status = self._q8_matmul(x.data_ptr(), m, k, w.qs.data_ptr(), w.d.data_ptr(), n, out.data_ptr(), panel_min_rows)
        if status != 0:
            raise MemoryError("quantized linear kernel: out of memory for a thread's weight panel")
        return out

    def dequantize(self, w: PackedWeight) -> torch.Tensor:
        """The fp32 weight [N, K] the packed form stands for."""
        n, k = w.shape
        out = torch.empty(n, k, dtype=torch.float32)  # [N, K]
        if w.kind == "int4":
            assert w.z is not None
            self._q4_dequantize(w.qs.data_ptr(), w.d.data_ptr(), w.z.data_ptr(), n, k, out.data_ptr())
        else:
            self._q8_dequantize(w.qs.data_ptr(), w.d.data_ptr(), n, k, out.data_ptr())
        return out


def load_quant_kernel(cache_dir: pathlib.Path) -> QuantKernel | None:
    """The kernel, built into cache_dir/kernels on first use; None (PyTorch path) where it cannot be had."""
    library = load_c_library(SOURCE, cache_dir, "CPU quantized matmul")
    if library is None:
        return None
    if not c_function(library, "quant_kernels_supported", ctypes.c_int, [])():
        logger.warning("CPU quantized matmul: this CPU lacks AVX2, FMA or F16C; using the slower PyTorch path")
        return None
    return QuantKernel(library)
