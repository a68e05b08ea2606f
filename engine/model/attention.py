"""Grouped-query attention over the paged KV cache: the plain PyTorch reference path (CPU and tests).

The cache of one layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim]; a token's slot is
block_id * block_size + offset. Decodes are gathered and run as padded batches of similar lengths, or, on fp32 CPU caches
when the metadata carries it, by the C kernel of cpu_attention.py that reads the blocks in place; each prefill chunk
attends to its cached prefix plus its own causal block. Mistral's sliding window: key j is visible from query i
when i - window < j <= i, as in Hugging Face. On CUDA tensors both entry points hand over to the Triton kernels in
triton_attention.py, which tests check against this path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from engine.model.cpu_attention import DecodeKernel
from engine.model.lora import LoraBatch


@dataclass(slots=True)
class AttentionMetadata:
    """How the flat tokens of one step split into sequences. Built by the model runner, passed explicitly."""

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, where each sequence's tokens start in the flat batch
    seq_lens: torch.Tensor  # [num_seqs] int32, keys visible to each sequence's last query (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot each new token's K/V is written to
    query_lens_cpu: list[int]  # host copies, so the reference path needs no device sync
    seq_lens_cpu: list[int]
    max_seq_len: int
    is_decode_only: bool
    cpu_decode_kernel: DecodeKernel | None = None  # fp32 CPU decodes through C instead of gather + SDPA
    lora: LoraBatch | None = None  # the step's adapter rows; None: no sequence of the step runs an adapter
    # The C kernel's (block_tables, seq_lens, q_rows) of this step's decodes, selected and checked by the first layer
    # and reused by the others (they are the same in every layer).
    cpu_decode_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values [num_tokens, num_kv_heads, head_dim] at their slots."""
    if k.is_cuda:  # GPU-only speedup: a Triton kernel that also skips slot -1 (CUDA-graph padding)
        from engine.model import triton_attention  # Triton comes with CUDA builds of torch; CPU installs need not have it

        triton_attention.write_kv(k_cache, v_cache, k, v, slot_mapping)
        return
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Reference attention for a mixed step (this step's K/V already written) -> [num_tokens, num_heads, head_dim]."""
    if q.is_cuda:  # GPU-only speedup: Triton kernels that read the paged cache in place, no host sync
        from engine.model import triton_attention

        max_query_len = max(meta.query_lens_cpu)
        tables = meta.block_tables
        # max_seq_len sizes the decode splits by context too; 0 (CUDA-graph capture) leaves them to the batch size
        return triton_attention.paged_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, tables, max_query_len, scale, sliding_window,
            max_seq_len=meta.max_seq_len,
        )  # fmt: skip
    out = torch.empty_like(q)
    decode_rows = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
    if decode_rows and meta.cpu_decode_kernel is not None and q.dtype == torch.float32:
        _decode_kernel(meta.cpu_decode_kernel, q, k_cache, v_cache, meta, decode_rows, scale, sliding_window, out)
    elif decode_rows:
        _decode_batch(q, k_cache, v_cache, meta, decode_rows, scale, sliding_window, out)
    starts = meta.query_start_loc.tolist() if len(decode_rows) < len(meta.query_lens_cpu) else []
    for i, query_len in enumerate(meta.query_lens_cpu):
        if query_len == 1:
            continue
        start, seq_len = starts[i], meta.seq_lens_cpu[i]
        k, v = _gather(k_cache, v_cache, meta.block_tables[i : i + 1], seq_len)  # [1, seq_len, num_kv_heads, head_dim]
        if query_len == seq_len and (sliding_window is None or seq_len <= sliding_window):
            # A whole prompt inside the window: plain causal attention, SDPA's fastest path.
            out[start : start + query_len] = _sdpa(q[start : start + query_len].unsqueeze(0), k, v, None, scale)[0]
            continue
        q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        mask = _visible(q_pos.unsqueeze(1), k_pos, sliding_window).unsqueeze(0)  # [1, query_len, seq_len]
        out[start : start + query_len] = _sdpa(q[start : start + query_len].unsqueeze(0), k, v, mask, scale)[0]
    return out


def _decode_kernel(
    kernel: DecodeKernel,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    rows: list[int],
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
) -> None:
    """Every single-token query in one call of the C kernel: blocks read in place, no padding."""
    if meta.cpu_decode_args is None:
        tables, seq_lens, q_rows = meta.block_tables, meta.seq_lens, meta.query_start_loc[:-1]
        if len(rows) < len(meta.query_lens_cpu):  # a mixed step: the decodes only
            index = torch.tensor(rows)
            tables, seq_lens, q_rows = tables[index], seq_lens[index], q_rows[index]
        tables, seq_lens, q_rows = tables.contiguous(), seq_lens.contiguous(), q_rows.long()
        kernel.check_indices(tables, seq_lens, q_rows, k_cache.shape[0], k_cache.shape[1], q.shape[0])
        meta.cpu_decode_args = (tables, seq_lens, q_rows)
    kernel.run(q, k_cache, v_cache, *meta.cpu_decode_args, out, scale, sliding_window)


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    rows: list[int],
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
) -> None:
    """Single-token queries, batched in groups of similar length so little time goes to gathering padding."""
    for group in _length_groups(rows, meta.seq_lens_cpu):
        seq_idx = torch.tensor(group, device=q.device)
        token_idx = meta.query_start_loc[seq_idx].long()
        max_len = max(meta.seq_lens_cpu[i] for i in group)
        k, v = _gather(k_cache, v_cache, meta.block_tables[seq_idx], max_len)  # [group, max_len, num_kv_heads, head_dim]
        q_pos = (meta.seq_lens[seq_idx] - 1).unsqueeze(1)  # [group, 1]
        mask = _visible(q_pos, torch.arange(max_len, device=q.device).unsqueeze(0), sliding_window)  # [group, max_len]
        # The query heads sharing one KV head act as that head's "query rows": no K/V copy per query head.
        num_kv_heads = k.shape[2]
        qg = q[token_idx].view(len(group), num_kv_heads, -1, q.shape[-1])  # [group, num_kv_heads, heads_per_kv, head_dim]
        attn = F.scaled_dot_product_attention(
            qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=scale
        )  # [group, num_kv_heads, heads_per_kv, head_dim]
        out[token_idx] = attn.reshape(len(group), -1, q.shape[-1])


def _length_groups(rows: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Rows sorted by length, cut where a length exceeds 1.3x the shortest of its group (groups of 4 or more)."""
    ordered = sorted(rows, key=lambda i: seq_lens[i])
    groups: list[list[int]] = [[]]
    for i in ordered:
        group = groups[-1]
        if len(group) >= 4 and seq_lens[i] > 1.3 * seq_lens[group[0]]:
            groups.append([i])
        else:
            group.append(i)
    return groups


def _gather(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of each sequence's first max_len positions: [num_seqs, max_len, num_kv_heads, head_dim]."""
    num_cache_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    num_blocks = -(-max_len // block_size)
    ids = block_tables[:, :num_blocks].reshape(-1).long()  # [num_seqs * num_blocks]
    shape = (block_tables.shape[0], num_blocks * block_size, *k_cache.shape[2:])
    # Whole blocks as rows: one contiguous copy each, faster than indexing the 4-D cache.
    k = k_cache.view(num_cache_blocks, -1).index_select(0, ids).view(shape)
    v = v_cache.view(num_cache_blocks, -1).index_select(0, ids).view(shape)
    return k[:, :max_len], v[:, :max_len]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [b, q_len, heads, d], k/v [b, k_len, kv_heads, d], mask [b or 1, q_len, k_len] (None: causal) -> [b, q_len, heads, d]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if mask is None else mask.unsqueeze(1),
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)
