"""Logit parity with transformers (fp32, CPU): prefill (chunked) and token-by-token decode through the paged cache."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from engine.model.cpu_attention import DecodeKernel, load_decode_kernel
from engine.model.cpu_layers import LayerKernel, load_layer_kernel
from tests.engine.model_helpers import hf_logits, load, paged_logits

TOLERANCE = 1e-3


Kernels = tuple[DecodeKernel | None, LayerKernel | None]


@pytest.fixture(scope="module", params=["reference", "c_kernels"])
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Kernels:
    """The PyTorch reference path, then the C kernels the engine uses on fp32 CPU: decode attention, norms and rotary."""
    if request.param == "reference":
        return None, None
    if shutil.which("gcc") is None:
        pytest.skip("no gcc: the engine uses the reference path")
    cache = tmp_path_factory.mktemp("cache")
    decode_kernel, layer_kernel = load_decode_kernel(cache), load_layer_kernel(cache)
    assert decode_kernel is not None and layer_kernel is not None
    return decode_kernel, layer_kernel


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_embedded_model_matches_transformers(embedded_model_dir: pathlib.Path, kernels: Kernels) -> None:
    model = load(embedded_model_dir, kernels[1])
    ids = _ids(70, model.config.vocab_size, seed=1)
    expected = hf_logits(embedded_model_dir, ids)
    # prefill 20 + 20 + 10, then 20 single-token decodes
    got = paged_logits(model, ids, prefill_len=50, chunk=20, decode_kernel=kernels[0])
    diff = (got - expected).abs().max(dim=-1).values
    assert diff.max().item() <= TOLERANCE, f"max abs logit difference per position: {diff.tolist()}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("fixture", ["tiny_mistral_dir", "tiny_mistral_sliding_dir"])
def test_tiny_mistral_matches_transformers(fixture: str, request: pytest.FixtureRequest, kernels: Kernels) -> None:
    model_dir: pathlib.Path = request.getfixturevalue(fixture)
    model = load(model_dir, kernels[1])
    ids = _ids(60, model.config.vocab_size, seed=2)  # longer than the sliding window (8) and than several blocks
    expected = hf_logits(model_dir, ids)
    got = paged_logits(model, ids, prefill_len=37, chunk=13, decode_kernel=kernels[0])
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert expected.std().item() > 0.1  # the random model's logits are far from flat, so the check means something


def test_sliding_window_changes_logits(tiny_mistral_dir: pathlib.Path, tiny_mistral_sliding_dir: pathlib.Path) -> None:
    """Same weights, only the window differs: inside the window the logits agree, beyond it they must not."""
    ids = _ids(30, 49152, seed=3)
    full = paged_logits(load(tiny_mistral_dir), ids, prefill_len=30, chunk=30)
    windowed = paged_logits(load(tiny_mistral_sliding_dir), ids, prefill_len=30, chunk=30)
    assert torch.allclose(full[:8], windowed[:8], atol=1e-5)
    assert not torch.allclose(full[20:], windowed[20:], atol=1e-3)


def test_llama3_rope_scaling_matches_transformers(tmp_path: pathlib.Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load(tmp_path)
    assert model.config.rope_type == "llama3" and model.config.tie_word_embeddings
    ids = _ids(100, 300, seed=4)
    assert (paged_logits(model, ids, prefill_len=70, chunk=35) - hf_logits(tmp_path, ids)).abs().max().item() <= TOLERANCE
