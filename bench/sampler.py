"""Sampler micro-benchmark: the batched Sampler against the per-row one it replaced, side by side in one run.

Random logits, batch 32/128/256 x vocab 32768/49152, three mixes of requests:
  greedy     every row temperature 0, nothing else: the greedy fast path
  mixed      half greedy; a quarter seeded (top_p 0.9), a quarter unseeded (top_k 50); every 8th row with logit_bias,
             every 16th with logprobs=5
  penalties  every row sampled (temperature 0.8, top_p 0.95) with repetition, presence and frequency penalties
Each row's sequence holds a 256-token prompt and 64 output tokens. One JSON line per case: milliseconds of one call
for each side, wall and process CPU time (each the best of --repeats, the two sides alternating so both see the same
load; CPU time is the steadier figure on a shared machine), their ratios, and whether greedy and seeded rows gave the
same tokens on both sides.

    python -m bench.sampler --out bench/results/sampler-cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from bench.common import describe_device, emit, set_threads, synchronize, versions
from engine.sampler import Sampler, SamplerOutput, SampleRow
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

MODES = ("greedy", "mixed", "penalties")
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 64


class PerRowSampler:
    """The sampler before batching (kept here only for comparison): one set of tensor ops per row."""

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        raw = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
        for i, row in enumerate(rows):
            self._process(logits[i], row)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if greedy:
            token_ids[greedy] = logits[greedy].argmax(dim=-1)
        if sampled:
            token_ids[sampled] = self._sample(logits[sampled], [rows[i] for i in sampled])
        ids = token_ids.tolist()
        logprobs: list = [None] * len(rows)
        for i, row in enumerate(rows):
            if raw is not None and row.params.logprobs is not None:
                top_values, top_ids = raw[i].topk(row.params.logprobs)
                logprobs[i] = (float(raw[i, ids[i]]), top_ids.tolist(), top_values.tolist())
        return SamplerOutput(ids, logprobs)

    def _process(self, logits: torch.Tensor, row: SampleRow) -> None:
        p, vocab = row.params, logits.shape[0]
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < vocab], dtype=torch.long)
            logits.index_add_(0, ids, torch.tensor([p.logit_bias[t] for t in p.logit_bias if t < vocab]))
        if row.seq.num_output_tokens < p.min_tokens and row.stop_ids:
            logits[[t for t in row.stop_ids if t < vocab]] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.seq.token_ids)), dtype=torch.long)
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.seq.num_output_tokens:
            out = torch.tensor(row.seq.output_token_ids, dtype=torch.long)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        logits = logits / torch.tensor([r.params.temperature for r in rows]).unsqueeze(1)
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
            vocab = logits.shape[1]
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ks = torch.tensor([min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in rows]).unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(torch.arange(vocab).unsqueeze(0) >= ks, float("-inf"))
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = (probs.cumsum(dim=-1) - probs) >= torch.tensor([r.params.top_p for r in rows]).unsqueeze(1)
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            noise[i].exponential_(generator=row.generator)
        return (probs / noise).argmax(dim=-1)


def make_params(mode: str, i: int) -> SamplingParams:
    if mode == "greedy":
        return SamplingParams(temperature=0.0)
    if mode == "penalties":
        return SamplingParams(
            temperature=0.8, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3, seed=i
        )
    bias = {i: 2.0, i + 1: -3.0} if i % 8 == 0 else None
    logprobs = 5 if i % 16 == 0 else None
    if i % 2 == 0:
        return SamplingParams(temperature=0.0, logit_bias=bias, logprobs=logprobs)
    if i % 4 == 1:
        return SamplingParams(temperature=0.8, top_p=0.9, seed=i, logit_bias=bias, logprobs=logprobs)
    return SamplingParams(temperature=0.8, top_k=50, logit_bias=bias, logprobs=logprobs)


def make_rows(mode: str, batch: int, vocab: int, *, with_unseeded_generators: bool) -> list[SampleRow]:
    """The engine's rows: every row had a generator before; now only seeded ones (the rest share the sampler's)."""
    rng = random.Random(batch * vocab)
    rows = []
    for i in range(batch):
        params = make_params(mode, i)
        token_ids = [rng.randrange(vocab) for _ in range(PROMPT_TOKENS + OUTPUT_TOKENS)]
        seq = Sequence(f"r{i}", 0, token_ids, PROMPT_TOKENS, arrival_s=0.0)
        has_generator = params.seed is not None or with_unseeded_generators
        generator = torch.Generator().manual_seed(params.seed or i) if has_generator else None
        rows.append(SampleRow(params, generator, seq, frozenset({2})))
    return rows


def timed_call(sampler: object, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[float, float, list[int]]:
    """Wall and process-CPU milliseconds of one call on a fresh copy of the logits, and its tokens."""
    values = logits.clone()
    synchronize(values.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    out = sampler(values, rows)  # type: ignore[operator]
    synchronize(values.device)
    return (time.perf_counter() - start) * 1000, (time.process_time() - start_cpu) * 1000, out.token_ids


def run_case(mode: str, batch: int, vocab: int, repeats: int, device: torch.device) -> dict:
    """Calls alternate between the two sides (so both see the same load); the best time of each counts."""
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(vocab + batch)).to(device) * 3
    per_row, batched = PerRowSampler(), Sampler()
    old: list[tuple[float, float]] = []
    new: list[tuple[float, float]] = []
    old_ids = new_ids = []
    for _ in range(repeats + 1):  # the first round warms up
        *times, old_ids = timed_call(per_row, logits, make_rows(mode, batch, vocab, with_unseeded_generators=True))
        old.append((times[0], times[1]))
        *times, new_ids = timed_call(batched, logits, make_rows(mode, batch, vocab, with_unseeded_generators=False))
        new.append((times[0], times[1]))
    old_ms, old_cpu_ms = (min(t[k] for t in old[1:]) for k in (0, 1))
    new_ms, new_cpu_ms = (min(t[k] for t in new[1:]) for k in (0, 1))
    params = [make_params(mode, i) for i in range(batch)]
    comparable = [i for i, p in enumerate(params) if p.is_greedy or p.seed is not None]
    return {
        "bench": "sampler",
        "mode": mode,
        "batch": batch,
        "vocab": vocab,
        "per_row_ms": round(old_ms, 3),
        "batched_ms": round(new_ms, 3),
        "speedup": round(old_ms / new_ms, 2),
        "per_row_cpu_ms": round(old_cpu_ms, 3),
        "batched_cpu_ms": round(new_cpu_ms, 3),
        "cpu_speedup": round(old_cpu_ms / new_cpu_ms, 2),
        "same_greedy_and_seeded_tokens": all(old_ids[i] == new_ids[i] for i in comparable),
        "repeats": repeats,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "device": describe_device(device),
        **versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="32,128,256")
    parser.add_argument("--vocabs", default="32768,49152")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side and case (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        set_threads()
    device = torch.device("cpu")  # the per-row reference builds its index tensors on the CPU
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for mode in args.modes.split(","):
                emit(run_case(mode, batch, vocab, args.repeats, device), args.out)


if __name__ == "__main__":
    main()
