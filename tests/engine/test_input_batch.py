"""InputBatch and BlockTableRows: each step's vectorized inputs equal the plain list-based construction, over random
scheduler runs (chunked prefills with cached prefixes, decodes, preemption, n > 1 followers, aborts, padded decode
steps); rows are kept, rebuilt and reused correctly; padded_batch_sizes pads at most 7 rows. No model.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.block_manager import BlockManager
from engine.cuda_graphs import padded_batch_sizes
from engine.input_batch import BlockTableRows, InputBatch, StepInputs
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, SequenceStatus
from tests.engine.test_scheduler import BLOCK_SIZE, Sim

CPU = torch.device("cpu")


def reference_inputs(batch: ScheduledBatch, block_size: int) -> dict[str, list]:
    """The obvious construction: Python lists, token by token, block tables padded with 0 to the widest."""
    ids, positions, slots, sample_idx, query_start_loc, seq_lens = [], [], [], [], [0], []
    for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        start = seq.num_computed_tokens
        ids += seq.token_ids[start : start + num_new]
        positions += range(start, start + num_new)
        slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, start + num_new)]
        query_start_loc.append(query_start_loc[-1] + num_new)
        seq_lens.append(start + num_new)
        if batch.samples(i):
            sample_idx.append(query_start_loc[-1] - 1)
    width = max(len(seq.block_table) for seq in batch.seqs)
    tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]
    return {
        "input_ids": ids,
        "positions": positions,
        "slot_mapping": slots,
        "query_start_loc": query_start_loc,
        "seq_lens": seq_lens,
        "block_tables": tables,
        "sample_idx": sample_idx,
    }


def assert_inputs_match(buffers: InputBatch, inputs: StepInputs, batch: ScheduledBatch, padded: int | None = None) -> None:
    ref = reference_inputs(batch, BLOCK_SIZE)
    n, num_tokens = len(batch), len(ref["input_ids"])
    meta = inputs.meta
    assert inputs.input_ids[:num_tokens].tolist() == ref["input_ids"]
    assert inputs.positions[:num_tokens].tolist() == ref["positions"]
    assert meta.slot_mapping[:num_tokens].tolist() == ref["slot_mapping"]
    assert meta.query_start_loc[: n + 1].tolist() == ref["query_start_loc"] == inputs.query_start_loc_cpu
    assert meta.seq_lens[:n].tolist() == ref["seq_lens"] == meta.seq_lens_cpu
    assert meta.query_lens_cpu == batch.num_new_tokens and meta.max_seq_len == max(ref["seq_lens"])
    assert meta.is_decode_only == (num_tokens == n)
    assert inputs.sample_idx.tolist() == ref["sample_idx"]
    assert meta.block_tables.is_contiguous() and meta.block_tables.dtype == torch.int32
    assert meta.block_tables.data_ptr() == buffers.block_tables.data_ptr(), "block tables must stay in the persistent buffer"
    width = len(ref["block_tables"][0])
    assert meta.block_tables[:n, :width].tolist() == ref["block_tables"]
    assert not meta.block_tables[:n, width:].any(), "a row holds stale block ids past its blocks"
    assert (inputs.input_ids.dtype, inputs.positions.dtype, meta.slot_mapping.dtype) == (torch.long,) * 3
    if padded is None:
        assert len(inputs.input_ids) == num_tokens and meta.block_tables.shape == (n, width)
        return
    assert len(inputs.input_ids) == padded and meta.block_tables.shape[0] == padded
    assert meta.slot_mapping[n:].tolist() == [-1] * (padded - n), "padded rows must write nowhere"
    assert meta.seq_lens[n:padded].tolist() == [0] * (padded - n), "padded rows must read nothing"
    assert meta.query_start_loc.tolist() == list(range(padded + 1))


def run_checked(sim: Sim, inputs: InputBatch, rng: random.Random, max_steps: int = 2000) -> int:
    """Step the simulated engine to the end, checking every step's inputs; some decode steps padded, some aborts."""
    schedule = sim.scheduler.schedule
    num_checked = 0

    def checked_schedule() -> ScheduledBatch:
        nonlocal num_checked
        batch = schedule()
        if batch.seqs:
            is_decode = sum(batch.num_new_tokens) == len(batch)
            padded = min(len(batch) + rng.randrange(8), inputs.rows.table.shape[0]) if is_decode and rng.random() < 0.5 else None
            assert_inputs_match(inputs, inputs.prepare(batch, padded), batch, padded)
            num_checked += 1
        return batch

    sim.scheduler.schedule = checked_schedule  # type: ignore[method-assign]
    for _ in range(max_steps):
        if not sim.scheduler.has_work:
            return num_checked
        sim.step()
        live = [s for s in sim.seqs if not s.is_finished]
        if live and rng.random() < 0.05:  # abort one, running or waiting, as LLMEngine.abort does
            sim.scheduler.finish(rng.choice(live))
    raise AssertionError(f"no end after {max_steps} steps")


@pytest.mark.parametrize("seed", range(6))
def test_random_runs_build_the_same_inputs_as_the_list_construction(seed: int) -> None:
    rng = random.Random(seed)
    max_num_seqs = rng.choice([3, 8, 16])
    sim = Sim(num_blocks=rng.choice([24, 48, 200]), max_num_batched_tokens=rng.choice([16, 40, 96]), max_num_seqs=max_num_seqs)
    shared = [rng.randrange(1000) for _ in range(3 * BLOCK_SIZE)]
    for _ in range(24):
        prompt = shared[: rng.randrange(len(shared) + 1)] + [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
        leader = sim.add(prompt=prompt, max_tokens=rng.randint(1, 20))
        for _ in range(rng.choice([0, 0, 1, 2])):  # n > 1: followers share the leader's prompt blocks
            sim.add(prompt=prompt, max_tokens=rng.randint(1, 20), leader=leader)
    max_len = max(len(s.token_ids) + sim.max_tokens[s] for s in sim.seqs)
    inputs = InputBatch(CPU, BLOCK_SIZE, 96, max_num_seqs, -(-max_len // BLOCK_SIZE))
    num_checked = run_checked(sim, inputs, rng)
    assert num_checked > 10
    assert sim.bm.prefix_cache_hits > 0, "the workload should hit the prefix cache"
    if sim.bm.num_blocks == 24:
        assert sim.scheduler.num_preemptions > 0, "24 blocks should force preemption"


def _seq(token_ids: list[int]) -> Sequence:
    return Sequence("r", 0, token_ids, len(token_ids), arrival_s=0.0, status=SequenceStatus.RUNNING)


def test_rows_append_new_blocks_rebuild_after_a_free_and_are_reused_once_their_sequence_stops() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    rows = BlockTableRows(max_num_seqs=2, max_blocks_per_seq=4)
    a, b = _seq(list(range(8))), _seq(list(range(100, 112)))
    for seq in (a, b):
        assert bm.allocate(seq, len(seq.token_ids))
    row_a, row_b = rows.update(a), rows.update(b)
    assert row_a != row_b and rows.table[row_b, :3].tolist() == b.block_table
    assert bm.allocate(a, 12)  # a grows by one block: only that id is appended
    assert rows.update(a) == row_a and rows.table[row_a].tolist() == [*a.block_table, 0]

    bm.free(a)  # preempted: its table is gone, the row is stale ...
    a.status = SequenceStatus.WAITING
    bm.allocate(b, 16)  # ... and b takes blocks a had
    a.status = SequenceStatus.RUNNING
    assert bm.allocate(a, 2)
    assert rows.update(a) == row_a, "a sequence keeps its row while it is running"
    assert rows.table[row_a].tolist() == [*a.block_table, 0, 0, 0], "a freed table is rebuilt, not appended to"
    assert rows.update(b) == row_b and rows.table[row_b].tolist() == b.block_table

    c = _seq([7, 7, 7])
    with pytest.raises(IndexError):  # both rows belong to running sequences: no row for a third
        rows.update(c)
    b.status = SequenceStatus.FINISHED
    bm.free(b)
    assert bm.allocate(c, 3)
    assert rows.update(c) == row_b, "the finished sequence's row is reclaimed for the next one"
    assert rows.table[row_b].tolist() == [*c.block_table, 0, 0, 0]
    assert b.seq_id not in rows.row_of and rows.owners[row_b] is c


def test_a_table_longer_than_a_row_is_refused() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(list(range(13)))
    assert bm.allocate(seq, 13)
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        BlockTableRows(max_num_seqs=1, max_blocks_per_seq=3).update(seq)


@pytest.mark.parametrize("max_num_seqs", [1, 2, 5, 8, 12, 64, 256])
def test_padded_batch_sizes_pad_at_most_seven_rows(max_num_seqs: int) -> None:
    sizes = padded_batch_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
    assert set(sizes) >= {1, 2, 4} & set(range(1, max_num_seqs + 1))
    assert all(size % 8 == 0 for size in sizes if 4 < size < max_num_seqs)
    for n in range(1, max_num_seqs + 1):
        assert next(size for size in sizes if size >= n) - n <= 7
    if max_num_seqs == 256:
        assert len(sizes) == 35
