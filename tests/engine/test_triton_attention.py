"""Triton paged-attention kernels against the PyTorch reference, on CPU through TRITON_INTERPRET=1, at tiny shapes.

The interpreter is chosen when a kernel is defined, so the kernels run in one subprocess with TRITON_INTERPRET=1 set
(this process, and any CUDA test beside it, keeps compiled kernels); each case is reported as its own test.
On a CUDA machine tests/engine/test_cuda.py runs the same cases compiled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tests.engine.triton_helpers import interpreted_report


@dataclass(frozen=True)
class Case:
    name: str
    query_lens: tuple[int, ...]  # 1 = a decode
    context_lens: tuple[int, ...]  # keys cached before this step's queries
    sliding_window: int | None = None
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    block_size: int = 16
    num_splits: int = 1  # 0: chosen by the split rule with the max_seq_len hint (always 1 off CUDA)
    decode_tile: int = 16
    prefill_block_rows: int = 16  # rows of (query, head) pairs per prefill program: 16 // GROUP queries
    prefill_block_n: int = 16
    num_padded: int = 0  # CUDA-graph padding: decode rows with seq_len 0 appended to the batch, which must read nothing

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


CASES = [
    Case("decode", (1, 1, 1), (4, 32, 69)),
    Case("decode_window", (1, 1, 1), (4, 32, 69), sliding_window=8),
    Case("decode_splits", (1, 1, 1), (4, 32, 69), num_splits=4),
    Case("decode_splits_window", (1, 1, 1), (4, 32, 69), sliding_window=20, num_splits=4),
    Case("decode_wide_tile", (1, 1), (15, 70), head_dim=32, decode_tile=64),
    Case("prefill", (20, 37), (0, 0)),
    Case("prefill_after_prefix", (20, 37, 5), (16, 33, 60)),
    Case("prefill_window", (20, 37, 5), (16, 33, 60), sliding_window=8),
    Case("mixed", (1, 30, 1, 45), (40, 18, 7, 0), head_dim=32),
    Case("mixed_window", (1, 30, 1, 45), (40, 18, 7, 0), sliding_window=12, head_dim=32),
    Case("mixed_splits_window", (1, 30, 1, 45), (40, 18, 7, 0), sliding_window=12, num_splits=2),
    Case("block_size_8", (1, 19, 1), (30, 11, 64), block_size=8, sliding_window=10),
    Case("group_4", (1, 25), (50, 20), num_heads=8, num_kv_heads=2, head_dim=32),
    Case("no_gqa", (1, 25), (50, 20), num_heads=4, num_kv_heads=4),
    Case("head_dim_24", (1, 25), (50, 20), head_dim=24),
    Case("default_tiles", (1, 70, 1), (60, 0, 3), head_dim=32, decode_tile=64, prefill_block_rows=64, prefill_block_n=64),
    # GQA prefill: one program per KV head, GROUP query heads as rows; 3 does not divide 16 rows, so the last row is padding.
    Case("group_3_padded", (1, 23, 1, 6), (40, 17, 5, 0), num_heads=6, num_kv_heads=2),
    Case("group_3_window_splits", (1, 23, 1, 6), (40, 17, 5, 0), num_heads=6, num_kv_heads=2, sliding_window=10, num_splits=2),
    Case("group_8", (1, 13), (33, 14), num_heads=16, num_kv_heads=2),
    Case(
        "group_8_window_wide_rows",
        (45, 1),
        (20, 50),
        num_heads=8,
        num_kv_heads=1,
        head_dim=32,
        sliding_window=24,
        prefill_block_rows=64,
    ),
    Case("group_4_chunk_window", (29, 1), (50, 70), num_heads=8, num_kv_heads=2, sliding_window=20),
    Case("group_4_rows_128", (20,), (12,), num_heads=8, num_kv_heads=2, head_dim=128, prefill_block_rows=128),  # 8 warps
    Case("group_4_block_size_8", (1, 26), (61, 9), num_heads=8, num_kv_heads=2, block_size=8, sliding_window=13),
    # Decode splits over short and long contexts: most of a short context's splits are empty.
    Case("splits_short_and_long", (1, 1, 1), (1, 14, 200), num_splits=8),
    Case("splits_16_window", (1, 1), (5, 250), sliding_window=60, num_splits=16),
    # Padded rows after real ones, as a replayed CUDA graph has them.
    Case("decode_chosen_splits", (1, 1), (20, 300), num_splits=0),  # on an H200: 8 splits (19 tiles)
    Case("decode_padded_splits", (1, 1), (20, 90), num_padded=5, num_splits=4),
    Case("mixed_padded", (1, 12, 1), (40, 18, 7), num_heads=6, num_kv_heads=2, num_padded=2, num_splits=2),
]


def build_case(case: Case, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Random q/k/v and a paged cache with scattered blocks; this step's K/V not yet written."""
    from engine.model.attention import AttentionMetadata

    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    seq_lens = [c + q for c, q in zip(case.context_lens, case.query_lens, strict=True)]
    blocks_per_seq = [-(-n // case.block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, taken = [], 0
    for n in blocks_per_seq:
        tables.append(order[taken : taken + n])
        taken += n
    width = max(blocks_per_seq)
    shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    num_tokens = sum(case.query_lens)
    slots = [
        table[p // case.block_size] * case.block_size + p % case.block_size
        for table, c, q in zip(tables, case.context_lens, case.query_lens, strict=True)
        for p in range(c, c + q)
    ]
    query_start_loc = [0]
    for q in case.query_lens:
        query_start_loc.append(query_start_loc[-1] + q)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_lens_cpu=list(case.query_lens),
        seq_lens_cpu=seq_lens,
        max_seq_len=max(seq_lens),
        is_decode_only=all(q == 1 for q in case.query_lens),
    )
    return {
        "q": torch.randn(num_tokens, case.num_heads, case.head_dim, generator=gen).to(device, dtype),
        "k": torch.randn(num_tokens, case.num_kv_heads, case.head_dim, generator=gen).to(device, dtype),
        "v": torch.randn(num_tokens, case.num_kv_heads, case.head_dim, generator=gen).to(device, dtype),
        "k_cache": k_cache.to(device, dtype),
        "v_cache": v_cache.to(device, dtype),
        "meta": meta,
    }


def case_errors(case: Case, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Max abs differences: Triton vs reference for write_kv (with a padded slot -1) and for attention."""
    from engine.model import attention, triton_attention

    t = build_case(case, device, dtype)
    meta = t["meta"]
    ref_k, ref_v = t["k_cache"].cpu().float(), t["v_cache"].cpu().float()
    attention.write_kv(ref_k, ref_v, t["k"].cpu().float(), t["v"].cpu().float(), meta.slot_mapping.cpu())
    k_cache, v_cache = t["k_cache"], t["v_cache"]
    # A padded token (slot -1) must write nothing.
    pad_k = torch.cat([t["k"], torch.full_like(t["k"][:1], 7.0)])
    pad_v = torch.cat([t["v"], torch.full_like(t["v"][:1], 7.0)])
    pad_slots = torch.cat([meta.slot_mapping, torch.tensor([-1], device=device)])
    triton_attention.write_kv(k_cache, v_cache, pad_k, pad_v, pad_slots)
    write_err = max((k_cache.cpu().float() - ref_k).abs().max().item(), (v_cache.cpu().float() - ref_v).abs().max().item())

    cpu_meta = attention.AttentionMetadata(
        meta.query_start_loc.cpu(), meta.seq_lens.cpu(), meta.block_tables.cpu(), meta.slot_mapping.cpu(),
        meta.query_lens_cpu, meta.seq_lens_cpu, meta.max_seq_len, meta.is_decode_only,
    )  # fmt: skip
    scale = case.head_dim**-0.5
    expected = attention.paged_attention(t["q"].cpu().float(), ref_k, ref_v, cpu_meta, scale, case.sliding_window)
    q, query_start_loc, seq_lens, block_tables = _with_padded_rows(case, t["q"], meta)
    got = triton_attention.paged_attention(
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, max(case.query_lens), scale,
        case.sliding_window, num_splits=case.num_splits, max_seq_len=meta.max_seq_len, decode_tile=case.decode_tile,
        prefill_block_rows=case.prefill_block_rows, prefill_block_n=case.prefill_block_n,
    )  # fmt: skip
    num_tokens = t["q"].shape[0]
    attention_err = (got[:num_tokens].cpu().float() - expected).abs().max().item()

    # CUDA-graph padding: a decode row with seq_len 0 reads nothing and gives zeros, alone and after real rows.
    q1 = t["q"][:1]
    zero = triton_attention.paged_attention(
        q1, k_cache, v_cache, torch.tensor([0, 1], dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device), meta.block_tables[:1], 1, scale, case.sliding_window,
        num_splits=case.num_splits, decode_tile=case.decode_tile,
    )  # fmt: skip
    padded_err = max(zero.abs().max().item(), got[num_tokens:].abs().max().item() if case.num_padded else 0.0)
    return {"write": write_err, "attention": attention_err, "padded_row": padded_err}


def _with_padded_rows(case: Case, q: torch.Tensor, meta: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, query_start_loc, seq_lens, block_tables with case.num_padded decode rows of seq_len 0 appended (block 0)."""
    n = case.num_padded
    if n == 0:
        return q, meta.query_start_loc, meta.seq_lens, meta.block_tables
    device = q.device
    last = meta.query_start_loc[-1:]
    query_start_loc = torch.cat([meta.query_start_loc, last + torch.arange(1, n + 1, dtype=torch.int32, device=device)])
    seq_lens = torch.cat([meta.seq_lens, torch.zeros(n, dtype=torch.int32, device=device)])
    block_tables = torch.cat([meta.block_tables, torch.zeros(n, meta.block_tables.shape[1], dtype=torch.int32, device=device)])
    padded_q = torch.cat([q, torch.full((n, *q.shape[1:]), 3.0, dtype=q.dtype, device=device)])  # [num_tokens + n, ...]
    return padded_q, query_start_loc, seq_lens, block_tables


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, dict[str, float]]:
    return interpreted_report("tests.engine.test_triton_attention")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_interpreted_kernels_match_reference(case: Case, interpreted_errors: dict[str, dict[str, float]]) -> None:
    errors = interpreted_errors[case.name]
    assert errors["write"] == 0.0
    assert errors["attention"] < 2e-5, errors
    assert errors["padded_row"] == 0.0


def test_cases_cover_the_kernels() -> None:
    """Decode-only, prefill-only and mixed steps, with and without a window, split and unsplit decodes; every GQA group
    size the models use (1, 4, 8) and one that is not a power of two (3); chunks after a cached prefix whose window
    starts mid-tile; splits over short and long contexts; padded rows after real ones."""
    assert any(all(q == 1 for q in c.query_lens) and c.sliding_window for c in CASES)
    assert any(all(q > 1 for q in c.query_lens) and all(c.context_lens) for c in CASES)
    assert any(1 in c.query_lens and max(c.query_lens) > 1 and c.sliding_window for c in CASES)
    assert any(c.num_splits > 1 and c.sliding_window for c in CASES)
    prefill_groups = {c.group for c in CASES if max(c.query_lens) > 1}
    assert {1, 3, 4, 8} <= prefill_groups
    assert any(c.group == 3 and max(c.query_lens) > c.prefill_block_rows // c.group for c in CASES)  # several programs
    assert any(
        c.group > 1
        and c.sliding_window
        and c.sliding_window > c.prefill_block_n
        and c.sliding_window % c.prefill_block_n
        and any(q > 1 and ctx > 0 for q, ctx in zip(c.query_lens, c.context_lens, strict=True))
        for c in CASES
    )
    assert any(
        c.num_splits > 1 and min(c.context_lens) < c.decode_tile and max(c.context_lens) > c.num_splits * c.decode_tile
        for c in CASES
    )
    assert any(c.num_padded and c.num_splits > 1 for c in CASES)


def test_split_choice_by_batch_and_context() -> None:
    """The decode split rule, with an H200's 132 SMs passed in: batch fills the GPU, context sets a floor per split."""
    pytest.importorskip("triton")
    from engine.model.triton_attention import MAX_SPLITS, MIN_TILES_PER_SPLIT, choose_num_splits

    num_sms = 132
    kv_heads = 8  # Mistral-7B
    assert choose_num_splits(32 * kv_heads, num_sms) == 1  # batch 32 fills the SMs alone
    assert choose_num_splits(32 * kv_heads, num_sms, num_key_tiles=128) == 1
    assert choose_num_splits(1 * kv_heads, num_sms) == MAX_SPLITS  # graph path: batch only
    assert choose_num_splits(1 * kv_heads, num_sms, num_key_tiles=128) == MAX_SPLITS  # 8192 keys / 64
    assert choose_num_splits(1 * kv_heads, num_sms, num_key_tiles=32) == 32 // MIN_TILES_PER_SPLIT  # 2048 keys
    assert choose_num_splits(1 * kv_heads, num_sms, num_key_tiles=8) == 8 // MIN_TILES_PER_SPLIT  # 512 keys
    assert choose_num_splits(1 * kv_heads, num_sms, num_key_tiles=MIN_TILES_PER_SPLIT * 2 - 1) == 1
    assert choose_num_splits(1 * kv_heads, num_sms, num_key_tiles=1) == 1
    assert choose_num_splits(4 * kv_heads, num_sms, num_key_tiles=128) == 16  # 2 x 132 / 32 -> 9 -> 16
    assert choose_num_splits(8 * kv_heads, num_sms, num_key_tiles=128) == 8
    for num_programs in range(1, 300, 7):
        previous = 1
        for num_key_tiles in range(1, 300):
            splits = choose_num_splits(num_programs, num_sms, num_key_tiles)
            assert splits & (splits - 1) == 0 and 1 <= splits <= MAX_SPLITS  # a power of two for the reduce kernel
            assert splits == 1 or num_key_tiles >= splits * MIN_TILES_PER_SPLIT  # never a split of fewer tiles
            assert splits >= previous  # longer contexts never get fewer splits
            assert splits <= choose_num_splits(num_programs, num_sms)  # the context only lowers the batch's choice
            previous = splits


def test_key_tiles_of_the_longest_decode() -> None:
    """The context hint counts the key tiles a decode reads: a sliding window caps them; no hint, no count."""
    pytest.importorskip("triton")
    from engine.model.triton_attention import _num_key_tiles

    assert _num_key_tiles(None, None, 64) is None
    assert _num_key_tiles(None, 4096, 64) is None
    assert _num_key_tiles(0, None, 64) is None  # CUDA-graph capture's placeholder metadata
    assert _num_key_tiles(8192, None, 64) == 128
    assert _num_key_tiles(8193, None, 64) == 129
    assert _num_key_tiles(1000, 4096, 64) == 16
    assert _num_key_tiles(8192, 4096, 64) == 65  # the window's first key need not start a tile


def main() -> None:
    """Subprocess entry point: every case on CPU in fp32, errors as one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    print(json.dumps({c.name: case_errors(c, torch.device("cpu"), torch.float32) for c in CASES}))


if __name__ == "__main__":
    main()
