"""KV-cache sizing by profiling: the arithmetic with numbers, the dummy step's layout, and the worst-case step run on CPU
with the tiny Mistral fixtures (the peak reading itself needs CUDA: test_cuda.py checks it)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine.loader import load_model, read_model_config
from engine.memory_profile import NUM_PROFILE_BLOCKS, MemoryProfile, dummy_step, kv_cache_bytes, run_worst_case_step
from engine.model.parallel import Partition, RowParallelLinear

GIB = 1 << 30
CPU = torch.device("cpu")


def test_kv_cache_bytes_is_the_usable_share_less_everything_else() -> None:
    profile = MemoryProfile(
        total_bytes=80 * GIB,
        weights_bytes=int(14.5 * GIB),
        activation_peak_bytes=int(1.25 * GIB),
        cuda_graph_bytes=GIB // 4,
        non_torch_bytes=GIB // 2,
    )
    # 0.9 x 80 = 72 GiB usable, less 14.5 + 1.25 + 0.25 + 0.5 = 16.5 GiB
    assert kv_cache_bytes(profile, 0.9) == int(55.5 * GIB)
    assert kv_cache_bytes(profile, 1.0) == int(63.5 * GIB)


def test_kv_cache_bytes_is_never_negative() -> None:
    profile = MemoryProfile(
        total_bytes=24 * GIB, weights_bytes=14 * GIB, activation_peak_bytes=2 * GIB, cuda_graph_bytes=0, non_torch_bytes=GIB
    )
    assert kv_cache_bytes(profile, 0.5) == 0  # 12 GiB usable, 17 GiB taken


def test_dummy_step_splits_tokens_over_sequences_and_wraps_its_blocks() -> None:
    step = dummy_step(num_tokens=10, num_seqs=3, block_size=2, num_cache_blocks=2, max_positions=64, device=CPU)
    meta = step.meta
    assert meta.query_lens_cpu == [4, 3, 3] and meta.seq_lens_cpu == [4, 3, 3]  # whole prompts from position 0
    assert meta.query_start_loc.tolist() == [0, 4, 7, 10]
    assert step.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert meta.block_tables.tolist() == [[0, 1]] * 3
    assert step.sample_idx.tolist() == [3, 6, 9]
    assert meta.slot_mapping.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert max(meta.slot_mapping.tolist()) < 2 * 2 and not meta.is_decode_only

    long = dummy_step(num_tokens=40, num_seqs=1, block_size=4, num_cache_blocks=3, max_positions=32, device=CPU)
    assert long.meta.block_tables.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]]  # 10 blocks of table over 3 real ones
    assert max(long.meta.slot_mapping.tolist()) < 3 * 4
    assert long.positions.tolist() == [*range(32), *range(8)]  # past the rotary table: wrapped

    decode = dummy_step(num_tokens=5, num_seqs=5, block_size=16, num_cache_blocks=4, max_positions=64, device=CPU)
    assert decode.meta.is_decode_only and decode.positions.tolist() == [0] * 5


@pytest.mark.parametrize("model", ["tiny_mistral_dir", "tiny_mistral_sliding_dir"])
@pytest.mark.parametrize(("num_tokens", "max_num_seqs"), [(100, 1), (64, 8), (6, 8), (600, 1)])
def test_worst_case_step_runs_on_cpu(model: str, num_tokens: int, max_num_seqs: int, request: pytest.FixtureRequest) -> None:
    model_dir: pathlib.Path = request.getfixturevalue(model)
    config = read_model_config(model_dir)
    llm = load_model(model_dir, config, CPU, torch.float32)
    # 100 tokens in one sequence: 7 blocks of 16 wrapping over the throwaway cache's 4; 6 tokens: at most 6 sequences;
    # 600 tokens in one sequence: more than the fixture's 512 positions
    assert NUM_PROFILE_BLOCKS * 16 < 100
    token_ids = run_worst_case_step(llm, num_tokens, max_num_seqs, block_size=16)
    assert len(token_ids) == min(num_tokens, max_num_seqs)
    assert all(0 <= t < config.vocab_size for t in token_ids)
    assert run_worst_case_step(llm, num_tokens, max_num_seqs, block_size=16, sample=False) == []


def test_worst_case_step_runs_on_a_tensor_parallel_rank_before_its_group_exists(tiny_mistral_dir: pathlib.Path) -> None:
    config = read_model_config(tiny_mistral_dir)
    partition = Partition(0, 2)
    llm = load_model(tiny_mistral_dir, config, CPU, torch.float32, partition)
    sharded = [m for m in llm.modules() if isinstance(m, RowParallelLinear)]
    assert sharded and all(m.is_sharded for m in sharded)
    token_ids = run_worst_case_step(llm, 48, 4, block_size=16, num_kv_heads=partition.num_kv_heads(config))
    assert len(token_ids) == 4
    assert all(m.is_sharded for m in sharded)  # the all-reduce is back for real steps
