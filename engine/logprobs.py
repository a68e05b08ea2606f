"""Logprobs entries: prompt logprobs scored from a step's hidden states, and sampled-token entries held back until
their text is returned (so a choice's entries describe exactly its text, never a stop token or a cut stop string).

Prompt logprobs follow vLLM: entry i scores prompt token i given the tokens before it; the first has none (None).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.logits_processors import on_device
from engine.model.mistral import MistralForCausalLM
from engine.outputs import Logprob, TokenLogprobs
from engine.scheduler import ScheduledBatch

# Rows of prompt logits made at once: [rows, vocab] fp32 is 200 MB at 1024 rows of a 49k vocabulary.
MAX_SCORED_ROWS = 1024


@dataclass(slots=True)
class PromptScore:
    """The logprob of prompt token `position` given the ones before it, and the top-k tokens there."""

    position: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class _ScoredChunk:
    """Up to MAX_SCORED_ROWS prompt positions scored on the device, not yet read back."""

    owners: list[int]  # batch index of each row
    positions: list[int]  # the prompt token each row scores
    chosen: torch.Tensor  # [rows], logprob of the prompt token
    top_logprobs: torch.Tensor  # [rows, max_k], best first
    top_ids: torch.Tensor  # [rows, max_k]


@dataclass(slots=True)
class PendingPromptScores:
    """One step's prompt scores, still on the device; result() reads them back (the host waits here)."""

    ks: list[int | None]  # per batch index, as asked
    chunks: list[_ScoredChunk] = field(default_factory=list)

    def result(self) -> dict[int, list[PromptScore]]:
        scores: dict[int, list[PromptScore]] = {}
        for chunk in self.chunks:
            chosen, values, ids = chunk.chosen.tolist(), chunk.top_logprobs.tolist(), chunk.top_ids.tolist()
            for j, (owner, position) in enumerate(zip(chunk.owners, chunk.positions, strict=True)):
                k = self.ks[owner] or 0
                scores.setdefault(owner, []).append(PromptScore(position, chosen[j], ids[j][:k], values[j][:k]))
        return scores


def score_prompts(
    model: MistralForCausalLM,
    hidden: torch.Tensor,
    batch: ScheduledBatch,
    query_start_loc: list[int],
    ks: list[int | None],
) -> PendingPromptScores:
    """Scores of the prompt tokens this step's chunks predict, by batch index, for the sequences whose k is not None.
    Queued on hidden's device; read them with result().

    hidden: [num_tokens, hidden_size], the step's flat hidden states; the row at position p predicts token p + 1.
    """
    rows: list[int] = []
    owners: list[int] = []  # batch index of each row
    positions: list[int] = []  # the prompt token each row scores
    for i, k in enumerate(ks):
        if k is None:
            continue
        seq = batch.seqs[i]
        start = seq.num_computed_tokens
        for p in range(start, min(start + batch.num_new_tokens[i], seq.num_prompt_tokens - 1)):
            rows.append(query_start_loc[i] + p - start)
            owners.append(i)
            positions.append(p + 1)
    pending = PendingPromptScores(ks)
    for lo in range(0, len(rows), MAX_SCORED_ROWS):
        hi = min(lo + MAX_SCORED_ROWS, len(rows))
        index = on_device(rows[lo:hi], hidden.device)
        logprobs = torch.log_softmax(model.compute_logits(hidden[index]), dim=-1)  # [hi - lo, vocab]
        targets = [batch.seqs[owners[j]].token_ids[positions[j]] for j in range(lo, hi)]
        chosen = logprobs.gather(1, on_device(targets, hidden.device).unsqueeze(1)).squeeze(1)  # [hi - lo]
        max_k = max(ks[owners[j]] or 0 for j in range(lo, hi))
        top_values, top_ids = logprobs.topk(max_k, dim=-1)  # [hi - lo, max_k]
        pending.chunks.append(_ScoredChunk(owners[lo:hi], positions[lo:hi], chosen, top_values, top_ids))
    return pending


class PromptLogprobs:
    """One request's prompt logprobs, filled chunk by chunk (a recomputed chunk after preemption overwrites)."""

    def __init__(self, prompt_token_ids: list[int]) -> None:
        self.entries: list[TokenLogprobs | None] = [None] * len(prompt_token_ids)
        self.is_sent = False

    def record(self, scores: list[PromptScore], prompt_token_ids: list[int], token_text: Callable[[int], str]) -> None:
        for score in scores:
            token_id = prompt_token_ids[score.position]
            top = [Logprob(t, token_text(t), lp) for t, lp in zip(score.top_ids, score.top_logprobs, strict=True)]
            self.entries[score.position] = TokenLogprobs(Logprob(token_id, token_text(token_id), score.logprob), top)


@dataclass(slots=True)
class _Pending:
    start: int  # where the token's text starts in the choice's detokenized text (characters)
    end: int
    entry: TokenLogprobs


@dataclass(slots=True)
class HeldLogprobs:
    """A choice's sampled-token entries, released as the text they describe leaves the stop-string hold-back.

    When a stop string cuts the text, entries of tokens whose text starts at or after the cut are dropped; a token
    whose text straddles the cut keeps its entry (some of its text was returned).
    """

    _pending: deque[_Pending] = field(default_factory=deque)
    _num_chars: int = 0  # detokenized characters so far
    _num_emitted: int = 0  # of those, returned to the client

    def add(self, entry: TokenLogprobs, text: str) -> None:
        """`text`: what the detokenizer produced for this token (may be empty while a character is incomplete)."""
        start = self._num_chars
        self._num_chars += len(text)
        self._pending.append(_Pending(start, self._num_chars, entry))

    def release(self, emitted: str, is_finished: bool, is_cut: bool) -> list[TokenLogprobs]:
        """Entries whose text is now returned; at the end of the choice, all that describe returned text."""
        self._num_emitted += len(emitted)
        released: list[TokenLogprobs] = []
        while self._pending and (self._pending[0].end <= self._num_emitted or (is_finished and not is_cut)):
            released.append(self._pending.popleft().entry)
        if is_cut:
            released.extend(p.entry for p in self._pending if p.start < self._num_emitted)
            self._pending.clear()
        return released
