"""Attention kernel micro-benchmark (engine/model/triton_attention.py) at Mistral-7B's heads: 32 query, 8 KV, head_dim 128.

Prefill: the GQA kernel (one program per KV head: queries x 4 heads as rows, 64 or 128 rows) against the per-head kernel
it replaced (kept, for this comparison only, in this file) and torch SDPA on the same data. Decode: batch 1/32/256 x
context 512/2048/8192 with the splits choose_num_splits picks (with the context hint, and batch-only as under CUDA
graphs) against forced splits. One JSON line per result. GPU times are medians of CUDA-event timings, L2 flushed before
each call; each call also launches the decode kernel, whose programs return at once on prefill-only batches.

    python -m bench.attention --out attention.jsonl        # GPU, bf16: well under a minute on an H200
    TRITON_INTERPRET=1 python -m bench.attention --smoke   # CPU, fp32, tiny shapes: runs every path, times nothing useful
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]
from torch.nn import functional as F

from bench.common import describe_device, emit, versions
from engine.model import triton_attention

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    prefill_cases: tuple[tuple[str, int, int, int], ...]  # (name, num_seqs, query_len, context_len)
    prefill_rows: tuple[int, ...]  # GQA kernel rows per program
    prefill_block_n: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    forced_splits: tuple[int, ...]
    decode_tile: int
    iters: int


H200 = Shapes(
    32, 8, 128, 16,
    (("prompts_4x2048", 4, 2048, 0), ("prompt_1x8192", 1, 8192, 0), ("chunk_4x512_after_3584", 4, 512, 3584),
     ("chunks_64x16_after_1008", 64, 16, 1008)),  # short chunks: a per-head 64-query tile is a quarter full
    (64, 128), 64, (1, 32, 256), (512, 2048, 8192), (1, 2, 4, 8, 16), 64, 20,
)  # fmt: skip
SMOKE = Shapes(
    8, 2, 16, 16, (("prompt_1x24", 1, 24, 0), ("chunk_1x20_after_20", 1, 20, 20)), (16, 32), 16, (1,), (40,), (1, 2), 16, 1,
)  # fmt: skip
SMOKE_NUM_SMS = 4  # so that the smoke's two decode programs split (4 ways) by the batch rule alone


# The per-head prefill kernel the GQA kernel replaced (grid: sequence, query block, query head), for the comparison only.
@triton.jit
def _per_head_prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, window,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_tok, stride_c_head, stride_bt_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one prefill chunk, one query head (its KV head loaded once per query head)."""
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # keys cached before this chunk
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    has_rows = (query_len > 1) & (m_block * BLOCK_M < query_len)  # decode rows belong to the decode kernel
    m_mask = offs_m < tl.where(query_len > 1, query_len, 0)
    q_pos = context_len + offs_m  # [BLOCK_M]
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )  # [BLOCK_M, HEAD_DIM_PAD]  # fmt: skip
    hi = tl.where(has_rows, tl.minimum(seq_len, context_len + (m_block + 1) * BLOCK_M), 0)  # past the tile's last query
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(context_len + m_block * BLOCK_M - window + 1, 0)  # the tile's first query's first key
        lo = (lo // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n  # [BLOCK_N]
        in_seq = k_pos < seq_len
        block_id = tl.load(block_tables_ptr + seq * stride_bt_seq + k_pos // BLOCK_SIZE, mask=in_seq, other=0)
        offs = (
            block_id.to(tl.int64)[:, None] * stride_c_block
            + (k_pos % BLOCK_SIZE)[:, None] * stride_c_tok
            + kv_head * stride_c_head
            + offs_d[None, :]
        )  # [BLOCK_N, HEAD_DIM_PAD]
        kv_mask = in_seq[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        visible = (k_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        if USE_WINDOW:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero weight
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_offs = (q_start + offs_m)[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def per_head_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, max_query_len: int, scale: float, block_m: int, block_n: int,
) -> torch.Tensor:  # fmt: skip
    """The old launch: one program per (sequence, BLOCK_M queries, query head); no window, prefill rows only."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
    grid = (seq_lens.shape[0], triton.cdiv(max_query_len, block_m), num_heads)
    _per_head_prefill_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale * _LOG2E, 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, USE_WINDOW=False,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, blocks_per_seq] int32
    max_query_len: int


def make_batch(
    shapes: Shapes, num_seqs: int, query_len: int, context_len: int, device: torch.device, dtype: torch.dtype
) -> Batch:
    """num_seqs equal sequences of context_len cached keys + query_len new ones, in randomly placed blocks (K/V written)."""
    seq_len = context_len + query_len
    blocks_per_seq = triton.cdiv(seq_len, shapes.block_size)
    num_blocks = num_seqs * blocks_per_seq
    cache_shape = (num_blocks, shapes.block_size, shapes.num_kv_heads, shapes.head_dim)
    tables = torch.randperm(num_blocks, device=device).view(num_seqs, blocks_per_seq).int()  # [num_seqs, blocks_per_seq]
    return Batch(
        q=torch.randn(num_seqs * query_len, shapes.num_heads, shapes.head_dim, device=device, dtype=dtype),
        k_cache=torch.randn(cache_shape, device=device, dtype=dtype),
        v_cache=torch.randn(cache_shape, device=device, dtype=dtype),
        query_start_loc=torch.arange(0, num_seqs + 1, device=device, dtype=torch.int32) * query_len,
        seq_lens=torch.full((num_seqs,), seq_len, device=device, dtype=torch.int32),
        block_tables=tables,
        max_query_len=query_len,
    )


def gathered_kv(batch: Batch, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's keys and values in order: [num_seqs, num_kv_heads, seq_len, head_dim] (for SDPA)."""
    num_seqs = batch.block_tables.shape[0]
    ids = batch.block_tables.reshape(-1).long()
    k = batch.k_cache[ids].reshape(num_seqs, -1, *batch.k_cache.shape[2:])[:, :seq_len]
    v = batch.v_cache[ids].reshape(num_seqs, -1, *batch.v_cache.shape[2:])[:, :seq_len]
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def time_call(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median seconds of fn after a warm-up call (Triton compiles there); on CUDA by events, with L2 flushed before each.
    Off CUDA (the interpreter) one call, no warm-up: a smoke run, not a measurement."""
    if device.type != "cuda":
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s
    fn()
    flush = torch.empty(2**30, dtype=torch.int8, device=device)  # zeroing it takes ~0.25 ms, longer than a launch
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        flush.zero_()  # keeps the GPU busy while the call is launched, so the events time the kernels, not the launch
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def prefill_runs(shapes: Shapes, b: Batch, context_len: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The per-head kernel first (the baseline), the GQA kernel at each row count, and SDPA where its mask fits."""
    scale = shapes.head_dim**-0.5
    args = (b.q, b.k_cache, b.v_cache, b.query_start_loc, b.seq_lens, b.block_tables, b.max_query_len, scale)
    block_m, block_n = min(64, shapes.prefill_rows[0]), shapes.prefill_block_n
    runs = {f"per_head_m{block_m}": lambda: per_head_prefill(*args, block_m=block_m, block_n=block_n)}
    for rows in shapes.prefill_rows:
        runs[f"gqa_rows{rows}"] = lambda rows=rows: triton_attention.paged_attention(
            *args, None, num_splits=1, prefill_block_rows=rows, prefill_block_n=block_n
        )
    if context_len == 0:  # SDPA's causal mask is the chunk's own only without a cached prefix
        num_seqs, query_len = b.block_tables.shape[0], b.max_query_len
        group = shapes.num_heads // shapes.num_kv_heads
        k, v = (t.repeat_interleave(group, dim=1) for t in gathered_kv(b, query_len))  # [num_seqs, num_heads, len, dim]
        q = b.q.view(num_seqs, query_len, shapes.num_heads, shapes.head_dim).transpose(1, 2)  # [num_seqs, heads, len, dim]
        sdpa = F.scaled_dot_product_attention
        # K/V repeated per query head: enable_gqa=True can leave the flash backend for the math one on some builds.
        runs["sdpa"] = lambda: sdpa(q, k, v, is_causal=True, scale=scale).transpose(1, 2).flatten(0, 1)
    return runs


def bench_prefill(shapes: Shapes, device: torch.device, dtype: torch.dtype, report: Callable[..., None]) -> None:
    for name, num_seqs, query_len, context_len in shapes.prefill_cases:
        b = make_batch(shapes, num_seqs, query_len, context_len, device, dtype)
        pairs = num_seqs * (query_len * context_len + query_len * (query_len + 1) // 2)  # causal (query, key) pairs
        flop = 4 * shapes.num_heads * shapes.head_dim * pairs
        baseline: tuple[torch.Tensor, float] | None = None
        for kernel, fn in prefill_runs(shapes, b, context_len).items():
            out = fn()  # [num_tokens, num_heads, head_dim]
            seconds = time_call(fn, device, shapes.iters)
            baseline = baseline or (out, seconds)
            report(
                bench="attention_prefill", case=name, kernel=kernel, ms=round(seconds * 1e3, 4),
                tflop_per_s=round(flop / seconds / 1e12, 2), speedup_vs_per_head=round(baseline[1] / seconds, 3),
                max_abs_diff_vs_per_head=(out.float() - baseline[0].float()).abs().max().item(),
            )  # fmt: skip
        del b


def decode_run(shapes: Shapes, b: Batch, splits: int) -> Callable[[], torch.Tensor]:
    scale = shapes.head_dim**-0.5
    return lambda: triton_attention.paged_attention(
        b.q, b.k_cache, b.v_cache, b.query_start_loc, b.seq_lens, b.block_tables, 1, scale, None,
        num_splits=splits, decode_tile=shapes.decode_tile,
    )  # fmt: skip


def bench_decode(shapes: Shapes, device: torch.device, dtype: torch.dtype, num_sms: int, report: Callable[..., None]) -> None:
    bytes_per_token = 2 * shapes.num_kv_heads * shapes.head_dim * torch.finfo(dtype).bits // 8  # K and V
    for batch_size in shapes.decode_batches:
        for context in shapes.decode_contexts:
            b = make_batch(shapes, batch_size, 1, context - 1, device, dtype)
            num_programs = batch_size * shapes.num_kv_heads
            chosen = triton_attention.choose_num_splits(num_programs, num_sms, triton.cdiv(context, shapes.decode_tile))
            batch_only = triton_attention.choose_num_splits(num_programs, num_sms)
            times: dict[int, float] = {}
            reference = None
            for splits in sorted({*shapes.forced_splits, chosen, batch_only}):
                fn = decode_run(shapes, b, splits)
                out = fn().float()  # [batch_size, num_heads, head_dim]
                reference = out if reference is None else reference
                times[splits] = time_call(fn, device, shapes.iters)
                report(
                    bench="attention_decode", batch=batch_size, context=context, splits=splits,
                    us=round(times[splits] * 1e6, 2),
                    kv_gb_per_s=round(batch_size * context * bytes_per_token / times[splits] / 1e9, 1),
                    max_abs_diff_vs_one_split=(out - reference).abs().max().item(),
                )  # fmt: skip
            best = min(times, key=times.__getitem__)
            report(
                bench="attention_decode_choice", batch=batch_size, context=context, num_sms=num_sms, chosen_splits=chosen,
                batch_only_splits=batch_only, best_forced_splits=best, chosen_over_best=round(times[chosen] / times[best], 3),
                batch_only_over_best=round(times[batch_only] / times[best], 3),
            )  # fmt: skip
            del b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--only", choices=("prefill", "decode"), default=None)
    parser.add_argument("--num-sms", type=int, default=None, help="SM count for the split rule (default: the GPU's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and (os.environ.get("TRITON_INTERPRET") != "1" or not args.smoke):
        raise SystemExit("without a GPU, run the smoke shapes under the interpreter: TRITON_INTERPRET=1 ... --smoke")
    shapes = SMOKE if args.smoke else H200
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    num_sms = args.num_sms or (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0)
    num_sms = num_sms or SMOKE_NUM_SMS
    torch.manual_seed(0)
    start_s = time.perf_counter()
    context = {"device": describe_device(device), "dtype": str(dtype).removeprefix("torch."), "triton": triton.__version__}
    context |= versions()

    def report(**fields: Any) -> None:
        emit({**fields, **context}, args.out)

    with torch.inference_mode():
        if args.only in (None, "prefill"):
            bench_prefill(shapes, device, dtype, report)
        if args.only in (None, "decode"):
            bench_decode(shapes, device, dtype, num_sms, report)
    report(bench="attention_done", seconds=round(time.perf_counter() - start_s, 1), smoke=args.smoke)


if __name__ == "__main__":
    main()
