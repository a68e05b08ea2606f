"""Sampler: turns one step's logits into tokens, each row with its own SamplingParams.

Order: the grammar mask (structured outputs), logit_bias, min_tokens, repetition / presence / frequency penalties, then
greedy argmax or temperature -> top_k -> top_p -> min_p -> a draw from the row's own generator (so a seeded request gives
the same tokens whatever else is in the batch). Logprobs are of the raw model distribution, as vLLM reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.structured import TokenBitmask


@dataclass(slots=True)
class SampleRow:
    """What the sampler needs to know about one sampling sequence."""

    params: SamplingParams
    generator: torch.Generator | None
    seq: Sequence  # read, never copied: only penalties and min_tokens look at its tokens
    stop_ids: frozenset[int]  # EOS (unless ignored) and stop_token_ids, masked until min_tokens is reached


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # per row, None unless logprobs were asked: (sampled logprob, top token ids, top logprobs)
    logprobs: list[tuple[float, list[int], list[float]] | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow], token_mask: TokenBitmask | None = None) -> SamplerOutput:
        """logits: fp32 [num_rows, vocab], modified in place. token_mask: grammar masks for some rows (structured.py)."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
        if token_mask is not None:  # before every other processor; logprobs above stay those of the raw model
            token_mask.apply(logits)
        for i, row in enumerate(rows):
            _apply_processors(logits[i], row)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
        random = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if greedy:
            token_ids[greedy] = logits[greedy].argmax(dim=-1)
        if random:
            token_ids[random] = _sample(logits[random], [rows[i] for i in random])
        ids = token_ids.tolist()
        return SamplerOutput(ids, _logprobs(raw_logprobs, ids, rows))


def _apply_processors(logits: torch.Tensor, row: SampleRow) -> None:
    """logits: [vocab] of one row."""
    p = row.params
    if p.logit_bias:
        ids = torch.tensor([t for t in p.logit_bias if t < logits.shape[0]], dtype=torch.long, device=logits.device)
        vals = torch.tensor([p.logit_bias[t] for t in p.logit_bias if t < logits.shape[0]], device=logits.device)
        logits.index_add_(0, ids, vals)
    if row.seq.num_output_tokens < p.min_tokens and row.stop_ids:
        logits[[t for t in row.stop_ids if t < logits.shape[0]]] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.seq.token_ids)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.seq.num_output_tokens:
        out = torch.tensor(row.seq.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[0])[: logits.shape[0]].to(logits.dtype)  # [vocab]
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _sample(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """logits [num_rows, vocab] -> one token id per row."""
    temps = torch.tensor([r.params.temperature for r in rows], device=logits.device).unsqueeze(1)
    logits = logits / temps
    if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
        logits = _top_k_top_p(logits, rows)
    probs = torch.softmax(logits, dim=-1)  # [num_rows, vocab]
    min_ps = [r.params.min_p for r in rows]
    if any(min_ps):
        threshold = torch.tensor(min_ps, device=probs.device).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Each row uses its own generator.
    noise = torch.empty_like(probs)
    for i, row in enumerate(rows):
        noise[i].exponential_(generator=row.generator)
    return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_rows, vocab]
    # min(): a top_k past the vocabulary means all of it, and would overflow int64 in torch.tensor (failing the whole step)
    top_ks = [min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in rows]
    ks = torch.tensor(top_ks, device=logits.device).unsqueeze(1)  # [num_rows, 1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= ks, float("-inf"))
    top_ps = torch.tensor([r.params.top_p for r in rows], device=logits.device).unsqueeze(1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first token always stays.
    drop = (probs.cumsum(dim=-1) - probs) >= top_ps
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _logprobs(
    raw: torch.Tensor | None, ids: list[int], rows: list[SampleRow]
) -> list[tuple[float, list[int], list[float]] | None]:
    result: list[tuple[float, list[int], list[float]] | None] = [None] * len(rows)
    if raw is None:
        return result
    for i, row in enumerate(rows):
        k = row.params.logprobs
        if k is None:
            continue
        top_values, top_ids = raw[i].topk(k) if k > 0 else (raw[i][:0], raw[i][:0].long())
        result[i] = (float(raw[i, ids[i]]), top_ids.tolist(), top_values.tolist())
    return result
