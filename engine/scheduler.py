"""Scheduler: continuous batching over a token budget, with chunked prefill and preemption. Pure Python.

Each step: running sequences first (decodes, and prompts still being prefilled in chunks), oldest first; then
waiting sequences are admitted first come first served with as much of their prompt as the budget allows.
When blocks run out, the newest running sequence is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed later.
With LoRA adapters a sequence holds its adapter's slot while it runs (engine/lora.py LoraSlots); a waiting sequence
whose adapter finds no free slot waits, and those behind it may go first.
With look-ahead scheduling (llm_engine.py) a sequence's last token may be pending (still on the device): it is scheduled
like a real one, but a preempted sequence is not readmitted until it is real, and a running sequence with nothing to
compute (its pending token would end it by length, so none was added) waits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from engine.lora import LoraSlots


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: each sequence with how many of its uncomputed tokens run now."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step, so a token is sampled for it."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == len(seq.token_ids)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, lora_slots: LoraSlots | None = None
    ) -> None:
        self.block_manager = block_manager
        self.lora_slots = lora_slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Admissions keep a few blocks free so running sequences can grow without immediate preemption.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.num_uncomputed_tokens == 0:  # look-ahead: its token in flight is its last
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
        if not preempted:  # admitting while preempting would only thrash
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                return
            if not seq.can_start or seq.has_pending_token:
                continue  # a follower choice waits for its leader's prompt; a preempted one for its token in flight
            self.block_manager.match_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            needed = self.block_manager.blocks_needed(seq, num_new)
            reserve = self.watermark_blocks if self.running else 0
            if not self.block_manager.can_allocate(needed + reserve):
                self.block_manager.free(seq)  # give back the prefix blocks; retried next step
                return
            if self.lora_slots is not None and not self.lora_slots.acquire(seq):
                self.block_manager.free(seq)  # every adapter slot is held by running sequences: retried next step
                continue
            self.block_manager.record_prefix_lookup(len(seq.token_ids), seq.num_computed_tokens)
            if not seq.was_scheduled:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.was_scheduled = True
            self.block_manager.allocate(seq, num_new)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        if self.lora_slots is not None:
            self.lora_slots.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            if self.lora_slots is not None:
                self.lora_slots.release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
