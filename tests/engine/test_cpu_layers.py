"""The C norms and rotary (cpu_layers.py) against the PyTorch path of layers.py, which test_layers.py holds to Hugging
Face's formulas bit for bit; and a row's result independent of the batch it comes in, bit for bit."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

import engine.model.layers
import engine.model.mistral
from engine.model.attention import write_kv
from engine.model.cpu_layers import LayerKernel, load_layer_kernel
from engine.model.layers import RMSNorm, RotaryEmbedding
from tests.engine.model_helpers import load, paged_logits
from tests.engine.test_layers import CONFIG

HIDDEN, EPS = 576, 1e-5  # the embedded model's
# The C norm sums the squares in double and rounds the inverse RMS once (nearly always the correctly rounded value);
# torch's float32 sum and rsqrt put it up to about 3 ulps off (2e-7 relative, on 576 normal floats). The two products
# after it are rounded alike, so the outputs differ by that much: 8 ulps (2^-21) of slack, far below any real error
# (a wrong eps, mean or weight is off by 1e-5 or more).
NORM_RTOL = 2.0**-21
# 1, 7: rows on one thread; 65, 300: past PARALLEL_MIN_TOKENS (64), the OpenMP loop
NUM_TOKENS = (1, 7, 65, 300)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> LayerKernel:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc: the engine uses the PyTorch path")
    loaded = load_layer_kernel(tmp_path_factory.mktemp("cache"))
    assert loaded is not None
    return loaded


def _norm(kernel: LayerKernel | None) -> RMSNorm:
    norm = RMSNorm(HIDDEN, EPS)
    norm.weight.data = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    norm.cpu_kernel = kernel
    return norm


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x one float past an aligned address: the kernel's order must not depend on alignment."""
    out = torch.empty(x.numel() + 1)[1:].view(x.shape)
    return out.copy_(x)


@torch.inference_mode()
def test_rms_norm_matches_the_pytorch_path(kernel: LayerKernel) -> None:
    gen = torch.Generator().manual_seed(1)
    reference, fused = _norm(None), _norm(kernel)
    for num_tokens in NUM_TOKENS:
        x = torch.randn(num_tokens, HIDDEN, generator=gen) * 3
        got, expected = fused(x), reference(x)
        torch.testing.assert_close(got, expected, rtol=NORM_RTOL, atol=0)
        exact = x.double() * (x.double().pow(2).mean(-1, keepdim=True) + EPS).rsqrt() * reference.weight.double()
        assert (got - exact).abs().max() <= (expected - exact).abs().max()  # no less accurate than torch's
        x, residual = torch.randn(num_tokens, HIDDEN, generator=gen), torch.randn(num_tokens, HIDDEN, generator=gen)
        expected, expected_residual = reference.add_and_norm(x.clone(), residual.clone())
        got, got_residual = fused.add_and_norm(x.clone(), residual.clone())
        assert torch.equal(got_residual, expected_residual)  # one float add, as torch's
        torch.testing.assert_close(got, expected, rtol=NORM_RTOL, atol=0)


@torch.inference_mode()
def test_rms_norm_rows_do_not_depend_on_the_batch(kernel: LayerKernel) -> None:
    gen = torch.Generator().manual_seed(2)
    norm = _norm(kernel)
    x, residual = torch.randn(300, HIDDEN, generator=gen), torch.randn(300, HIDDEN, generator=gen)
    whole = norm(x)
    whole_added, whole_residual = norm.add_and_norm(x.clone(), residual.clone())
    for rows in (slice(0, 1), slice(37, 38), slice(290, 300), slice(5, 45)):  # on one thread; the whole call: OpenMP
        assert torch.equal(norm(_misaligned(x[rows])), whole[rows])
        got, got_residual = norm.add_and_norm(_misaligned(x[rows]), _misaligned(residual[rows]))
        assert torch.equal(got, whole_added[rows]) and torch.equal(got_residual, whole_residual[rows])


def _rotary() -> RotaryEmbedding:
    rotary = RotaryEmbedding(CONFIG)
    rotary.build(torch.device("cpu"), torch.float32)
    return rotary


NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 3, 1, 32  # CONFIG's
QKV_WIDTH = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
NUM_BLOCKS, BLOCK_SIZE = 8, 16
NUM_SLOTS = NUM_BLOCKS * BLOCK_SIZE


def _caches() -> tuple[torch.Tensor, torch.Tensor]:
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)  # [num_blocks, block_size, num_kv_heads, head_dim]
    return torch.full(shape, float("nan")), torch.full(shape, float("nan"))


@torch.inference_mode()
def test_rotary_and_kv_write_match_the_pytorch_path_bit_for_bit(kernel: LayerKernel) -> None:
    """No reduction: the same products, rounded alike (no fused multiply-add), give the same floats."""
    gen = torch.Generator().manual_seed(3)
    rotary = _rotary()
    assert rotary.cos_signed_sin is not None
    for num_tokens in (1, 7, 65, NUM_SLOTS):
        qkv = torch.randn(num_tokens, QKV_WIDTH, generator=gen) * 5
        positions = torch.randint(0, CONFIG.max_position_embeddings, (num_tokens,), generator=gen)
        slots = torch.randperm(NUM_SLOTS, generator=gen)[:num_tokens]
        q, k, v = qkv.split([NUM_HEADS * HEAD_DIM, HEAD_DIM, HEAD_DIM], dim=-1)
        expected_q, expected_k = rotary(positions, q.view(num_tokens, NUM_HEADS, HEAD_DIM), k.view(num_tokens, 1, HEAD_DIM))
        expected_caches, got_caches = _caches(), _caches()
        write_kv(*expected_caches, expected_k, v.view(num_tokens, 1, HEAD_DIM), slots)
        got_q = kernel.rotary_write_kv(positions, qkv, NUM_HEADS, rotary.cos_signed_sin, *got_caches, slots)
        assert torch.equal(got_q, expected_q)
        for got, expected in zip(got_caches, expected_caches, strict=True):  # untouched slots stay NaN in both
            assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))


@torch.inference_mode()
def test_rotary_rows_do_not_depend_on_the_batch(kernel: LayerKernel) -> None:
    gen = torch.Generator().manual_seed(4)
    table = _rotary().cos_signed_sin
    assert table is not None
    qkv = torch.randn(NUM_SLOTS, QKV_WIDTH, generator=gen)
    positions, slots = torch.randint(0, 4096, (NUM_SLOTS,), generator=gen), torch.arange(NUM_SLOTS)
    whole_caches = _caches()
    whole_q = kernel.rotary_write_kv(positions, qkv, NUM_HEADS, table, *whole_caches, slots)
    for rows in (slice(0, 1), slice(100, 101), slice(3, 40)):  # on one thread; the whole call, 128 rows: OpenMP
        caches = _caches()
        got_q = kernel.rotary_write_kv(positions[rows], _misaligned(qkv[rows]), NUM_HEADS, table, *caches, slots[rows])
        assert torch.equal(got_q, whole_q[rows])
        for got, whole in zip(caches, whole_caches, strict=True):
            assert torch.equal(got.view(NUM_SLOTS, -1)[rows], whole.view(NUM_SLOTS, -1)[rows])


def test_rotary_refuses_positions_and_slots_out_of_range(kernel: LayerKernel) -> None:
    table = _rotary().cos_signed_sin
    assert table is not None
    qkv, caches = torch.zeros(2, QKV_WIDTH), _caches()
    for positions, slots in (([0, 4096], [0, 1]), ([0, -1], [0, 1]), ([0, 1], [0, NUM_SLOTS]), ([0, 1], [-1, 1])):
        with pytest.raises(ValueError, match="out of range"):
            kernel.rotary_write_kv(torch.tensor(positions), qkv, NUM_HEADS, table, *caches, torch.tensor(slots))
    assert caches[0].isnan().all() and caches[1].isnan().all()  # nothing written


def test_without_gcc_the_layers_keep_the_pytorch_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    assert load_layer_kernel(tmp_path) is None


def test_the_model_runs_its_norms_and_rotary_through_the_kernel(
    tiny_mistral_dir: pathlib.Path, kernel: LayerKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the kernel attached (as engine/rank.py does), no norm, rotary or K/V write of a step runs the PyTorch path."""

    def refuse(*_: object) -> None:
        raise AssertionError("the PyTorch path ran")

    monkeypatch.setattr(engine.model.mistral, "write_kv", refuse)
    monkeypatch.setattr(engine.model.layers, "_rotate", refuse)
    monkeypatch.setattr(torch.Tensor, "rsqrt_", refuse)
    model = load(tiny_mistral_dir, kernel)
    logits = paged_logits(model, list(range(1, 21)), prefill_len=12, chunk=6)  # prefill chunks, then decodes
    assert logits.shape[0] == 20 and logits.isfinite().all()


@pytest.mark.parametrize("num_rows", [1, 3, 7, 33])  # one thread, and rows split over the threads from 4
def test_lora_update_matches_the_masked_products_and_is_batch_invariant(kernel: LayerKernel, num_rows: int) -> None:
    """Each row's own slot, rank 8 in slots of max rank 16 (zero padding), slot 0 rows untouched; a row alone gets
    bit for bit what it gets in the batch."""
    from engine.model.lora import LoraBatch, LoraLinear

    gen = torch.Generator().manual_seed(num_rows)
    base = torch.nn.Linear(72, 40, bias=False)
    layer = LoraLinear(base, [24, 16], max_loras=3, max_rank=16, like=base.weight)
    for slot in (1, 2, 3):
        parts = [(torch.randn(8, 72, generator=gen), torch.randn(size, 8, generator=gen)) for size in (24, 16)]
        layer.set_slot(slot, parts)  # type: ignore[arg-type]
    x = torch.randn(num_rows, 72, generator=gen)
    slots = torch.arange(num_rows) % 4  # slot 0 (the base model) included
    batch = LoraBatch.of(slots, 4, torch.float32)
    out = torch.randn(num_rows, 40, generator=gen)
    expected = layer._add_update(out.clone(), x, batch)  # the masked products (no kernel set)
    layer.cpu_kernel = kernel
    got = layer._add_update(out.clone(), x, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[slots == 0], out[slots == 0])
    alone = torch.cat(
        [
            layer._add_update(out[i : i + 1].clone(), x[i : i + 1], LoraBatch.of(slots[i : i + 1], 4, torch.float32))
            for i in range(num_rows)
        ]
    )
    assert torch.equal(got, alone)
