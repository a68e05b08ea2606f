"""BlockManager: the paged KV-cache allocator (free list, reference counts, prefix cache). Pure Python.

A full block is keyed by hash(previous block's hash, its token ids); a sequence's first block's "previous hash" is its
LoRA adapter's (None for the base model), so two adapters never share K/V. Blocks nobody references stay in the
prefix cache and sit in the free list in least-recently-freed order; allocation takes the oldest first, which
evicts it from the cache.
"""

from __future__ import annotations

from collections import OrderedDict

from engine.sequence import Sequence


def block_hash(parent_hash: int | None, token_ids: list[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


def _root_hash(seq: Sequence) -> int | None:
    """The parent hash of a sequence's first block: its adapter keys its whole chain."""
    return None if seq.lora_id == 0 else hash(("lora", seq.lora_id))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.hash_of: dict[int, int] = {}  # block id -> block hash, for blocks in `cached`
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - len(self.free_ids) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_ids)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` the blocks its next `num_new_tokens` need; False (and no change) if they do not fit."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free_ids):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free())
        return True

    def match_prefix(self, seq: Sequence) -> None:
        """On admission: reuse cached blocks for the longest cached prefix, skipping their prefill.

        At least one token is always left to compute, so the step still produces logits to sample from. A sequence
        scoring its prompt reuses nothing: a cached block would skip the positions it must score.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.is_scoring_prompt:
            return
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        parent = _root_hash(seq)
        for i in range(max_blocks):
            h = block_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_id = self.cached.get(h)
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                del self.free_ids[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else _root_hash(seq)
            h = block_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            if h not in self.cached:  # a twin already cached keeps its place; ours stays private
                self.cached[h] = block_id
                self.hash_of[block_id] = h

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; unreferenced blocks join the free list (newest last)."""
        for block_id in reversed(seq.block_table):  # tail blocks first: they are the least reusable
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_ids[block_id] = None
        seq.block_table.clear()
        seq.block_table_version += 1  # the model runner's copy of this table (input_batch.py) is now stale
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def _take_free(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        h = self.hash_of.pop(block_id, None)
        if h is not None:
            del self.cached[h]
        self.ref_counts[block_id] = 1
        return block_id
