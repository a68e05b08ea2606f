"""Scheduler: token budget, chunked prefill, max_num_seqs, preemption, no starvation, blocks returned, prefix hits, n>1.

Synthetic sequences, no model: `Sim.step` does what LLMEngine.step does around the forward pass (advance
num_computed_tokens, register full blocks, append a fake token where the batch samples, finish at max tokens) and
checks the allocator's invariants after every step.
"""

from __future__ import annotations

import itertools

import pytest

from engine.block_manager import BlockManager
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import PENDING_TOKEN_ID, Sequence, SequenceStatus

BLOCK_SIZE = 4
FAKE_TOKEN = 99_999


class Sim:
    def __init__(
        self,
        num_blocks: int,
        max_num_batched_tokens: int = 64,
        max_num_seqs: int = 8,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.bm = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens)
        self.max_tokens: dict[Sequence, int] = {}
        self.seqs: list[Sequence] = []
        self.first_admitted: list[Sequence] = []  # in order of first admission
        self.last_sampled: list[bool] = []  # batch.samples(i) of the last step, taken before the step advanced
        self._next_token = itertools.count(1000)

    def add(
        self, prompt_len: int = 0, max_tokens: int = 1, prompt: list[int] | None = None, leader: Sequence | None = None
    ) -> Sequence:
        """A sequence with a distinct prompt (no accidental prefix sharing) unless `prompt` is given."""
        token_ids = list(prompt) if prompt is not None else [next(self._next_token) for _ in range(prompt_len)]
        index = 0 if leader is None else sum(1 for s in self.seqs if s.leader is leader) + 1
        request_id = leader.request_id if leader is not None else f"req-{len(self.seqs)}"
        seq = Sequence(request_id, index, token_ids, len(token_ids), arrival_s=float(len(self.seqs)), leader=leader)
        self.seqs.append(seq)
        self.max_tokens[seq] = max_tokens
        self.scheduler.add(seq)
        return seq

    def step(self) -> ScheduledBatch:
        sched = self.scheduler
        batch = sched.schedule()
        assert sum(batch.num_new_tokens) <= sched.max_num_batched_tokens
        assert all(n > 0 for n in batch.num_new_tokens)
        assert len(batch.seqs) == len(set(batch.seqs)) <= sched.max_num_seqs
        assert len(sched.running) <= sched.max_num_seqs
        self.last_sampled = [batch.samples(i) for i in range(len(batch))]
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed_tokens + num_new  # KV room for this step
            if seq not in self.first_admitted:
                self.first_admitted.append(seq)
            seq.num_computed_tokens += num_new
            self.bm.cache_full_blocks(seq)
            if self.last_sampled[i]:
                seq.token_ids.append(FAKE_TOKEN)
                if seq.num_output_tokens >= self.max_tokens[seq]:
                    sched.finish(seq)
        self.check_blocks()
        return batch

    def run(self, max_steps: int = 1000) -> int:
        """Step until nothing is left; returns the number of steps."""
        for num_steps in itertools.count(1):
            assert num_steps <= max_steps, "scheduler made no progress"
            self.step()
            if not self.scheduler.has_work:
                return num_steps
        raise AssertionError("unreachable")

    def check_blocks(self) -> None:
        """Ref counts equal the live block tables; free list is exactly the unreferenced blocks."""
        expected = [0] * self.bm.num_blocks
        for seq in self.seqs:
            if seq.is_finished or seq.status is SequenceStatus.WAITING:
                assert seq.block_table == []
            for block_id in seq.block_table:
                expected[block_id] += 1
        assert self.bm.ref_counts == expected
        assert set(self.bm.free_ids) == {b for b, count in enumerate(expected) if count == 0}

    def assert_all_returned(self) -> None:
        assert not self.scheduler.waiting and not self.scheduler.running
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.ref_counts == [0] * self.bm.num_blocks
        assert self.bm.usage == 0.0


def scheduled(batch: ScheduledBatch) -> dict[Sequence, int]:
    return dict(zip(batch.seqs, batch.num_new_tokens, strict=True))


def test_token_budget_and_max_num_seqs_hold_every_step() -> None:
    sim = Sim(num_blocks=64, max_num_batched_tokens=10, max_num_seqs=3)
    for i in range(8):
        sim.add(prompt_len=3 + 2 * i, max_tokens=1 + i % 4)
    max_running = 0
    for _ in range(500):
        batch = sim.step()  # Sim.step asserts the budget, the cap and KV room
        max_running = max(max_running, len(batch))
        if not sim.scheduler.has_work:
            break
    assert max_running == 3
    assert all(s.is_finished and s.num_output_tokens == sim.max_tokens[s] for s in sim.seqs)
    sim.assert_all_returned()


def test_max_num_seqs_holds_back_admission_until_one_finishes() -> None:
    sim = Sim(num_blocks=64, max_num_seqs=2)
    a, b, c = sim.add(4, max_tokens=1), sim.add(4, max_tokens=3), sim.add(4, max_tokens=1)
    assert set(scheduled(sim.step())) == {a, b}  # a finishes on its first token
    assert c.status is SequenceStatus.WAITING
    assert a.is_finished
    assert set(scheduled(sim.step())) == {b, c}


def test_long_prompt_is_prefilled_in_chunks_while_decodes_share_the_steps() -> None:
    sim = Sim(num_blocks=64, max_num_batched_tokens=8)
    decoder = sim.add(prompt_len=3, max_tokens=10)
    assert scheduled(sim.step()) == {decoder: 3}
    long = sim.add(prompt_len=20, max_tokens=2)
    chunks = []
    while long.num_output_tokens == 0:
        batch = sim.step()
        steps = scheduled(batch)
        assert batch.seqs[0] is decoder and steps[decoder] == 1  # running decode first, one token
        chunks.append(steps[long])
        sampled = sim.last_sampled[batch.seqs.index(long)]
        assert sampled == (long.num_computed_tokens == 20)  # only the last chunk samples
    assert chunks == [7, 7, 6]
    assert scheduled(sim.step()) == {decoder: 1, long: 1}  # then both decode


def test_newest_running_sequence_is_preempted_first_and_recomputed_later() -> None:
    # 6 blocks of 4; three sequences of 3 prompt tokens each grow one block at a time until blocks run out.
    sim = Sim(num_blocks=6, enable_prefix_caching=False)
    a, b, c = (sim.add(prompt_len=3, max_tokens=12) for _ in range(3))
    assert set(scheduled(sim.step())) == {a, b, c}
    while sim.scheduler.num_preemptions == 0:
        batch = sim.step()
    assert list(sim.scheduler.waiting) == [c]  # the newest went back, to the front of the queue
    assert sim.scheduler.running == [a, b]
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0 and c.block_table == []
    assert set(batch.seqs) == {a, b}
    late = sim.add(prompt_len=1, max_tokens=1)
    # When blocks run out again b is the newest running sequence; both stay ahead of any later arrival.
    while sim.scheduler.num_preemptions == 1:
        sim.step()
    assert list(sim.scheduler.waiting) == [b, c, late]
    num_tokens_c = len(c.token_ids)
    assert num_tokens_c == 3 + 6  # c had sampled 6 tokens before it was preempted
    while c.status is SequenceStatus.WAITING:
        batch = sim.step()
    assert scheduled(batch)[c] == num_tokens_c  # all its tokens, prompt and output, prefill again
    assert sim.last_sampled[batch.seqs.index(c)]
    sim.run()
    assert all(s.is_finished and s.num_output_tokens == sim.max_tokens[s] for s in sim.seqs)
    sim.assert_all_returned()


def test_no_admission_in_a_step_that_preempted() -> None:
    # A prompt still being prefilled in chunks cannot get its next chunk's blocks: as the newest running
    # sequence it preempts itself. Its freed blocks would let it be re-admitted at once; the scheduler waits a step.
    sim = Sim(num_blocks=10, max_num_batched_tokens=16, enable_prefix_caching=False)
    decoder = sim.add(prompt_len=4, max_tokens=6)
    chunked = sim.add(prompt_len=40, max_tokens=1)
    assert scheduled(sim.step()) == {decoder: 4, chunked: 12}
    assert scheduled(sim.step()) == {decoder: 1, chunked: 15}
    assert scheduled(sim.step()) == {decoder: 1}
    assert sim.scheduler.num_preemptions == 1
    assert list(sim.scheduler.waiting) == [chunked] and chunked.num_computed_tokens == 0
    assert sim.bm.num_free_blocks == 8  # enough to admit its first chunk again, but not in the same step
    assert scheduled(sim.step()) == {decoder: 1, chunked: 15}
    sim.run()
    assert chunked.is_finished and decoder.is_finished
    sim.assert_all_returned()


def test_every_sequence_finishes_under_a_tight_block_budget_in_fcfs_admission_order() -> None:
    sim = Sim(num_blocks=12, max_num_batched_tokens=16, max_num_seqs=6)
    for i in range(20):
        sim.add(prompt_len=2 + (7 * i) % 13, max_tokens=3 + (5 * i) % 17)
    sim.run(max_steps=2000)
    assert sim.scheduler.num_preemptions > 0  # the budget really was tight
    assert all(s.is_finished and s.num_output_tokens == sim.max_tokens[s] for s in sim.seqs)
    assert sim.first_admitted == sim.seqs
    sim.assert_all_returned()


def test_finish_returns_all_blocks_for_waiting_prefilling_and_decoding_sequences() -> None:
    sim = Sim(num_blocks=16, max_num_batched_tokens=8)
    decoding = sim.add(prompt_len=5, max_tokens=50)
    sim.step()
    prefilling = sim.add(prompt_len=30, max_tokens=5)
    waiting = sim.add(prompt_len=6, max_tokens=5)
    sim.step()
    assert decoding.num_output_tokens == 2
    assert prefilling.status is SequenceStatus.RUNNING and 0 < prefilling.num_computed_tokens < 30
    assert waiting.status is SequenceStatus.WAITING
    assert sim.bm.num_free_blocks < sim.bm.num_blocks
    for seq in (waiting, prefilling, decoding):  # what LLMEngine.abort does
        sim.scheduler.finish(seq)
        assert seq.is_finished and seq.block_table == []
        sim.check_blocks()
    sim.assert_all_returned()
    assert not sim.scheduler.has_work and len(sim.step()) == 0
    sim.scheduler.finish(decoding)  # a second abort is harmless
    sim.assert_all_returned()


def test_a_shared_prefix_reuses_blocks_and_skips_their_prefill() -> None:
    sim = Sim(num_blocks=32)
    prefix = list(range(16))  # four full blocks
    a = sim.add(prompt=[*prefix, 100], max_tokens=10)
    sim.step()
    b = sim.add(prompt=[*prefix, 200, 201, 202], max_tokens=10)
    batch = sim.step()
    assert scheduled(batch) == {a: 1, b: 3}  # b computes only its own tail
    assert b.num_cached_tokens == 16
    assert b.block_table[:4] == a.block_table[:4]
    assert [sim.bm.ref_counts[x] for x in b.block_table[:4]] == [2, 2, 2, 2]
    assert sim.bm.prefix_cache_queries == 17 + 19 and sim.bm.prefix_cache_hits == 16
    sim.run()
    sim.assert_all_returned()


def test_a_fully_cached_prompt_still_computes_and_samples_its_last_token() -> None:
    sim = Sim(num_blocks=32)
    prompt = list(range(17))
    first = sim.add(prompt=prompt, max_tokens=1)
    sim.run()
    again = sim.add(prompt=prompt, max_tokens=1)
    batch = sim.step()
    assert scheduled(batch) == {again: 1} and sim.last_sampled == [True]
    assert again.num_cached_tokens == 16 and again.is_finished
    aligned = sim.add(prompt=prompt[:16], max_tokens=1)  # block-aligned: the last block is recomputed
    batch = sim.step()
    assert scheduled(batch) == {aligned: 4} and aligned.num_cached_tokens == 12
    assert first.num_cached_tokens == 0
    sim.assert_all_returned()


def test_prefix_caching_disabled_gives_no_hits() -> None:
    sim = Sim(num_blocks=32, enable_prefix_caching=False)
    prompt = list(range(17))
    sim.add(prompt=prompt, max_tokens=2)
    sim.run()
    again = sim.add(prompt=prompt, max_tokens=2)
    assert scheduled(sim.step()) == {again: 17}
    assert again.num_cached_tokens == 0
    assert sim.bm.prefix_cache_queries == 0 and sim.bm.prefix_cache_hits == 0 and sim.bm.cached == {}


def test_a_prefix_evicted_by_lru_misses_while_a_recent_one_hits() -> None:
    sim = Sim(num_blocks=6, max_num_batched_tokens=32)
    old, recent = list(range(9)), list(range(100, 109))  # two full blocks + one token each
    sim.add(prompt=old, max_tokens=1)
    sim.run()
    sim.add(prompt=recent, max_tokens=1)
    sim.run()
    # 6 blocks: old's 3 freed first, then recent's 3. A 3-block newcomer evicts exactly old's.
    sim.add(prompt_len=12, max_tokens=1)
    sim.run()
    hit = sim.add(prompt=recent, max_tokens=1)
    assert scheduled(sim.step()) == {hit: 1} and hit.num_cached_tokens == 8
    miss = sim.add(prompt=old, max_tokens=1)
    assert scheduled(sim.step()) == {miss: 9} and miss.num_cached_tokens == 0
    sim.assert_all_returned()


def test_followers_wait_for_the_leaders_prompt_then_share_its_full_blocks() -> None:
    sim = Sim(num_blocks=32, max_num_batched_tokens=64)
    prompt = list(range(10))  # two full blocks + two tokens
    leader = sim.add(prompt=prompt, max_tokens=3)
    followers = [sim.add(prompt=prompt, max_tokens=3, leader=leader) for _ in range(2)]
    other = sim.add(prompt_len=5, max_tokens=3)
    batch = sim.step()
    # The followers are skipped without blocking the request queued behind them.
    assert scheduled(batch) == {leader: 10, other: 5}
    assert all(f.status is SequenceStatus.WAITING for f in followers)
    batch = sim.step()
    assert scheduled(batch) == {leader: 1, other: 1, followers[0]: 2, followers[1]: 2}
    for f in followers:
        assert f.block_table[:2] == leader.block_table[:2] and f.num_cached_tokens == 8
        assert f.block_table[2] != leader.block_table[2]  # the partial block is each choice's own
    assert [sim.bm.ref_counts[x] for x in leader.block_table[:2]] == [3, 3]
    sim.run()
    assert all(s.is_finished and s.num_output_tokens == 3 for s in sim.seqs)
    sim.assert_all_returned()


def test_followers_of_a_chunked_leader_start_only_after_its_last_chunk() -> None:
    sim = Sim(num_blocks=32, max_num_batched_tokens=8)
    leader = sim.add(prompt=list(range(20)), max_tokens=2)
    follower = sim.add(prompt=list(range(20)), max_tokens=2, leader=leader)
    for _ in range(3):  # 8 + 8 + 4
        assert follower not in scheduled(sim.step())
    assert leader.num_computed_tokens == 20
    batch = sim.step()
    assert scheduled(batch) == {leader: 1, follower: 4} and follower.num_cached_tokens == 16


def admitted_next_to_a_big_sequence(num_blocks_wanted: int) -> bool:
    """200 blocks; a first sequence takes 190 of them, then one wanting `num_blocks_wanted` asks in the same step."""
    sim = Sim(num_blocks=200, max_num_batched_tokens=2000)
    assert sim.scheduler.watermark_blocks == 2  # 1% of the blocks
    big = sim.add(prompt_len=190 * BLOCK_SIZE, max_tokens=5)
    other = sim.add(prompt_len=num_blocks_wanted * BLOCK_SIZE, max_tokens=5)
    batch = scheduled(sim.step())
    assert batch[big] == 190 * BLOCK_SIZE
    return other in batch


def test_watermark_keeps_blocks_free_for_running_sequences() -> None:
    assert admitted_next_to_a_big_sequence(8)  # 8 + 2 reserved <= 10 free
    assert not admitted_next_to_a_big_sequence(9)  # 9 + 2 > 10
    alone = Sim(num_blocks=200, max_num_batched_tokens=2000)
    whole = alone.add(prompt_len=200 * BLOCK_SIZE, max_tokens=1)  # nothing running: no reserve
    assert scheduled(alone.step()) == {whole: 200 * BLOCK_SIZE}
    alone.assert_all_returned()


def test_usage_follows_the_blocks_held_by_running_sequences() -> None:
    sim = Sim(num_blocks=20)
    a = sim.add(prompt_len=8, max_tokens=3)  # 2 blocks
    b = sim.add(prompt_len=13, max_tokens=1)  # 4 blocks
    sim.step()  # b finishes on its first token
    assert b.is_finished and sim.bm.usage == pytest.approx(2 / 20)
    sim.step()  # a's ninth token opens a third block
    assert len(a.block_table) == 3 and sim.bm.usage == pytest.approx(3 / 20)
    sim.step()
    assert sim.bm.usage == 0.0


def test_look_ahead_a_pending_token_is_scheduled_a_preempted_holder_waits_and_a_finished_length_waits() -> None:
    """Look-ahead scheduling (llm_engine.py): a running sequence whose last token is pending is scheduled like any
    decode; preempted while it is pending, it is not readmitted until the token is real; a running sequence with nothing
    to compute (its token in flight will end it by length) is left out of the step."""
    sim = Sim(num_blocks=5, max_num_batched_tokens=64)
    a, b = sim.add(prompt_len=4, max_tokens=10), sim.add(prompt_len=4, max_tokens=10)
    sim.step()  # both prefilled, each has sampled a token
    for seq in (a, b):  # as if that token were still in flight: the engine's placeholder
        seq.token_ids[-1], seq.has_pending_token = PENDING_TOKEN_ID, True
    sim.bm.allocate(b, 12)  # b takes the last free blocks: a's slot for its pending token needs a block
    batch = sim.scheduler.schedule()
    assert scheduled(batch) == {a: 1} and b.status is SequenceStatus.WAITING and sim.scheduler.num_preemptions == 1
    assert sim.scheduler.schedule().seqs == [a] and b.status is SequenceStatus.WAITING  # b's token is still pending
    b.token_ids[-1], b.has_pending_token = 1234, False
    a.num_computed_tokens = len(a.token_ids)  # a's step done; its next token is its last: no placeholder, nothing to run
    batch = sim.scheduler.schedule()
    assert scheduled(batch) == {b: 1}  # a waits for its token; b is readmitted (its prompt block still cached)
