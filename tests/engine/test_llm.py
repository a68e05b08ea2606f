"""The offline LLM API over the batching engine: parity with transformers, batch invariance, preemption, prefix cache,
seeds, n, stop rules, abort. Each test runs with async output off, forced on (the CPU default is off), and with
look-ahead scheduling (async_scheduling, which implies async output)."""

from __future__ import annotations

import pathlib
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


MODES = {
    "sync_output": {"async_output": False},
    "async_output": {"async_output": True},
    "async_scheduling": {"async_scheduling": True},
}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request: pytest.FixtureRequest) -> dict[str, bool]:
    return MODES[request.param]


@pytest.fixture(scope="module")
def smol(embedded_model_dir: pathlib.Path, mode: dict[str, bool]) -> LLM:
    return LLM(model=str(embedded_model_dir), **mode)


@pytest.fixture(scope="module")
def tiny(tiny_mistral_sliding_dir: pathlib.Path, mode: dict[str, bool]) -> LLM:
    return LLM(model=str(tiny_mistral_sliding_dir), **mode)


def _mixed_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(3, 90))] for _ in range(count)]


def test_chat_greedy_equals_transformers_generate(smol: LLM, embedded_model_dir: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer in one short sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Name another one."},
        ],
    ]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    ours = smol.chat(conversations, params)
    hf = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    for conversation, result in zip(conversations, ours, strict=True):
        ids = torch.tensor([result.prompt_token_ids])
        assert (
            result.prompt_token_ids
            == tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))["input_ids"]
        )
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)[
            0, ids.shape[1] :
        ].tolist()
        assert result.outputs[0].token_ids == expected
        assert result.outputs[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in ours[0].outputs[0].text


def test_batch_equals_alone_and_survives_preemption(
    tiny_mistral_sliding_dir: pathlib.Path, tiny: LLM, mode: dict[str, bool]
) -> None:
    prompts = _mixed_prompts(24, seed=0)
    alone = [tiny.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
    batched = tiny.generate(prompts, GREEDY)
    assert [r.outputs[0].token_ids for r in batched] == alone
    # 40 blocks of 16 tokens cannot hold 24 sequences of up to 114 tokens: the scheduler must preempt and recompute.
    small = LLM(model=str(tiny_mistral_sliding_dir), num_kv_blocks=40, max_num_batched_tokens=256, **mode)
    squeezed = small.generate(prompts, GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
    assert (small.engine.num_look_ahead_steps > 0) == mode.get("async_scheduling", False)
    assert [r.outputs[0].token_ids for r in squeezed] == alone
    assert small.engine.block_manager.num_free_blocks == 40


def test_seeded_request_is_the_same_alone_and_in_a_batch(tiny: LLM) -> None:
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = _mixed_prompts(1, seed=5)[0]
    alone = tiny.generate(prompt, seeded)[0].outputs[0].token_ids
    others = _mixed_prompts(16, seed=6)
    unseeded = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    batch = tiny.generate([*others[:8], prompt, *others[8:]], [unseeded] * 8 + [seeded] + [unseeded] * 8)
    assert batch[8].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert tiny.generate(prompt, other_seed)[0].outputs[0].token_ids != alone


def test_shared_prefix_hits_the_cache_and_gives_the_same_output(tiny_mistral_sliding_dir: pathlib.Path, tiny: LLM) -> None:
    prefix = _mixed_prompts(1, seed=7)[0] * 3  # a long shared prefix, many full blocks
    first, second = [*prefix, 11, 12, 13], [*prefix, 21, 22]
    stats = tiny.engine.stats()
    tiny.generate(first, GREEDY)
    cached = tiny.generate(second, GREEDY)[0]
    after = tiny.engine.stats()
    assert after.prefix_cache_hits - stats.prefix_cache_hits >= (len(prefix) // 16) * 16
    assert cached.usage is not None and cached.usage.cached_tokens >= (len(prefix) // 16) * 16
    config = tiny.engine.config
    modes = {"async_output": config.async_output, "async_scheduling": config.async_scheduling}
    uncached_llm = LLM(model=str(tiny_mistral_sliding_dir), enable_prefix_caching=False, **modes)
    uncached = uncached_llm.generate(second, GREEDY)[0]
    assert uncached_llm.engine.stats().prefix_cache_hits == 0
    assert cached.outputs[0].token_ids == uncached.outputs[0].token_ids


def test_n_choices_share_the_prompt_blocks(tiny: LLM) -> None:
    prompt = _mixed_prompts(1, seed=8)[0] * 2
    result = tiny.generate(prompt, SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True))[0]
    assert [c.index for c in result.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in result.outputs)
    assert len({tuple(c.token_ids) for c in result.outputs}) > 1
    assert result.usage is not None and result.usage.completion_tokens == 36
    assert tiny.engine.block_manager.num_free_blocks == tiny.engine.block_manager.num_blocks


def test_abort_mid_generation_returns_every_block(tiny: LLM) -> None:
    engine = tiny.engine
    for i, prompt in enumerate(_mixed_prompts(6, seed=9)):
        engine.add_request(f"abort-{i}", prompt, SamplingParams(max_tokens=200, ignore_eos=True, temperature=0))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for i in range(6):
        engine.abort(f"abort-{i}")
    assert not engine.has_unfinished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(count == 0 for count in engine.block_manager.ref_counts)


def test_stop_string_spanning_tokens_never_leaks(smol: LLM) -> None:
    conversation = [{"role": "user", "content": "Write three sentences about the ocean."}]
    free = smol.chat(conversation, SamplingParams(max_tokens=40, temperature=0.0))[0].outputs[0]
    tokenizer = smol.tokenizer
    pieces = [tokenizer.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    # A stop string made of the end of token 5's text and the start of token 6's.
    boundary = len(pieces[4])
    stop = free.text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and free.text.index(stop) == boundary - 2
    stopped = smol.chat(conversation, SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]))[0].outputs[0]
    assert stopped.text == free.text[: boundary - 2]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)


def test_finish_reasons(smol: LLM) -> None:
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    short = smol.chat(conversation, SamplingParams(max_tokens=3, temperature=0.0))[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    full = smol.chat(conversation, SamplingParams(max_tokens=60, temperature=0.0))[0].outputs[0]
    assert full.finish_reason == "stop" and full.token_ids[-1] in smol.tokenizer.eos_token_ids
    assert "<|im_end|>" not in full.text
    stop_id = full.token_ids[2]
    by_id = smol.chat(conversation, SamplingParams(max_tokens=60, temperature=0.0, stop_token_ids=[stop_id]))[0].outputs[0]
    assert (by_id.finish_reason, by_id.stop_reason, by_id.token_ids) == ("stop", stop_id, full.token_ids[:3])


def test_min_tokens_and_logit_bias(tiny: LLM) -> None:
    prompt = _mixed_prompts(1, seed=10)[0]
    eos = next(iter(tiny.tokenizer.eos_token_ids))
    forced = tiny.generate(prompt, SamplingParams(max_tokens=5, temperature=0.0, logit_bias={eos: 100.0}))[0].outputs[0]
    assert forced.token_ids == [eos] and forced.finish_reason == "stop"
    held = tiny.generate(prompt, SamplingParams(max_tokens=5, temperature=0.0, logit_bias={eos: 100.0}, min_tokens=3))[0].outputs[
        0
    ]
    assert len(held.token_ids) == 4 and held.token_ids[3] == eos and eos not in held.token_ids[:3]


def test_logprobs_are_of_the_model_distribution(tiny: LLM) -> None:
    prompt = _mixed_prompts(1, seed=11)[0]
    result = tiny.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert result.logprobs is not None and len(result.logprobs) == 4
    for token_id, entry in zip(result.token_ids, result.logprobs, strict=True):
        assert entry.sampled.token_id == token_id and len(entry.top) == 3
        assert entry.top[0].token_id == token_id  # greedy picks the most likely token
        assert entry.top[0].logprob >= entry.top[1].logprob >= entry.top[2].logprob
        assert entry.sampled.logprob == pytest.approx(entry.top[0].logprob)
        assert entry.sampled.logprob <= 0.0


def test_prompt_checks(tiny: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="maximum context length") as info:
        tiny.generate([5] * 500, SamplingParams(max_tokens=100))
    assert info.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="token ids must be in") as info:
        tiny.generate([5, 10**9], SamplingParams())
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny.generate([[]], SamplingParams())  # type: ignore[list-item]
