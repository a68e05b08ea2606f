"""CPU decode attention from DRAM: the C kernel (engine/model/cpu_attention.py) against the reference gather + SDPA.

30 layers of caches (about 1.5 GB, so nothing stays in the last-level cache), 32 sequences with 192..256 cached tokens
in scattered blocks, SmolLM2's heads (9 query, 3 KV, head_dim 64); each timed pass runs every layer once. Prints one
JSON line per repeat with both times and the bytes of K/V each pass reads.

    python -m bench.cpu_attention
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch

from bench.common import emit, set_threads, versions
from engine.model import attention
from engine.model.cpu_attention import load_decode_kernel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    threads = set_threads()
    kernel = load_decode_kernel(pathlib.Path(tempfile.mkdtemp()))
    if kernel is None:
        raise SystemExit("the C kernel is not available here (no gcc?)")
    gen = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size = 9, 3, 64, 16
    num_blocks = 2048
    blocks_per_seq = args.max_len // block_size
    caches = [
        (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen),
         torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen))
        for _ in range(args.layers)
    ]  # fmt: skip
    tables = torch.randperm(num_blocks, generator=gen)[: args.seqs * blocks_per_seq].view(args.seqs, -1).int()
    seq_lens = torch.randint(args.max_len * 3 // 4, args.max_len + 1, (args.seqs,), generator=gen).int()
    q = torch.randn(args.seqs, num_heads, head_dim, generator=gen)
    meta = attention.AttentionMetadata(
        query_start_loc=torch.arange(args.seqs + 1, dtype=torch.int32), seq_lens=seq_lens, block_tables=tables,
        slot_mapping=torch.zeros(args.seqs, dtype=torch.long), query_lens_cpu=[1] * args.seqs,
        seq_lens_cpu=seq_lens.tolist(), max_seq_len=int(seq_lens.max()), is_decode_only=True,
    )  # fmt: skip

    def one_pass(use_kernel: bool) -> float:
        meta.cpu_decode_kernel = kernel if use_kernel else None
        start_s = time.perf_counter()
        for k_cache, v_cache in caches:
            attention.paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, None)
        return time.perf_counter() - start_s

    one_pass(True), one_pass(False)  # warm-up
    read_bytes = 2 * int(seq_lens.sum()) * num_kv_heads * head_dim * 4 * args.layers
    for _ in range(args.repeats):
        reference_s, kernel_s = one_pass(False), one_pass(True)
        emit(
            {"bench": "cpu_attention", "seqs": args.seqs, "layers": args.layers, "kv_bytes_read": read_bytes,
             "reference_ms": round(reference_s * 1e3, 1), "kernel_ms": round(kernel_s * 1e3, 1),
             "speedup": round(reference_s / kernel_s, 2), "kernel_gb_per_s": round(read_bytes / kernel_s / 1e9, 1),
             "torch_threads": threads, **versions()},
            args.out,
        )  # fmt: skip


if __name__ == "__main__":
    main()
