"""Triton kernels over the paged KV cache, the CUDA path of engine/model/attention.py: write K/V by slot, decode, prefill.

Same contract as the reference there (tests compare them under TRITON_INTERPRET=1): key j is visible from query i when
j <= i and, with a sliding window, i - window < j. fp32 accumulation, online softmax over tiles of keys gathered by block
table. For CUDA-graph padding: a slot < 0 is not written, and a sequence with seq_len 0 reads nothing and outputs zeros.
Both attention kernels give one program all the query heads of one KV head (GQA), so each K/V tile is read once per KV head.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

_LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k_tok, stride_v_tok, stride_cache_slot,
    ROW: tl.constexpr, ROW_PAD: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    offs = tl.arange(0, ROW_PAD)
    mask = offs < tl.where(slot >= 0, ROW, 0)  # (scalar & vector masks trip the interpreter, so fold it into the bound)
    k = tl.load(k_ptr + tok * stride_k_tok + offs, mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + offs, mask=mask)
    tl.store(k_cache_ptr + slot * stride_cache_slot + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * stride_cache_slot + offs, v, mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [num_tokens, num_kv_heads, head_dim] at their slots; slot -1 (a padded token) is skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k_rows = k.reshape(num_tokens, num_kv_heads * head_dim)  # a view when heads are packed (k and v come from qkv_proj)
    v_rows = v.reshape(num_tokens, num_kv_heads * head_dim)
    assert k_rows.stride(1) == 1 and v_rows.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    row = num_kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](
        k_rows, v_rows, k_cache, v_cache, slot_mapping,
        k_rows.stride(0), v_rows.stride(0), row,
        ROW=row, ROW_PAD=triton.next_power_of_2(row),
    )  # fmt: skip


@triton.jit
def _decode_kernel(
    out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, window,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_tok, stride_c_head, stride_bt_seq,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: the GROUP query heads sharing one KV head, of one decoding sequence, over one split of its keys."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(query_start_loc_ptr + seq)
    is_decode = tl.load(query_start_loc_ptr + seq + 1) - tok == 1  # other rows belong to the prefill kernel
    seq_len = tl.where(is_decode, tl.load(seq_lens_ptr + seq), 0)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, TILE)
    heads = kv_head * GROUP + offs_g  # [GROUP_PAD]
    g_mask = offs_g < GROUP
    out_mask = offs_g < tl.where(is_decode, GROUP, 0)  # heads this program outputs
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + tok * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=out_mask[:, None] & d_mask[None, :], other=0.0,
    )  # [GROUP_PAD, HEAD_DIM_PAD]  # fmt: skip
    first_key = 0
    if USE_WINDOW:
        first_key = tl.maximum(seq_len - window, 0)  # the query sits at seq_len - 1
    lo = (first_key // TILE) * TILE
    num_tiles = tl.cdiv(seq_len - lo, TILE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for t in range(tile_begin, tile_end):
        k_pos = lo + t * TILE + offs_n  # [TILE]
        visible = (k_pos < seq_len) & (k_pos >= first_key)
        block_id = tl.load(block_tables_ptr + seq * stride_bt_seq + k_pos // BLOCK_SIZE, mask=k_pos < seq_len, other=0)
        offs = (
            block_id.to(tl.int64)[:, None] * stride_c_block
            + (k_pos % BLOCK_SIZE)[:, None] * stride_c_tok
            + kv_head * stride_c_head
            + offs_d[None, :]
        )  # [TILE, HEAD_DIM_PAD]
        kv_mask = visible[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [GROUP_PAD, TILE], log2 units
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_offs = tok * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=out_mask[:, None] & d_mask[None, :])
    else:
        # partials [num_seqs, num_heads, NUM_SPLITS] (+ [HEAD_DIM_PAD]), combined by _reduce_splits_kernel
        part = (seq * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(m_part_ptr + part, m_i, mask=g_mask)
        tl.store(l_part_ptr + part, l_i, mask=g_mask)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _reduce_splits_kernel(
    out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, query_start_loc_ptr,
    stride_o_tok, stride_o_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """Combine the splits of one (decoding sequence, head): rescale each partial to the common max."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(query_start_loc_ptr + seq)
    is_decode = tl.load(query_start_loc_ptr + seq + 1) - tok == 1
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + offs_s  # [NUM_SPLITS]
    m = tl.load(m_part_ptr + part)
    l = tl.load(l_part_ptr + part)  # noqa: E741
    acc = tl.load(acc_part_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :])  # [NUM_SPLITS, HEAD_DIM_PAD]
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_sum == 0.0, 1.0, l_sum)  # [HEAD_DIM_PAD]
    mask = offs_d < tl.where(is_decode, HEAD_DIM, 0)
    tl.store(out_ptr + tok * stride_o_tok + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, window,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_tok, stride_c_head, stride_bt_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_Q queries of one prefill chunk x the GROUP query heads sharing one KV head, over the cached
    prefix and the chunk (causal). The pairs are flattened to BLOCK_ROWS rows, row r = (query r // GROUP, head
    kv_head * GROUP + r % GROUP), so each K/V tile is loaded once for the whole group; rows from BLOCK_Q * GROUP on
    are padding (GROUP not a power of two)."""
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # keys cached before this chunk
    first_q = m_block * BLOCK_Q  # the program's first query, within the chunk
    rows = tl.arange(0, BLOCK_ROWS)
    offs_m = first_q + rows // GROUP  # [BLOCK_ROWS] query of each row, within the chunk
    heads = kv_head * GROUP + rows % GROUP  # [BLOCK_ROWS]
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    has_rows = (query_len > 1) & (first_q < query_len)  # decode rows belong to the decode kernel
    m_mask = (rows < BLOCK_Q * GROUP) & (offs_m < tl.where(query_len > 1, query_len, 0))
    q_pos = context_len + offs_m  # [BLOCK_ROWS]
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )  # [BLOCK_ROWS, HEAD_DIM_PAD]  # fmt: skip
    hi = tl.where(has_rows, tl.minimum(seq_len, context_len + first_q + BLOCK_Q), 0)  # past the program's last query
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(context_len + first_q - window + 1, 0)  # the program's first query's first key
        lo = (lo // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_ROWS], tl.float32)
    acc = tl.zeros([BLOCK_ROWS, HEAD_DIM_PAD], tl.float32)
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_ROWS, BLOCK_N], log2 units
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
    o_offs = (q_start + offs_m)[:, None] * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    decode_tile: int = 64,
    prefill_block_rows: int = 64,
    prefill_block_n: int = 64,
) -> torch.Tensor:
    """Attention of a mixed step (this step's K/V already written) -> [num_tokens, num_heads, head_dim].

    Sequences with one query run in the decode kernel, the others in the prefill kernel. Launch shapes depend only on
    tensor shapes, max_query_len and the optional max_seq_len hint (the longest seq_len, known on the eager path; None
    or 0, the placeholder of CUDA-graph capture, leaves the decode split to the batch size alone), so a pure-decode call
    (max_query_len 1) can be captured in a CUDA graph. num_splits forces the decode split (tests, benchmarks).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))  # tl.dot wants every dimension >= 16
    common = dict(
        qk_scale=scale * _LOG2E,
        window=sliding_window or 0,
        stride_q_tok=q.stride(0), stride_q_head=q.stride(1), stride_o_tok=out.stride(0), stride_o_head=out.stride(1),
        stride_c_block=k_cache.stride(0), stride_c_tok=k_cache.stride(1), stride_c_head=k_cache.stride(2),
        stride_bt_seq=block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        USE_WINDOW=sliding_window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    splits = num_splits or _num_splits(
        q.device, num_seqs * num_kv_heads, _num_key_tiles(max_seq_len, sliding_window, decode_tile)
    )
    if splits > 1:
        m_part = torch.empty(num_seqs, num_heads, splits, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(num_seqs, num_heads, splits, head_dim_pad, device=q.device, dtype=torch.float32)
    else:
        m_part = l_part = acc_part = out  # unused
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        out, m_part, l_part, acc_part, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), TILE=decode_tile, NUM_SPLITS=splits, **common,
    )  # fmt: skip
    if splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            out, m_part, l_part, acc_part, query_start_loc, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=splits,
        )  # fmt: skip
    if max_query_len > 1:
        block_rows, block_q = prefill_rows(group, prefill_block_rows)
        grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
        _prefill_kernel[grid](
            out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
            GROUP=group, BLOCK_ROWS=block_rows, BLOCK_Q=block_q, BLOCK_N=prefill_block_n, **common,
            num_warps=4 if block_rows * head_dim_pad <= 64 * 128 else 8,  # a 128 x 128 fp32 accumulator spills on 4 warps
        )  # fmt: skip
    return out


def prefill_rows(group: int, block_rows: int) -> tuple[int, int]:
    """(rows, queries) of one prefill program: a power-of-two tile of at least 16 rows (tl.dot) and of the group, holding
    rows // group queries x group heads; with a group that is not a power of two the last rows are padding."""
    rows = max(16, triton.next_power_of_2(block_rows), triton.next_power_of_2(group))
    return rows, rows // group


MAX_SPLITS = 16
# A split saves (tiles - tiles / splits) serial tile loads per program and costs the reduce pass (a launch, roughly the
# time of a couple of tile loads); more splits cost little more (partials are tiny), so the floor is small.
MIN_TILES_PER_SPLIT = 2


def choose_num_splits(num_programs: int, num_sms: int, num_key_tiles: int | None = None) -> int:
    """Flash-decoding splits of each decode's keys, a power of two in 1..MAX_SPLITS (the reduce kernel's arange).

    By batch: split only when the (sequence x KV head) programs would leave SMs idle, up to about two waves. By context,
    when the longest context's key tiles are known: no fewer than MIN_TILES_PER_SPLIT tiles per split, so short contexts
    are not split for nothing. Without num_key_tiles (CUDA-graph capture) the batch rule alone decides.
    """
    if num_programs >= num_sms:
        return 1
    splits = min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(2 * num_sms, num_programs)))
    if num_key_tiles is not None:
        by_context = max(1, num_key_tiles // MIN_TILES_PER_SPLIT)
        splits = min(splits, 1 << (by_context.bit_length() - 1))  # the power of two at or below
    return splits


def _num_key_tiles(max_seq_len: int | None, sliding_window: int | None, tile: int) -> int | None:
    """Key tiles the longest decode reads (a window caps them; +1 as its first tile need not be aligned); None unknown."""
    if not max_seq_len:
        return None
    if sliding_window is not None and max_seq_len > sliding_window:
        return triton.cdiv(sliding_window, tile) + 1
    return triton.cdiv(max_seq_len, tile)


def _num_splits(device: torch.device, num_programs: int, num_key_tiles: int | None) -> int:
    """choose_num_splits with this GPU's SM count; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return choose_num_splits(num_programs, num_sms, num_key_tiles)
