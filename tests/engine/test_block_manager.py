"""BlockManager: allocation and ref counts, prefix-cache hits on full blocks, LRU eviction of freed cached blocks.

Synthetic sequences only; "computing" a sequence means allocating its blocks, advancing num_computed_tokens and
registering the full blocks, exactly as the engine's step does after a forward pass.
"""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.sequence import Sequence

BLOCK_SIZE = 4


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence("req", 0, list(token_ids), len(token_ids), arrival_s=0.0)


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Admit `seq` (prefix match) and compute all its uncomputed tokens in one go."""
    if not seq.block_table:
        bm.match_prefix(seq)
    assert bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = len(seq.token_ids)
    bm.cache_full_blocks(seq)


def assert_all_free(bm: BlockManager) -> None:
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.ref_counts == [0] * bm.num_blocks
    assert bm.usage == 0.0


def test_allocate_rounds_up_to_blocks_and_free_returns_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert all(bm.ref_counts[b] == 1 for b in seq.block_table)
    assert bm.num_free_blocks == 5
    # Growing within the last block needs nothing; crossing into a new one needs one more.
    seq.num_computed_tokens = 10
    assert bm.blocks_needed(seq, 2) == 0
    assert bm.blocks_needed(seq, 3) == 1
    bm.free(seq)
    assert seq.block_table == [] and seq.block_hashes == [] and seq.num_computed_tokens == 0
    assert_all_free(bm)


def test_allocate_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = make_seq(list(range(9)))
    assert not bm.can_allocate(3)
    assert not bm.allocate(seq, 9)
    assert seq.block_table == []
    assert_all_free(bm)
    assert bm.allocate(seq, 8)
    assert bm.num_free_blocks == 0


def test_usage_is_the_fraction_of_referenced_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b = make_seq(list(range(8))), make_seq(list(range(100, 104)))
    compute(bm, a)
    assert bm.usage == pytest.approx(2 / 8)
    compute(bm, b)
    assert bm.usage == pytest.approx(3 / 8)
    bm.free(a)
    # a's blocks stay in the prefix cache but are free again: usage counts only referenced blocks.
    assert bm.usage == pytest.approx(1 / 8)
    assert len(bm.cached) == 3


def test_second_sequence_reuses_the_full_blocks_of_a_shared_prefix() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    prefix = list(range(12))  # three full blocks
    a = make_seq([*prefix, 50, 51])
    compute(bm, a)
    assert len(a.block_hashes) == 3  # only full blocks are registered
    b = make_seq([*prefix, 60, 61, 62])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:3]
    assert [bm.ref_counts[x] for x in b.block_table] == [2, 2, 2]
    assert bm.ref_counts[a.block_table[3]] == 1  # a's partial block is private
    assert b.num_computed_tokens == 12 and b.num_uncomputed_tokens == 3
    compute(bm, b)
    assert b.block_table[3] != a.block_table[3]
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table[:3]] == [1, 1, 1]
    bm.free(b)
    assert_all_free(bm)


def test_a_fully_cached_prompt_still_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    compute(bm, make_seq(list(range(9))))  # two full blocks + one token
    same = make_seq(list(range(9)))
    bm.match_prefix(same)
    assert same.num_computed_tokens == 8 and same.num_uncomputed_tokens == 1
    # A block-aligned prompt: its last full block is cached too, but must be recomputed for the last logits.
    bm2 = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_seq(list(range(8)))
    compute(bm2, first)
    assert len(bm2.cached) == 2
    again = make_seq(list(range(8)))
    bm2.match_prefix(again)
    assert again.block_table == first.block_table[:1]
    assert again.num_computed_tokens == 4 and again.num_uncomputed_tokens == 4


def test_a_block_hit_needs_the_same_parent_chain() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    compute(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # second block identical, first one not
    bm.match_prefix(other)
    assert other.block_table == [] and other.num_computed_tokens == 0


def test_a_twin_block_computed_twice_stays_private_and_everything_is_returned() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b = make_seq(list(range(5))), make_seq(list(range(5)))
    # Both admitted before either computed anything (as in one step): neither hits, both compute block 0.
    for seq in (a, b):
        bm.match_prefix(seq)
        assert bm.allocate(seq, 5)
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.cache_full_blocks(seq)
    owner = a.block_table[0]
    assert owner != b.block_table[0]
    assert b.block_hashes == a.block_hashes  # same content, same hash ...
    assert bm.cached == {a.block_hashes[0]: owner}  # ... but the first one owns the cache entry
    bm.free(a)
    bm.free(b)
    assert_all_free(bm)
    c = make_seq(list(range(5)))
    bm.match_prefix(c)
    assert c.block_table == [owner]


def test_matching_a_free_cached_block_takes_it_off_the_free_list() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_seq(list(range(9)))
    compute(bm, a)
    head = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_seq(list(range(9)))
    bm.match_prefix(b)
    assert b.block_table == head
    assert bm.num_free_blocks == 2 and all(bm.ref_counts[x] == 1 for x in head)
    # The remaining free blocks cannot be handed out twice: the matched ones are not among them.
    assert bm.allocate(b, 1) and not set(b.block_table[2:]) & set(head)


def test_freed_cached_blocks_are_evicted_oldest_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    a, b = make_seq(list(range(8))), make_seq(list(range(100, 108)))
    compute(bm, a)
    compute(bm, b)
    b_table = list(b.block_table)
    bm.free(a)  # freed first: least recently used
    bm.free(b)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 4
    # Before any eviction, both prompts would hit.
    probe = make_seq([*range(8), 9])
    bm.match_prefix(probe)
    assert probe.num_computed_tokens == 8
    bm.free(probe)  # a's blocks are now the most recently freed
    filler = make_seq(list(range(200, 208)))
    assert bm.allocate(filler, 8)  # two fresh blocks evict the two least recently freed: b's
    assert set(filler.block_table) == set(b_table)
    assert len(bm.cached) == 2
    b_again = make_seq([*range(100, 108), 9])
    bm.match_prefix(b_again)
    assert b_again.block_table == [] and b_again.num_computed_tokens == 0
    a_again = make_seq([*range(8), 9])
    bm.match_prefix(a_again)
    assert a_again.num_computed_tokens == 8


def test_a_sequence_frees_its_tail_block_first_so_its_prefix_outlives_it() -> None:
    bm = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    a = make_seq(list(range(12)))
    compute(bm, a)
    table = list(a.block_table)
    bm.free(a)
    one = make_seq([7])
    assert bm.allocate(one, 1)
    assert one.block_table == [table[2]]
    probe = make_seq(list(range(12)))
    bm.match_prefix(probe)
    assert probe.num_computed_tokens == 8  # first two blocks still cached


def test_prefix_caching_disabled_never_hits_or_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    compute(bm, make_seq(list(range(9))))
    assert bm.cached == {}
    b = make_seq(list(range(9)))
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0
    bm.record_prefix_lookup(9, 0)
    assert bm.prefix_cache_queries == 0 and bm.prefix_cache_hits == 0


def test_prefix_lookup_counters_add_up() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    bm.record_prefix_lookup(9, 0)
    bm.record_prefix_lookup(9, 8)
    assert bm.prefix_cache_queries == 18 and bm.prefix_cache_hits == 8
