"""The CUDA path's LoRA kernels (engine/model/triton_lora.py) against LoraLinear's PyTorch path, on CPU through
TRITON_INTERPRET=1 at tiny odd shapes: fused parts, ranks below max_rank, base-model rows, fp32 and bf16.

As in test_triton_layers.py, the kernels run in one subprocess with TRITON_INTERPRET=1 set.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.triton_helpers import interpreted_report

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # bf16: the PyTorch path rounds the shrink to bf16, the kernels keep fp32
# name -> (num_tokens, in_features, part sizes, max_loras, max_rank, adapter ranks per slot, token slots)
CASES = {
    "fused_qkv": (5, 40, [24, 8, 8], 3, 8, [8, 4, 8], [1, 0, 3, 2, 1]),
    "single_part_odd": (3, 70, [33], 2, 16, [16, 5], [2, 2, 1]),
    "all_base_rows_but_one": (4, 16, [10, 10], 2, 4, [4, 4], [0, 0, 2, 0]),
}


def case_error(name: str, dtype: torch.dtype) -> float:
    from engine.model import triton_lora
    from engine.model.lora import LoraBatch, LoraLinear

    num_tokens, in_features, parts, max_loras, max_rank, ranks, token_slots = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    base = torch.nn.Linear(in_features, sum(parts), bias=False).to(dtype)
    layer = LoraLinear(base, parts, max_loras, max_rank, base.weight)
    for slot, rank in enumerate(ranks, start=1):
        weights = []
        for size in parts:
            a = torch.randn(rank, in_features, generator=gen)
            weights.append((a, torch.randn(size, rank, generator=gen)))
        layer.set_slot(slot, weights)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
    slots = torch.tensor(token_slots)
    mask = torch.nn.functional.one_hot(slots, max_loras + 1)[:, 1:].to(dtype)
    with torch.no_grad():
        expected = layer(x, LoraBatch(mask, slots))
        got = triton_lora.add_lora(base(x), x, layer.lora_a, layer.lora_b, slots)
        base_rows = slots == 0
        assert torch.equal(got[base_rows], base(x)[base_rows]), "a base-model row changed"
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, dict[str, float]]:
    return interpreted_report("tests.engine.test_triton_lora")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_the_torch_path(interpreted_errors: dict[str, dict[str, float]], name: str, dtype: str) -> None:
    error = interpreted_errors[name][dtype]
    assert error <= TOLERANCE[dtype], f"{name} {dtype}: relative error {error}"


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(json.dumps({name: {key: case_error(name, dtype) for key, dtype in dtypes.items()} for name in CASES}))
