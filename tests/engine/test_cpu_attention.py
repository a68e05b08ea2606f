"""The C decode-attention kernel (engine/model/cpu_attention.py) against the PyTorch reference, at tiny shapes.

Same cases as the Triton kernels (decode-only, mixed with prefill chunks, sliding window, GQA groups, block and head
sizes); the kernel answers the decode rows and the reference path the rest, so every row is compared.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from engine.model import attention
from engine.model.cpu_attention import DecodeKernel, load_decode_kernel
from tests.engine.test_triton_attention import CASES, Case, build_case

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc: the engine uses the reference path")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> DecodeKernel:
    loaded = load_decode_kernel(tmp_path_factory.mktemp("cache"))
    assert loaded is not None, "gcc is here, so the kernel must build and load"
    return loaded


def _attend(case: Case, kernel: DecodeKernel | None) -> torch.Tensor:
    t = build_case(case, torch.device("cpu"), torch.float32)
    attention.write_kv(t["k_cache"], t["v_cache"], t["k"], t["v"], t["meta"].slot_mapping)
    t["meta"].cpu_decode_kernel = kernel
    return attention.paged_attention(t["q"], t["k_cache"], t["v_cache"], t["meta"], case.head_dim**-0.5, case.sliding_window)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_matches_reference(case: Case, kernel: DecodeKernel) -> None:
    expected = _attend(case, None)
    got = _attend(case, kernel)
    assert (got - expected).abs().max().item() < 2e-5


def test_long_contexts_with_a_window_and_wide_groups(kernel: DecodeKernel) -> None:
    """Contexts of hundreds of blocks and 8 query heads per KV head, as in real models."""
    case = Case("long", (1, 1, 1, 1), (900, 17, 2000, 511), sliding_window=700, num_heads=16, num_kv_heads=2, head_dim=64)
    assert (_attend(case, kernel) - _attend(case, None)).abs().max().item() < 2e-5


def test_bad_inputs_are_refused_before_the_c_code(kernel: DecodeKernel) -> None:
    t = build_case(CASES[0], torch.device("cpu"), torch.float32)
    meta = t["meta"]
    args = (t["k_cache"], t["v_cache"], meta.block_tables, meta.seq_lens, meta.query_start_loc[:-1].long())
    with pytest.raises(ValueError, match="fp32"):
        kernel(t["q"].double(), *args, torch.empty_like(t["q"]).double(), 0.25, None)
    with pytest.raises(ValueError, match="int32"):
        kernel(t["q"], *args[:3], meta.seq_lens.long(), args[4], torch.empty_like(t["q"]), 0.25, None)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(t["q"].transpose(0, 1), *args, torch.empty_like(t["q"]).transpose(0, 1), 0.25, None)
    out = torch.empty_like(t["q"])
    bad_table = meta.block_tables.clone()
    bad_table[0, 0] = t["k_cache"].shape[0]
    with pytest.raises(ValueError, match="out of range"):
        kernel(t["q"], *args[:2], bad_table, *args[3:], out, 0.25, None)
    with pytest.raises(ValueError, match="out of range"):
        kernel(t["q"], *args[:3], meta.seq_lens + meta.block_tables.shape[1] * CASES[0].block_size, args[4], out, 0.25, None)
    with pytest.raises(ValueError, match="out of range"):
        kernel(t["q"], *args[:4], args[4] + t["q"].shape[0], out, 0.25, None)


def test_a_step_checks_its_indices_once_and_every_layer_reuses_them(kernel: DecodeKernel) -> None:
    """The first layer selects and checks the decode rows' indices; later layers of the step run on the same ones."""
    case = next(c for c in CASES if 1 in c.query_lens and any(n > 1 for n in c.query_lens))  # a mixed step
    t = build_case(case, torch.device("cpu"), torch.float32)
    meta = t["meta"]
    attention.write_kv(t["k_cache"], t["v_cache"], t["k"], t["v"], meta.slot_mapping)
    meta.cpu_decode_kernel = kernel
    scale = case.head_dim**-0.5
    first = attention.paged_attention(t["q"], t["k_cache"], t["v_cache"], meta, scale, case.sliding_window)
    assert meta.cpu_decode_args is not None
    tables, seq_lens, q_rows = meta.cpu_decode_args
    assert len(seq_lens) == case.query_lens.count(1) and q_rows.dtype == torch.int64
    again = attention.paged_attention(t["q"], t["k_cache"], t["v_cache"], meta, scale, case.sliding_window)
    assert meta.cpu_decode_args[0] is tables and torch.equal(first, again)

    bad = build_case(case, torch.device("cpu"), torch.float32)
    bad["meta"].cpu_decode_kernel = kernel
    bad["meta"].block_tables[case.query_lens.index(1), 0] = bad["k_cache"].shape[0]  # a decode row's block past the cache
    with pytest.raises(ValueError, match="out of range"):
        attention.paged_attention(bad["q"], bad["k_cache"], bad["v_cache"], bad["meta"], scale, case.sliding_window)


def test_built_once_then_reused(tmp_path: pathlib.Path) -> None:
    assert load_decode_kernel(tmp_path) is not None
    built = sorted((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert load_decode_kernel(tmp_path) is not None
    assert sorted((tmp_path / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_without_gcc_the_engine_keeps_the_reference_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine.model.cpu_attention.shutil.which", lambda name: None)
    assert load_decode_kernel(tmp_path) is None


def test_a_failing_build_falls_back(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr("engine.model.cpu_attention.SOURCE", broken)
    assert load_decode_kernel(tmp_path / "cache") is None
    assert not list((tmp_path / "cache" / "kernels").iterdir())  # no half-written library left behind
