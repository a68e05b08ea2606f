"""Sizing the CUDA KV cache by a profiling pass: one worst-case step on dummy inputs, then simple arithmetic.

After the weights are loaded and before the KV cache exists, the engine runs the largest step the scheduler allows
(max_num_batched_tokens tokens over up to max_num_seqs prefill sequences, logits and a top-p sampler at every row, and a
chunk of prompt-logprob scoring) against a throwaway cache of a few blocks, and reads the allocator's peak. The cache
then gets total * gpu_memory_utilization - (weights + activation peak + CUDA-graph pool + memory torch does not own),
as vLLM sizes it. The dummy step runs on any device (tests run it on CPU); only the peak reading needs CUDA.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.cuda_graphs import padded_batch_sizes
from engine.input_batch import InputBatch, StepInputs
from engine.kv_cache import allocate_kv_cache, block_bytes
from engine.logprobs import MAX_SCORED_ROWS
from engine.model.config import ModelConfig
from engine.model.mistral import MistralForCausalLM
from engine.sampler import Sampler, SampleRow
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

_GIB = 1 << 30
NUM_PROFILE_BLOCKS = 4  # the throwaway cache: every block table of the dummy step points into these few blocks


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """What one GPU holds before its KV cache exists, in bytes."""

    total_bytes: int  # the device's memory
    weights_bytes: int  # torch allocations after loading: the weights and the rotary tables
    activation_peak_bytes: int  # the worst-case step's peak above the weights
    cuda_graph_bytes: int  # the decode graphs' private memory pool (0 without CUDA graphs)
    non_torch_bytes: int  # used on the device but not by this process's torch allocator: CUDA context, NCCL, others


def kv_cache_bytes(profile: MemoryProfile, gpu_memory_utilization: float) -> int:
    """The KV cache's share: gpu_memory_utilization of the device less everything else it must hold (never < 0)."""
    used = profile.weights_bytes + profile.activation_peak_bytes + profile.cuda_graph_bytes + profile.non_torch_bytes
    return max(0, int(profile.total_bytes * gpu_memory_utilization) - used)


def dummy_step(
    num_tokens: int, num_seqs: int, block_size: int, num_cache_blocks: int, max_positions: int, device: torch.device
) -> StepInputs:
    """`num_tokens` prompt tokens split as evenly as possible over `num_seqs` sequences, each a whole prompt from
    position 0, built by InputBatch as a real step's are (positions then wrap at max_positions, the rotary table's
    length). Block tables wrap around the `num_cache_blocks` blocks of a throwaway cache: slots repeat, which only
    overwrites garbage with garbage."""
    assert 1 <= num_seqs <= num_tokens, "every sequence needs at least one token"
    query_lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
    max_blocks = -(-max(query_lens) // block_size)
    table = [j % num_cache_blocks for j in range(max_blocks)]
    seqs = [Sequence("memory-profile", i, [0] * n, n, 0.0, block_table=list(table)) for i, n in enumerate(query_lens)]
    inputs = InputBatch(device, block_size, num_tokens, num_seqs, max_blocks).prepare(ScheduledBatch(seqs, query_lens))
    inputs.positions.remainder_(max_positions)
    return inputs


@torch.inference_mode()
def run_worst_case_step(
    model: MistralForCausalLM,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
    num_kv_heads: int | None = None,
    *,
    sample: bool = True,
) -> list[int]:
    """The forward of a full step (max_num_batched_tokens tokens over min(max_num_seqs, tokens) sequences) on a
    throwaway cache; with `sample`, then the sampler's costliest path (top-k, top-p, min-p, logprobs) at every sequence
    and one chunk of prompt-logprob scoring. Returns the sampled token ids (empty without `sample`).

    Under tensor parallelism this runs on rank 0 alone, before the process group exists: its partial sums are not
    reduced, which changes values but not one tensor's shape, so the memory it takes is the same."""
    weight = model.model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    num_seqs = min(max_num_seqs, max_num_batched_tokens)
    kv_cache = allocate_kv_cache(model.config, NUM_PROFILE_BLOCKS, block_size, device, dtype, num_kv_heads)
    max_positions = model.config.max_position_embeddings
    step = dummy_step(max_num_batched_tokens, num_seqs, block_size, NUM_PROFILE_BLOCKS, max_positions, device)
    with _unreduced(model):
        hidden = model(step.input_ids, step.positions, kv_cache, step.meta)  # [num_tokens, hidden]
    if not sample:
        return []
    num_scored = min(MAX_SCORED_ROWS, max_num_batched_tokens)  # prompt logprobs: logits and log-softmax of a chunk
    scored = torch.log_softmax(model.compute_logits(hidden[:num_scored]), dim=-1)  # [num_scored, vocab]
    scored.topk(MAX_LOGPROBS, dim=-1)
    del scored
    logits = model.compute_logits(hidden[step.sample_idx])  # [num_seqs, vocab]
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, logprobs=MAX_LOGPROBS)
    seq = Sequence("memory-profile", 0, [0], 1, 0.0)
    rows = [SampleRow(params, None, seq, frozenset()) for _ in range(num_seqs)]
    return Sampler()(logits, rows).token_ids


def profile_cuda_memory(
    model: MistralForCausalLM,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
    num_kv_heads: int | None,
    has_cuda_graphs: bool,
) -> MemoryProfile:
    """CUDA only: run the worst-case step and read what it took. Call after loading, before the KV cache exists."""
    device = model.model.embed_tokens.weight.device
    assert device.type == "cuda", "the memory profile reads the CUDA allocator"
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    weights_bytes = torch.cuda.memory_allocated(device)
    args = (block_size, num_kv_heads)
    activation_peak_bytes = _peak_above(model, weights_bytes, max_num_batched_tokens, max_num_seqs, *args, sample=True)
    cuda_graph_bytes = 0
    if has_cuda_graphs:
        # The graphs share one pool, captured largest first, so their private memory is about one max_num_seqs decode
        # step's peak, plus each captured size's output [batch_size, hidden], which lives as long as its graph.
        decode_peak = _peak_above(model, weights_bytes, max_num_seqs, max_num_seqs, *args, sample=False)
        outputs = sum(padded_batch_sizes(max_num_seqs)) * model.config.hidden_size * model.model.embed_tokens.weight.itemsize
        cuda_graph_bytes = decode_peak + outputs
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch_bytes = max(0, total - free - torch.cuda.memory_reserved(device))
    return MemoryProfile(total, weights_bytes, activation_peak_bytes, cuda_graph_bytes, non_torch_bytes)


def _peak_above(
    model: MistralForCausalLM,
    baseline: int,
    num_tokens: int,
    num_seqs: int,
    block_size: int,
    num_kv_heads: int | None,
    *,
    sample: bool,
) -> int:
    """Peak CUDA allocation of one dummy step above `baseline`."""
    device = model.model.embed_tokens.weight.device
    torch.cuda.reset_peak_memory_stats(device)
    run_worst_case_step(model, num_tokens, num_seqs, block_size, num_kv_heads, sample=sample)
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - baseline)


def log_profile(profile: MemoryProfile, gpu_memory_utilization: float, kv_bytes: int, block_bytes: int) -> None:
    logger.info(
        "memory profile: %.2f GiB x %.2f usable; weights %.2f GiB, activation peak %.2f GiB, CUDA graphs %.2f GiB, "
        "non-torch %.2f GiB -> KV cache %.2f GiB (%d blocks)",
        profile.total_bytes / _GIB,
        gpu_memory_utilization,
        profile.weights_bytes / _GIB,
        profile.activation_peak_bytes / _GIB,
        profile.cuda_graph_bytes / _GIB,
        profile.non_torch_bytes / _GIB,
        kv_bytes / _GIB,
        kv_bytes // block_bytes,
    )


@contextlib.contextmanager
def _unreduced(model: MistralForCausalLM) -> Iterator[None]:
    """Row-parallel layers skip their all-reduce for the duration (no process group exists yet during the profile):
    RowParallelLinear, or what wraps or replaces it (LoraLinear, QuantLinear), each marked by its is_sharded."""
    layers = [m for m in model.modules() if getattr(m, "is_sharded", False)]
    for layer in layers:
        layer.is_sharded = False
    try:
        yield
    finally:
        for layer in layers:
            layer.is_sharded = True


def cuda_kv_cache_bytes(
    config: EngineConfig, model: MistralForCausalLM, model_config: ModelConfig, num_kv_heads: int
) -> int | None:
    """On CUDA, unless num_kv_blocks or kv_cache_gib sets the cache: what gpu_memory_utilization leaves for it after
    the weights, a profiled worst-case step and the CUDA graphs' pool (memory_profile.py). Under tensor parallelism
    rank 0 profiles and every rank gets the same number of blocks."""
    weight = model.model.embed_tokens.weight
    if weight.device.type != "cuda" or config.num_kv_blocks is not None or config.kv_cache_gib is not None:
        return None
    has_cuda_graphs = not config.enforce_eager and config.tensor_parallel_size == 1  # as the ModelRunner decides
    profile = profile_cuda_memory(
        model, config.max_num_batched_tokens, config.max_num_seqs, config.block_size, num_kv_heads, has_cuda_graphs
    )
    kv_bytes = kv_cache_bytes(profile, config.gpu_memory_utilization)
    log_profile(
        profile, config.gpu_memory_utilization, kv_bytes, block_bytes(model_config, config.block_size, weight.dtype, num_kv_heads)
    )
    return kv_bytes
