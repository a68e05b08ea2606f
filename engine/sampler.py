"""Sampler: turns one step's logits into tokens, each row with its own SamplingParams, in batched tensor ops.

Order: the grammar mask (structured outputs), logit_bias, min_tokens, repetition / presence / frequency penalties
(logits_processors.py), then greedy argmax or temperature -> top_k -> top_p -> min_p -> a draw. A row with its own
generator (a seeded request) draws from it, so it gets the same tokens whatever else is in the batch; rows without one
share one batched draw. Python only reads the rows' params into index lists and small tensors once per step; no tensor
op runs per row except a seeded row's draw. Logprobs are of the raw model distribution, as vLLM reports them.
`sample()` only queues the work and returns device tensors (SampledTokens); its `result()` reads them back, the one
point where the host waits for the device, so the engine can postprocess the previous step meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.logits_processors import TokenHistories, apply_logit_bias, apply_penalties, mask_stop_ids, on_device
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.structured import TokenBitmask


@dataclass(slots=True)
class SampleRow:
    """What the sampler needs to know about one sampling sequence."""

    params: SamplingParams
    generator: torch.Generator | None  # a seeded request's own; None: the sampler's shared one
    seq: Sequence  # read, never copied: only penalties and min_tokens look at its tokens
    stop_ids: frozenset[int]  # EOS (unless ignored) and stop_token_ids, masked until min_tokens is reached


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # per row, None unless logprobs were asked: (sampled logprob, top token ids, top logprobs)
    logprobs: list[tuple[float, list[int], list[float]] | None]


@dataclass(slots=True)
class SampledTokens:
    """One step's sampled tokens and logprobs, still on the device; result() reads them back (the host waits here)."""

    token_ids: torch.Tensor  # [num_rows]
    num_rows: int
    logprob_rows: list[int] = field(default_factory=list)  # the rows that asked for logprobs
    logprob_ks: list[int] = field(default_factory=list)  # top-k of each of those rows
    sampled_logprobs: torch.Tensor | None = None  # [len(logprob_rows)], of the sampled token
    top_logprobs: torch.Tensor | None = None  # [len(logprob_rows), max k], best first
    top_ids: torch.Tensor | None = None  # [len(logprob_rows), max k]

    def result(self) -> SamplerOutput:
        logprobs: list[tuple[float, list[int], list[float]] | None] = [None] * self.num_rows
        token_ids = self.token_ids.tolist()  # the sync: waits for the step's forward and sampling
        if self.sampled_logprobs is not None and self.top_logprobs is not None and self.top_ids is not None:
            sampled, values, ids = self.sampled_logprobs.tolist(), self.top_logprobs.tolist(), self.top_ids.tolist()
            for j, (i, k) in enumerate(zip(self.logprob_rows, self.logprob_ks, strict=True)):
                logprobs[i] = (sampled[j], ids[j][:k], values[j][:k])
        return SamplerOutput(token_ids, logprobs)


@dataclass(slots=True)
class _RowGroups:
    """Indices of the rows that need each stage, read from their params in one pass."""

    random: list[int] = field(default_factory=list)  # temperature > 0; the others take the argmax
    biased: list[int] = field(default_factory=list)
    min_tokens: list[int] = field(default_factory=list)  # below min_tokens, with stop ids to mask
    penalized: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # seeds the shared generator of the rows that bring none
        self._shared_generators: dict[torch.device, torch.Generator] = {}
        self.histories = TokenHistories()  # penalized rows' token ids, extended step by step

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow], token_mask: TokenBitmask | None = None) -> SamplerOutput:
        """sample() and wait for its result."""
        return self.sample(logits, rows, token_mask).result()

    def sample(self, logits: torch.Tensor, rows: list[SampleRow], token_mask: TokenBitmask | None = None) -> SampledTokens:
        """logits: fp32 [num_rows, vocab], modified in place. token_mask: grammar masks for some rows (structured.py).
        Queues the work on logits' device and returns without waiting for it."""
        groups = _group_rows(rows)
        raw_logprobs = None
        if groups.logprobs:
            raw_logprobs = torch.log_softmax(_take(logits, groups.logprobs), dim=-1)  # [num_logprob_rows, vocab]
        if token_mask is not None:  # before every other processor; logprobs above stay those of the raw model
            token_mask.apply(logits)
        apply_logit_bias(logits, groups.biased, [rows[i].params.logit_bias or {} for i in groups.biased])
        mask_stop_ids(logits, groups.min_tokens, [rows[i].stop_ids for i in groups.min_tokens])
        penalized = groups.penalized
        apply_penalties(logits, penalized, [rows[i].params for i in penalized], [rows[i].seq for i in penalized], self.histories)
        if len(groups.random) == len(rows):
            token_ids = self._sample(logits, rows, groups.random)  # [num_rows]
        else:  # greedy fast path: the argmax is all a greedy row needs
            token_ids = logits.argmax(dim=-1)  # [num_rows]
            if groups.random:
                random = on_device(groups.random, logits.device)
                token_ids[random] = self._sample(logits[random], rows, groups.random)
        return _sampled_tokens(raw_logprobs, token_ids, rows, groups.logprobs)

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow], idx: list[int]) -> torch.Tensor:
        """logits [len(idx), vocab] of rows[idx] -> one token id per row."""
        params = [rows[i].params for i in idx]
        temps = on_device([p.temperature for p in params], logits.device, torch.float32)  # [n]
        logits = logits / temps.unsqueeze(1)
        filtered = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        if len(filtered) == len(params):
            logits = _top_k_top_p(logits, params)
        elif filtered:
            where = on_device(filtered, logits.device)
            logits[where] = _top_k_top_p(logits[where], [params[j] for j in filtered])
        probs = torch.softmax(logits, dim=-1)  # [n, vocab]
        min_ps = [p.min_p for p in params]
        if any(min_ps):
            threshold = on_device(min_ps, probs.device, torch.float32).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return _draw(probs, self._uniforms(probs, [rows[i].generator for i in idx]))

    def _uniforms(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One uniform number in (0, 1] per row of probs [n, vocab] -> [n].

        A row with a generator draws its own number from it; the others share one draw.
        """
        shared = [j for j, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            return 1.0 - torch.rand(len(generators), device=probs.device, generator=self._shared_generator(probs.device))
        uniforms = torch.empty(len(generators), device=probs.device)  # [n]
        for j, generator in enumerate(generators):
            if generator is not None:
                uniforms[j : j + 1] = 1.0 - torch.rand(1, device=probs.device, generator=generator)
        if shared:
            drawn = 1.0 - torch.rand(len(shared), device=probs.device, generator=self._shared_generator(probs.device))
            uniforms[on_device(shared, probs.device)] = drawn
        return uniforms

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared_generators.get(device)
        if generator is None:
            generator = self._shared_generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return generator


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [n, vocab], uniforms [n] in (0, 1] -> one token id per row, drawn from its row (inverse CDF).

    One random number per row instead of one per vocabulary entry (the exponential race needed 49,152 a row for
    SmolLM2: 90 of a 529 ms batch-32 CPU step, bench/cpu_step_profile.py). u > 0 and the first index whose running sum
    reaches u * total never land on a zero-probability token; each row's sum runs in its own fixed order, so a row's
    draw does not depend on the other rows.
    """
    cdf = probs.cumsum(dim=-1)  # [n, vocab]
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)  # [n, 1]
    return torch.searchsorted(cdf, targets).squeeze(1).clamp_(max=probs.shape[1] - 1)  # [n]


def _group_rows(rows: list[SampleRow]) -> _RowGroups:
    groups = _RowGroups()
    for i, row in enumerate(rows):
        p = row.params
        if p.temperature != 0.0:
            groups.random.append(i)
        if p.logit_bias:
            groups.biased.append(i)
        if p.min_tokens and row.stop_ids and row.seq.num_output_tokens < p.min_tokens:
            groups.min_tokens.append(i)
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            groups.penalized.append(i)
        if p.logprobs is not None:
            groups.logprobs.append(i)
    return groups


def _take(values: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """values[idx] without the copy when idx is every row in order."""
    return values if len(idx) == values.shape[0] else values[on_device(idx, values.device)]


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [n, vocab] -> the same with the tokens outside each row's top_k and top_p set to -inf."""
    vocab = logits.shape[1]
    # min(): a top_k past the vocabulary means all of it, and would overflow int64 in torch.tensor (failing the whole step)
    top_ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    if all(p.top_p == 1.0 for p in params):  # top_k only: a partial topk is enough, no full sort
        return _top_k(logits, top_ks)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, vocab]
    ks = on_device(top_ks, logits.device).unsqueeze(1)  # [n, 1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, vocab]
    sorted_logits = sorted_logits.masked_fill(ranks >= ks, float("-inf"))
    top_ps = on_device([p.top_p for p in params], logits.device, torch.float32).unsqueeze(1)  # [n, 1]
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first token always stays.
    drop = (probs.cumsum(dim=-1) - probs) >= top_ps
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    """logits [n, vocab] -> -inf except each row's top_ks[j] largest logits."""
    top_values, top_ids = logits.topk(max(top_ks), dim=-1)  # [n, max k], best first
    ranks = torch.arange(top_values.shape[1], device=logits.device).unsqueeze(0)  # [1, max k]
    ks = on_device(top_ks, logits.device).unsqueeze(1)  # [n, 1]
    top_values = top_values.masked_fill(ranks >= ks, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, top_ids, top_values)


def _sampled_tokens(raw: torch.Tensor | None, token_ids: torch.Tensor, rows: list[SampleRow], idx: list[int]) -> SampledTokens:
    """raw: log-softmax [len(idx), vocab] of rows[idx]; token_ids [num_rows] the sampled tokens. No sync."""
    out = SampledTokens(token_ids, len(rows))
    if raw is None:
        return out
    out.logprob_rows, out.logprob_ks = idx, [rows[i].params.logprobs or 0 for i in idx]
    out.sampled_logprobs = raw.gather(1, _take(token_ids, idx).unsqueeze(1)).squeeze(1)  # [len(idx)]
    out.top_logprobs, out.top_ids = raw.topk(max(out.logprob_ks), dim=-1)  # [len(idx), max k], best first
    return out
