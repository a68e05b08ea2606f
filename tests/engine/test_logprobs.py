"""Logprobs: prompt logprobs against transformers (chunked prefill, prefix cache, n, preemption), scoring without
generating (max_tokens 0), and sampled-token entries that describe exactly the returned text."""

from __future__ import annotations

import pathlib
import random

import pytest
import torch

from engine import LLM, Logprob, SamplingParams, TokenLogprobs
from engine.logprobs import HeldLogprobs
from tests.engine.model_helpers import hf_logits


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(length)]


@pytest.fixture(scope="module")
def chunked(tiny_mistral_dir: pathlib.Path) -> LLM:
    """Prefill in 16-token chunks (a 70-token prompt takes five steps), prefix caching on."""
    return LLM(model=str(tiny_mistral_dir), max_num_batched_tokens=16, max_num_seqs=4)


def _assert_matches_transformers(entries: list[TokenLogprobs | None] | None, expected: torch.Tensor, prompt: list[int]) -> None:
    """expected: transformers' log-softmax [len(prompt), vocab]; row p predicts token p + 1."""
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        assert entry is not None and entry.sampled.token_id == prompt[position]
        assert entry.sampled.logprob == pytest.approx(float(expected[position - 1, prompt[position]]), abs=1e-4)
        top_values, top_ids = expected[position - 1].topk(3)
        assert [item.token_id for item in entry.top] == top_ids.tolist()
        assert [item.logprob for item in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_prompt_logprobs_match_transformers_through_chunks_and_the_prefix_cache(
    chunked: LLM, tiny_mistral_dir: pathlib.Path
) -> None:
    prompt = _prompt(70, seed=1)
    expected = torch.log_softmax(hf_logits(tiny_mistral_dir, prompt), dim=-1)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    first = chunked.generate(prompt, params)[0]
    _assert_matches_transformers(first.prompt_logprobs, expected, prompt)
    # The prompt's blocks are cached now; a scoring request must still run (and score) every position.
    hits_before = chunked.engine.stats().prefix_cache_hits
    again = chunked.generate(prompt, params)[0]
    assert chunked.engine.stats().prefix_cache_hits == hits_before
    _assert_matches_transformers(again.prompt_logprobs, expected, prompt)
    # ... while a request that does not score reuses them, and generates the same tokens.
    plain = chunked.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))[0]
    assert plain.prompt_logprobs is None and plain.usage is not None and plain.usage.cached_tokens >= 64
    assert plain.outputs[0].token_ids == first.outputs[0].token_ids == again.outputs[0].token_ids


def test_scoring_only_generates_nothing(chunked: LLM, tiny_mistral_dir: pathlib.Path) -> None:
    prompts = [_prompt(40, seed=2), _prompt(9, seed=3)]
    params = SamplingParams(max_tokens=0, prompt_logprobs=3, n=2)  # n: every choice is empty, the scores come once
    results = chunked.generate(prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        _assert_matches_transformers(result.prompt_logprobs, torch.log_softmax(hf_logits(tiny_mistral_dir, prompt), -1), prompt)
        assert [(c.text, c.token_ids, c.finish_reason) for c in result.outputs] == [("", [], "length")] * 2
        assert result.usage is not None and (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt), 0)
    assert chunked.engine.block_manager.num_free_blocks == chunked.engine.block_manager.num_blocks


@pytest.mark.parametrize("async_output", [False, True], ids=["sync_output", "async_output"])
def test_prompt_logprobs_survive_preemption(tiny_mistral_dir: pathlib.Path, async_output: bool) -> None:
    """Few blocks: long prompts preempt each other mid-prefill; the recomputed chunks give the same scores."""
    small = LLM(model=str(tiny_mistral_dir), num_kv_blocks=12, max_num_batched_tokens=32, async_output=async_output)
    prompts = [_prompt(80, seed=10 + i) for i in range(3)]
    results = small.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
    assert small.engine.scheduler.num_preemptions > 0
    for prompt, result in zip(prompts, results, strict=True):
        expected = torch.log_softmax(hf_logits(tiny_mistral_dir, prompt), dim=-1)
        entries = result.prompt_logprobs
        assert entries is not None and entries[0] is None and all(e is not None and e.top == [] for e in entries[1:])
        got = [e.sampled.logprob for e in entries[1:] if e is not None]
        assert got == pytest.approx([float(expected[p - 1, prompt[p]]) for p in range(1, len(prompt))], abs=1e-4)


def test_a_stop_token_gets_no_logprobs_entry(chunked: LLM) -> None:
    prompt = _prompt(12, seed=4)
    free = chunked.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2))[0].outputs[0]
    # The last token that first appears after index 0 becomes the stop token.
    k = max(i for i in range(1, 6) if free.token_ids[i] not in free.token_ids[:i])
    stop_id = free.token_ids[k]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2, stop_token_ids=[stop_id])
    stopped = chunked.generate(prompt, params)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    assert stopped.token_ids == free.token_ids[: k + 1]  # the stop token is reported among the ids ...
    assert stopped.logprobs is not None and [e.sampled.token_id for e in stopped.logprobs] == free.token_ids[:k]  # ... not here


def _entry(token: str) -> TokenLogprobs:
    return TokenLogprobs(Logprob(0, token, -1.0), [])


def test_held_entries_follow_the_returned_text() -> None:
    held = HeldLogprobs()
    held.add(_entry(" Hel"), " Hel")
    assert held.release("", is_finished=False, is_cut=False) == []  # " Hel" is held back (it may start a stop string)
    held.add(_entry("lo"), "lo")
    assert [e.sampled.token for e in held.release(" Hello", is_finished=False, is_cut=False)] == [" Hel", "lo"]
    held.add(_entry(" wor"), " wor")
    held.add(_entry("ld"), "ld")
    held.add(_entry("!"), "!")
    # The stop string "rld!" matched: " wo" was returned, so " wor" (straddling the cut) keeps its entry; the rest goes.
    assert [e.sampled.token for e in held.release(" wo", is_finished=True, is_cut=True)] == [" wor"]


def test_held_entries_all_go_out_at_a_plain_finish() -> None:
    held = HeldLogprobs()
    held.add(_entry("\ufffd"), "")  # half a character: no text yet
    held.add(_entry("\ufffd"), "é")
    assert len(held.release("", is_finished=False, is_cut=False)) == 1
    assert len(held.release("é", is_finished=True, is_cut=False)) == 1
