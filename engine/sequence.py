"""Sequence: the state of one generated choice (its tokens, progress, KV blocks). Pure Python."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

_seq_ids = itertools.count()

PENDING_TOKEN_ID = -1  # look-ahead scheduling: the host's stand-in for a token still on the device (never embedded)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One choice of one request. Tokens are prompt + output; KV exists for the first num_computed_tokens."""

    request_id: str
    index: int  # choice index within the request
    token_ids: list[int]
    num_prompt_tokens: int
    arrival_s: float
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on first admission
    block_table: list[int] = field(default_factory=list)  # grows by appending until freed (then cleared)
    block_table_version: int = 0  # bumped each time the block table is freed, so copies of it know to rebuild
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks registered so far
    leader: Sequence | None = None  # choice 0, for choices n>1: they wait until its prompt blocks are cached, then share them
    is_scoring_prompt: bool = False  # computing prompt logprobs: every prompt position runs, none comes from the prefix cache
    # Look-ahead scheduling: token_ids[-1] is PENDING_TOKEN_ID, the token the step in flight samples; the next step
    # reads it on the device, and the engine replaces it when that step is finished.
    has_pending_token: bool = False
    was_scheduled: bool = False
    lora_id: int = 0  # the LoRA adapter it runs (engine/lora.py); 0: the base model
    lora_slot: int = 0  # the model's adapter slot it holds while running (LoraSlots); 0: none
    first_scheduled_s: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def can_start(self) -> bool:
        """False while this is a follower choice whose leader has not finished its prompt."""
        leader = self.leader
        return leader is None or leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
