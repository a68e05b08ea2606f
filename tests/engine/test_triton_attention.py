"""Triton paged-attention kernels against the PyTorch reference, on CPU through TRITON_INTERPRET=1, at tiny shapes.

The interpreter is chosen when a kernel is defined, so the kernels run in one subprocess with TRITON_INTERPRET=1 set
(this process, and any CUDA test beside it, keeps compiled kernels); each case is reported as its own test.
On a CUDA machine tests/engine/test_cuda.py runs the same cases compiled.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


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
    num_splits: int = 1
    decode_tile: int = 16
    prefill_block_m: int = 16
    prefill_block_n: int = 16


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
    Case("default_tiles", (1, 70, 1), (60, 0, 3), head_dim=32, decode_tile=64, prefill_block_m=64, prefill_block_n=64),
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
    got = triton_attention.paged_attention(
        t["q"], k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, max(case.query_lens), scale,
        case.sliding_window, num_splits=case.num_splits, decode_tile=case.decode_tile,
        prefill_block_m=case.prefill_block_m, prefill_block_n=case.prefill_block_n,
    )  # fmt: skip
    attention_err = (got.cpu().float() - expected).abs().max().item()

    # CUDA-graph padding: a decode row with seq_len 0 reads nothing and gives zeros.
    q1 = t["q"][:1]
    zero = triton_attention.paged_attention(
        q1, k_cache, v_cache, torch.tensor([0, 1], dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device), meta.block_tables[:1], 1, scale, case.sliding_window,
        num_splits=case.num_splits, decode_tile=case.decode_tile,
    )  # fmt: skip
    return {"write": write_err, "attention": attention_err, "padded_row": zero.abs().max().item()}


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, dict[str, float]]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine.test_triton_attention"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_interpreted_kernels_match_reference(case: Case, interpreted_errors: dict[str, dict[str, float]]) -> None:
    errors = interpreted_errors[case.name]
    assert errors["write"] == 0.0
    assert errors["attention"] < 2e-5, errors
    assert errors["padded_row"] == 0.0


def test_cases_cover_the_kernels() -> None:
    """Decode-only, prefill-only and mixed steps, with and without a window, split and unsplit decodes."""
    assert any(all(q == 1 for q in c.query_lens) and c.sliding_window for c in CASES)
    assert any(all(q > 1 for q in c.query_lens) and all(c.context_lens) for c in CASES)
    assert any(1 in c.query_lens and max(c.query_lens) > 1 and c.sliding_window for c in CASES)
    assert any(c.num_splits > 1 and c.sliding_window for c in CASES)


def main() -> None:
    """Subprocess entry point: every case on CPU in fp32, errors as one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    print(json.dumps({c.name: case_errors(c, torch.device("cpu"), torch.float32) for c in CASES}))


if __name__ == "__main__":
    main()
