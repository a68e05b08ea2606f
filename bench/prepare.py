"""Step-preparation micro-benchmark: InputBatch.prepare against the list-based construction it replaced, side by side.

256 running sequences whose contexts hold 128..2048 tokens (block size 16), three steps:
  decode   every sequence decodes one token (256 tokens)
  mixed    248 decodes plus 8 prefill chunks of 1024 tokens (8440 tokens)
  prefill  8 prefill chunks of 1024 tokens, beyond cached prefixes of up to 1024 tokens
One JSON line per case: microseconds per step on each side (best of --repeats, the sides alternating, wall and process
CPU time) and their ratio. CPU tensors only: on CUDA the old side also pinned and copied every array, the new side copies
each buffer's used prefix once, so the CPU figures are the host work of both.

    python -m bench.prepare --out bench/results/prepare-cpu.jsonl
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from collections.abc import Callable

import torch

from bench.common import emit, versions
from engine.block_manager import BlockManager
from engine.input_batch import InputBatch
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, SequenceStatus

BLOCK_SIZE, MAX_MODEL_LEN, NUM_SEQS, CHUNK = 16, 4096, 256, 1024


def list_inputs(batch: ScheduledBatch, block_size: int) -> tuple[torch.Tensor, ...]:
    """The construction before InputBatch (kept here only for comparison): Python lists per token, one tensor each."""
    input_ids, positions, slots, sample_idx = [], [], [], []
    query_start_loc, seq_lens, query_lens = [0], [], []
    for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        start = seq.num_computed_tokens
        input_ids.extend(seq.token_ids[start : start + num_new])
        positions.extend(range(start, start + num_new))
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + num_new))
        query_start_loc.append(query_start_loc[-1] + num_new)
        seq_lens.append(start + num_new)
        query_lens.append(num_new)
        if batch.samples(i):
            sample_idx.append(query_start_loc[-1] - 1)
    max_blocks = max(len(seq.block_table) for seq in batch.seqs)
    tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in batch.seqs]
    return (
        torch.tensor(input_ids, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
        torch.tensor(slots, dtype=torch.long),
        torch.tensor(query_start_loc, dtype=torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(sample_idx, dtype=torch.long),
    )


def make_batch(case: str, rng: random.Random, bm: BlockManager) -> ScheduledBatch:
    """Sequences with their blocks allocated and num_computed_tokens set as the scheduler would leave them."""
    batch = ScheduledBatch()
    num_prefills = {"decode": 0, "mixed": 8, "prefill": 8}[case]
    num_decodes = {"decode": NUM_SEQS, "mixed": NUM_SEQS - 8, "prefill": 0}[case]
    for i in range(num_decodes + num_prefills):
        is_prefill = i >= num_decodes
        cached = rng.randint(0, CHUNK) if is_prefill else rng.randint(128, 2048)
        length = cached + (CHUNK + 1 if is_prefill else 1)
        seq = Sequence(f"r{i}", 0, [rng.randrange(32000) for _ in range(length)], length, 0.0, status=SequenceStatus.RUNNING)
        num_new = CHUNK if is_prefill else 1
        assert bm.allocate(seq, cached + num_new)
        seq.num_computed_tokens = cached
        batch.seqs.append(seq)
        batch.num_new_tokens.append(num_new)
    return batch


def timed(fn: Callable[[], object], results: dict[str, list[float]]) -> None:
    """Run fn once, appending its wall and process CPU seconds to results."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    results["wall"].append(time.perf_counter() - wall)
    results["cpu"].append(time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # both sides are single-threaded host work
    rng = random.Random(args.seed)
    for case in ("decode", "mixed", "prefill"):
        bm = BlockManager(num_blocks=NUM_SEQS * MAX_MODEL_LEN // BLOCK_SIZE, block_size=BLOCK_SIZE)
        batch = make_batch(case, rng, bm)
        inputs = InputBatch(torch.device("cpu"), BLOCK_SIZE, 16384, NUM_SEQS, MAX_MODEL_LEN // BLOCK_SIZE)
        inputs.prepare(batch)  # rows assigned and filled: later calls are the steady state (no new blocks)
        old: dict[str, list[float]] = {"wall": [], "cpu": []}
        new: dict[str, list[float]] = {"wall": [], "cpu": []}
        for _ in range(args.repeats):
            timed(functools.partial(list_inputs, batch, BLOCK_SIZE), old)
            timed(functools.partial(inputs.prepare, batch), new)
        record = {
            "bench": "prepare",
            "case": case,
            "num_seqs": len(batch),
            "num_tokens": sum(batch.num_new_tokens),
            "list_us": round(min(old["wall"]) * 1e6, 1),
            "input_batch_us": round(min(new["wall"]) * 1e6, 1),
            "list_cpu_us": round(min(old["cpu"]) * 1e6, 1),
            "input_batch_cpu_us": round(min(new["cpu"]) * 1e6, 1),
            "speedup": round(min(old["wall"]) / min(new["wall"]), 2),
            **versions(),
        }
        emit(record, args.out)


if __name__ == "__main__":
    main()
