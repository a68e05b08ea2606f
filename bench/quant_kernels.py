"""Quantized linear kernels on CPU against float32 F.linear, at SmolLM2-135M's shapes, 1 and 2 threads, by batch size.

Each timed pass runs one call on each of `copies` distinct weights (30, as the model's layers; 3 for the lm_head), so
weights come from memory as in a decode step, not from a warm cache. Methods: f32 (F.linear), torch's weight-only ops
(torch_int8pc: _weight_int8pack_mm per-channel; torch_int4: _weight_int4pack_mm_for_cpu), and ours: the C float-activation
kernel (int8 / int4) forced onto its `direct` and its `panel` path, and dequantize + float GEMM (`gemm`, the
old large-batch path) per group size. One JSON line per (threads, shape,
batch, method): ms per call and weight GB/s (the bytes each call reads of its weight).

    python -m bench.quant_kernels --out bench/results/quant-kernels-cpu.jsonl
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import emit, versions
from engine.model.quant import quantize_int4, quantize_int8
from engine.model.quant_kernels import PackedWeight, QuantKernel, load_quant_kernel, pack_for_cpu

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}


def packed_bytes(w: PackedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (w.qs, w.d, w.z) if t is not None)


def time_pass(fns: list[Callable[[], object]], repeats: int) -> tuple[float, float]:
    """Best of `repeats` passes over every callable: (wall ms, CPU ms of the process) per call. On a shared machine the
    CPU time is the steadier figure (it leaves out time other processes held the cores)."""
    for fn in fns:
        fn()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        for fn in fns:
            fn()
        best, best_cpu = min(best, time.perf_counter() - start_s), min(best_cpu, time.process_time() - start_cpu_s)
    return best / len(fns) * 1e3, best_cpu / len(fns) * 1e3


def methods(
    kernel: QuantKernel, weights: list[torch.Tensor], x: torch.Tensor, group_sizes: list[int], with_torch_ops: bool
) -> dict[str, tuple[list[Callable[[], object]], int]]:
    """method name -> (one callable per weight copy, bytes of weight each call reads)."""
    n, k = weights[0].shape
    out: dict[str, tuple[list[Callable[[], object]], int]] = {"f32": ([lambda w=w: F.linear(x, w) for w in weights], n * k * 4)}
    if with_torch_ops:
        q8 = [quantize_int8(w, None) for w in weights]
        fns = [lambda q=q: torch.ops.aten._weight_int8pack_mm(x, q.qweight, q.scales.view(-1)) for q in q8]
        out["torch_int8pc"] = (fns, n * k + n * 4)
        int4 = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)]
        sz = torch.randn(k // 32, n, 2)
        out["torch_int4_g32"] = (
            [lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4[0], 32, sz)],
            n * k // 2 + sz.numel() * 4,
        )
    for group in group_sizes:
        if k % group:
            continue
        for name, quantize in (("int8", quantize_int8), ("int4", quantize_int4)):
            packed = [pack_for_cpu(quantize(w, group)) for w in weights]
            size = packed_bytes(packed[0])
            out[f"{name}_g{group}_direct"] = ([lambda p=p: kernel.linear(x, p, panel_min_rows=1 << 30) for p in packed], size)
            out[f"{name}_g{group}_panel"] = ([lambda p=p: kernel.linear(x, p, panel_min_rows=1) for p in packed], size)
            out[f"{name}_g{group}_gemm"] = ([lambda p=p: F.linear(x, kernel.dequantize(p)) for p in packed], size)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--torch-ops", action="store_true", help="also time torch's weight-only ops (slow here)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    kernel = load_quant_kernel(pathlib.Path(tempfile.mkdtemp()))
    if kernel is None:
        raise SystemExit("the C kernel is not available here (no gcc, or no AVX2/FMA/F16C)")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        k, n = SHAPES[shape]
        weights = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(3 if shape == "lm_head" else 30)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                x = torch.randn(batch, k, generator=gen)
                with_torch_ops = args.torch_ops and batch <= 8
                for method, (fns, num_bytes) in methods(kernel, weights, x, args.group_sizes, with_torch_ops).items():
                    ms, cpu_ms = time_pass(fns, args.repeats)
                    emit(
                        {"bench": "quant_kernels", "shape": shape, "k": k, "n": n, "batch": batch, "threads": threads,
                         "method": method, "ms": round(ms, 4), "cpu_ms": round(cpu_ms, 4),
                         "weight_gb_per_s": round(num_bytes / ms / 1e6, 2),
                         "weight_bytes": num_bytes, **versions()},
                        args.out,
                    )  # fmt: skip


if __name__ == "__main__":
    main()
