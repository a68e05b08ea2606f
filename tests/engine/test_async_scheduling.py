"""Look-ahead scheduling (EngineConfig.async_scheduling): step N+1 is launched on step N's sampled tokens before N is
read back. Compared with it off: the same outputs, counters and freed blocks, also when a stop token, a stop string, an
abort or a length limit ends a choice whose next step is already in flight, under preemption, with the prefix cache,
in steps that fall back to the usual order (structured outputs, penalties, n > 1, prompt logprobs), and when a step
fails."""

from __future__ import annotations

import json
import pathlib

import pytest

from engine import LLM, SamplingParams, StructuredOutputs
from engine.config import ConfigError, EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_runner import InFlight
from engine.outputs import RequestOutput, merge_delta
from engine.sequence import PENDING_TOKEN_ID
from tests.engine.output_helpers import (
    CONVERSATION,
    abort_r1_in_flight_and_reuse_its_id,
    add_requests_to_abort,
    assert_all_blocks_free,
    client_view,
    finish_past_a_step_in_flight,
    random_prompts,
    stop_completed_by_token_8,
)

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_pair(tiny_mistral_sliding_dir: pathlib.Path) -> tuple[LLM, LLM]:
    """(look-ahead off, on), small steps so that prefill is chunked; off keeps async output, so only the order differs."""
    return tuple(  # type: ignore[return-value]
        LLM(model=str(tiny_mistral_sliding_dir), max_num_batched_tokens=64, async_output=True, async_scheduling=is_on)
        for is_on in (False, True)
    )


@pytest.fixture(scope="module")
def smol_pair(embedded_model_dir: pathlib.Path) -> tuple[LLM, LLM]:
    return tuple(  # type: ignore[return-value]
        LLM(model=str(embedded_model_dir), async_output=True, async_scheduling=is_on) for is_on in (False, True)
    )


def _view(result: RequestOutput) -> tuple:
    return client_view(result, with_cached_tokens=True)


def _compare(pair: tuple[LLM, LLM], prompts: list, params: list[SamplingParams]) -> tuple[list[tuple], int]:
    """Generate with look-ahead off and on -> the summaries (asserted equal) and the look-ahead steps taken."""
    off, on = pair
    before = (off.engine.num_generation_tokens, on.engine.num_generation_tokens, on.engine.num_look_ahead_steps)
    expected = [_view(r) for r in off.generate(prompts, params)]
    got = [_view(r) for r in on.generate(prompts, params)]
    assert got == expected
    assert on.engine.num_generation_tokens - before[1] == off.engine.num_generation_tokens - before[0]
    assert_all_blocks_free(on.engine)
    return expected, on.engine.num_look_ahead_steps - before[2]


def _run(engine: LLMEngine, max_steps: int = 300, results: dict[str, RequestOutput] | None = None) -> dict[str, RequestOutput]:
    """Step until nothing is left (at most max_steps) -> the merged output of each request (added to `results`); no
    step may fail."""
    results = {} if results is None else results
    for _ in range(max_steps):
        if not engine.has_unfinished:
            break
        step = engine.step()
        assert step.failed == []
        _merge(results, step.outputs)
    return results


def _merge(results: dict[str, RequestOutput], deltas: list[RequestOutput]) -> None:
    for delta in deltas:
        if delta.request_id not in results:
            results[delta.request_id] = RequestOutput(delta.request_id, delta.prompt_token_ids, [])
        merge_delta(results[delta.request_id], delta)


def test_config() -> None:
    assert EngineConfig().async_scheduling is False  # off until a GPU run measures it
    with pytest.raises(ConfigError, match="async_scheduling needs async_output") as info:
        EngineConfig(async_scheduling=True, async_output=False)
    assert info.value.field == "async_scheduling"


def test_greedy_seeded_logprobs_stop_ids_and_lengths_equal_it_off(tiny_pair: tuple[LLM, LLM]) -> None:
    prompts = random_prompts(12, seed=21)
    kinds = [
        SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=2, temperature=1.0, seed=3, logprobs=1, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, min_tokens=4, logit_bias={7: 2.0, 300: -5.0}),
    ]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    off = tiny_pair[0]
    # A stop id that a greedy output hits early: that choice finishes while its next step is in flight.
    free = off.generate(prompts[6], params[6])[0].outputs[0].token_ids
    params[6] = SamplingParams(max_tokens=17, temperature=0.0, stop_token_ids=[free[4]], ignore_eos=True)
    expected, num_look_ahead = _compare(tiny_pair, prompts, params)
    assert num_look_ahead > 0
    assert expected[6][0][0][3] == "stop" and len(expected[6][0][0][2]) == 5
    for summary, p in zip(expected, params, strict=True):  # max_tokens exact: nothing past the limit was kept
        if p.ignore_eos and not p.stop_token_ids:
            assert len(summary[0][0][2]) == p.max_tokens and summary[0][0][3] == "length"


def test_context_length_limit_is_exact(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    """max_model_len ends choices by length exactly, and no look-ahead step runs a token past it."""
    prompts = random_prompts(6, seed=23)
    llm = LLM(model=str(tiny_mistral_sliding_dir), max_model_len=100, num_kv_blocks=40, async_scheduling=True)
    results = llm.generate(prompts, SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
    assert llm.engine.num_look_ahead_steps > 0
    for prompt, result in zip(prompts, results, strict=True):
        assert len(prompt) + len(result.outputs[0].token_ids) == 100 and result.outputs[0].finish_reason == "length"
        assert PENDING_TOKEN_ID not in result.outputs[0].token_ids
    off = LLM(model=str(tiny_mistral_sliding_dir), max_model_len=100, num_kv_blocks=40)
    assert [
        r.outputs[0].token_ids for r in off.generate(prompts, SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
    ] == [r.outputs[0].token_ids for r in results]
    assert_all_blocks_free(llm.engine)


def test_fallback_steps_with_structured_penalised_n_and_scoring_requests(tiny_pair: tuple[LLM, LLM]) -> None:
    """Requests that need each token on the host mixed with plain ones: those steps run in the usual order, and the
    steps after they finish look ahead again."""
    person = StructuredOutputs(
        json=json.dumps({"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]})
    )
    prompts = random_prompts(10, seed=25)
    params = [
        SamplingParams(max_tokens=30, temperature=1.0, seed=5, structured_outputs=person),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=10, temperature=0.9, seed=8, n=2, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.7, ignore_eos=True),
    ] + [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)] * 5
    expected, num_look_ahead = _compare(tiny_pair, prompts, params)
    assert num_look_ahead > 0  # the plain requests outlive the others
    json.loads(expected[0][0][0][1])  # the grammar still held


def test_stop_string_ends_a_choice_whose_next_step_is_in_flight(smol_pair: tuple[LLM, LLM]) -> None:
    off, on = smol_pair
    free, _, stop = stop_completed_by_token_8(off)
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=[stop], logprobs=2)
    expected = off.chat(CONVERSATION, params)[0]

    engine = on.engine
    generated_before = engine.num_generation_tokens
    total, in_flight_ids = finish_past_a_step_in_flight(engine, params)
    assert in_flight_ids == ["stopped"]

    got, want = _view(total), _view(expected)
    assert (got[0], got[1][:2]) == (want[0], want[1][:2])  # the prefix cache's hits differ: `off` saw the prompt twice
    assert total.outputs[0].token_ids == free.token_ids[:8]
    assert engine.num_generation_tokens - generated_before == 8
    assert_all_blocks_free(engine)


def test_abort_while_steps_are_in_flight_and_reuse_of_its_id(tiny_pair: tuple[LLM, LLM]) -> None:
    off, on = tiny_pair
    engine = on.engine
    expected, reused_prompt, reused_expected = add_requests_to_abort(off, engine, GREEDY)
    first = _run(engine, max_steps=4)
    abort_r1_in_flight_and_reuse_its_id(engine, reused_prompt, GREEDY)  # with steps in flight
    old_r1 = first.pop("r1", None)
    results = _run(engine, results=first)
    assert not engine.has_unfinished, "the engine never drained"
    assert results["r1"].outputs[0].token_ids == reused_expected
    assert old_r1 is None or old_r1.outputs[0].token_ids == expected[1][: len(old_r1.outputs[0].token_ids)]
    assert [results[f"r{i}"].outputs[0].token_ids for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert engine.num_look_ahead_steps > 0
    assert_all_blocks_free(engine)


def test_preemption_under_a_tiny_kv_cache(tiny_mistral_sliding_dir: pathlib.Path, tiny_pair: tuple[LLM, LLM]) -> None:
    """Preempted sequences may hold a token still in flight: they are readmitted only once it is real."""
    prompts = random_prompts(16, seed=33)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)
    expected = [_view(r) for r in tiny_pair[0].generate(prompts, params)]
    small = LLM(model=str(tiny_mistral_sliding_dir), num_kv_blocks=24, max_num_batched_tokens=256, async_scheduling=True)
    got = [_view(r) for r in small.generate(prompts, params)]
    assert small.engine.scheduler.num_preemptions > 0 and small.engine.num_look_ahead_steps > 0
    assert [g[:1] for g in got] == [e[:1] for e in expected]  # cached token counts differ with the cache size
    assert_all_blocks_free(small.engine)


def test_prefix_cache_hits_equal_it_off(tiny_pair: tuple[LLM, LLM]) -> None:
    prefix = random_prompts(1, seed=35)[0] * 3
    hits = []
    for llm in tiny_pair:
        before = llm.engine.stats().prefix_cache_hits
        first = llm.generate([*prefix, 11, 12, 13], GREEDY)[0]
        second = llm.generate([*prefix, 21, 22], GREEDY)[0]
        third = llm.generate([*prefix, 11, 12, 13, *first.outputs[0].token_ids[:-1], 5], GREEDY)[0]  # past the output
        hits.append((llm.engine.stats().prefix_cache_hits - before, [_view(r) for r in (first, second, third)]))
    assert hits[1] == hits[0] and hits[0][0] >= 2 * (len(prefix) // 16) * 16


class _FailingResult:
    """A launched step whose result() raises, as a device error would."""

    def __init__(self, handle: InFlight, exc: Exception) -> None:
        self.handle, self.exc = handle, exc
        self.token_ids = handle.token_ids  # the next step still reads its tokens on the device

    def result(self) -> None:
        self.handle.result()
        raise self.exc


def test_a_failed_step_fails_its_batch_only(tiny_pair: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch) -> None:
    """Step N+1 fails when read back, after step N+2 was launched on its tokens: N+1's requests fail, N+2's results for
    them are dropped, and a request that joined in N+2 goes on."""
    off, on = tiny_pair
    engine = on.engine
    prompt, later_prompt = random_prompts(2, seed=41)
    expected = off.generate(later_prompt, GREEDY)[0].outputs[0].token_ids
    real_launch = engine.runner.launch
    for i in range(2):
        engine.add_request(f"ok-{i}", prompt, GREEDY)
    for _ in range(3):
        assert engine.step().failed == []
    num_failing = [1]

    def launch_failing_once(*args: object) -> object:
        handle = real_launch(*args)  # type: ignore[arg-type]
        if num_failing[0] == 0:
            return handle
        num_failing[0] -= 1
        return _FailingResult(handle, RuntimeError("device fault"))

    monkeypatch.setattr(engine.runner, "launch", launch_failing_once)
    engine.add_request("doomed", prompt, GREEDY)
    assert engine.step().failed == []  # launches the failing step, reads back the one before
    engine.add_request("later", later_prompt, GREEDY)
    failed = engine.step().failed  # launches the next step (with "later"), then reads back the failing one
    assert sorted(request_id for request_id, _ in failed) == ["doomed", "ok-0", "ok-1"]
    assert all("device fault" in str(exc) for _, exc in failed)
    results = _run(engine)
    assert not engine.has_unfinished, "the engine never drained"
    assert list(results) == ["later"] and results["later"].outputs[0].token_ids == expected
    assert on.generate(prompt, GREEDY)[0].outputs[0].token_ids == off.generate(prompt, GREEDY)[0].outputs[0].token_ids
    assert_all_blocks_free(engine)
