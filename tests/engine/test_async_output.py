"""Async output (EngineConfig.async_output): the slow postprocess of step N-1 runs after step N is launched. Forced on
here (the CPU default is off) and compared with it off: the same outputs, counters and freed blocks, also when a stop
string or an abort ends a choice whose next token is already in flight, and when a launched step fails."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from engine.errors import RankFailedError
from engine.model_runner import InFlight
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


@pytest.fixture(scope="module")
def tiny_pair(tiny_mistral_sliding_dir: pathlib.Path) -> tuple[LLM, LLM]:
    """(async output off, async output on), small steps so that prefill is chunked."""
    return tuple(  # type: ignore[return-value]
        LLM(model=str(tiny_mistral_sliding_dir), max_num_batched_tokens=64, async_output=is_async) for is_async in (False, True)
    )


@pytest.fixture(scope="module")
def smol_pair(embedded_model_dir: pathlib.Path) -> tuple[LLM, LLM]:
    return tuple(LLM(model=str(embedded_model_dir), async_output=is_async) for is_async in (False, True))  # type: ignore[return-value]


def test_defaults_follow_the_device(tiny_pair: tuple[LLM, LLM], tiny_mistral_sliding_dir: pathlib.Path) -> None:
    sync, forced = tiny_pair
    assert (sync.engine.is_async_output, forced.engine.is_async_output) == (False, True)
    assert LLM(model=str(tiny_mistral_sliding_dir)).engine.is_async_output is False  # CPU: nothing to overlap with


def test_mixed_workload_is_the_same_with_and_without_async_output(tiny_pair: tuple[LLM, LLM]) -> None:
    """Greedy, penalised, seeded, n > 1, logprobs, prompt logprobs, stop ids and lengths in one batch."""
    prompts = random_prompts(12, seed=21)
    kinds = [
        SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True, presence_penalty=0.5, frequency_penalty=0.7),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, n=3, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=2, ignore_eos=True),
    ]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    sync, forced = tiny_pair
    # A stop id that some greedy output hits early: that choice finishes while other rows still decode.
    free = sync.generate(prompts[6], params[6])[0].outputs[0].token_ids
    params[6] = SamplingParams(max_tokens=17, temperature=0.0, stop_token_ids=[free[4]], ignore_eos=True)
    before = (sync.engine.num_generation_tokens, forced.engine.num_generation_tokens)
    expected = [client_view(r) for r in sync.generate(prompts, params)]
    got = [client_view(r) for r in forced.generate(prompts, params)]
    assert got == expected
    assert expected[6][0][0][3] == "stop"
    assert forced.engine.num_generation_tokens - before[1] == sync.engine.num_generation_tokens - before[0]
    assert_all_blocks_free(forced.engine)


def test_stop_string_ends_a_choice_whose_next_token_is_in_flight(smol_pair: tuple[LLM, LLM]) -> None:
    sync, forced = smol_pair
    free, boundary, stop = stop_completed_by_token_8(sync)
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=[stop], logprobs=2, n=2)
    expected = sync.chat(CONVERSATION, params)[0]

    engine = forced.engine
    generated_before = engine.num_generation_tokens
    # The step that delivered the stop had already launched the choices' next tokens: they are in flight, to be dropped.
    total, in_flight_ids = finish_past_a_step_in_flight(engine, params)
    assert set(in_flight_ids) == {"stopped"}

    assert client_view(total) == client_view(expected)
    for choice in total.outputs:
        assert choice.text == free.text[: boundary - 2] and (choice.finish_reason, choice.stop_reason) == ("stop", stop)
        assert choice.token_ids == free.token_ids[:8]  # nothing past the token that completed the stop string
        entries = choice.logprobs  # of the tokens whose text was returned, at least in part
        assert entries is not None and [e.sampled.token_id for e in entries] == free.token_ids[: len(entries)]
        assert 1 <= len(entries) <= 7
    assert total.usage is not None and total.usage.completion_tokens == 16
    assert engine.num_generation_tokens - generated_before == 16
    assert_all_blocks_free(engine)


def test_abort_while_a_token_is_in_flight_and_reuse_of_its_id(tiny_pair: tuple[LLM, LLM]) -> None:
    sync, forced = tiny_pair
    engine = forced.engine
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected, reused_prompt, reused_expected = add_requests_to_abort(sync, engine, params)
    tokens: dict[str, list[int]] = {}
    for _ in range(3):
        for output in engine.step().outputs:
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
    abort_r1_in_flight_and_reuse_its_id(engine, reused_prompt, params)  # with a token in flight
    del tokens["r1"]
    for _ in range(200):
        if not engine.has_unfinished:
            break
        step = engine.step()
        assert step.failed == []
        for output in step.outputs:
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
    assert not engine.has_unfinished, "the engine never drained"
    assert tokens == {"r0": expected[0], "r1": reused_expected, "r2": expected[2], "r3": expected[3]}
    assert_all_blocks_free(engine)


class _FailingResult:
    """A launched step whose result() raises, as a device error would."""

    def __init__(self, handle: InFlight, exc: Exception) -> None:
        self.handle, self.exc = handle, exc

    def result(self) -> None:
        self.handle.result()
        raise self.exc


@pytest.mark.parametrize("is_async", [False, True], ids=["sync_output", "async_output"])
def test_a_failed_step_fails_its_batch_only(tiny_pair: tuple[LLM, LLM], is_async: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = tiny_pair[int(is_async)]
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = random_prompts(1, seed=41)[0]
    expected = llm.generate(prompt, params)[0].outputs[0].token_ids
    real_launch = engine.runner.launch
    monkeypatch.setattr(engine.runner, "launch", lambda *args: _FailingResult(real_launch(*args), RuntimeError("device fault")))
    engine.add_request("doomed-0", prompt, params)
    engine.add_request("doomed-1", prompt, params)
    failed: list[tuple[str, Exception]] = []
    for _ in range(3):
        failed += engine.step().failed
        if failed:
            break
    assert sorted(request_id for request_id, _ in failed) == ["doomed-0", "doomed-1"]
    assert all("device fault" in str(exc) for _, exc in failed)
    monkeypatch.setattr(engine.runner, "launch", real_launch)
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == expected  # the engine goes on
    assert_all_blocks_free(engine)

    monkeypatch.setattr(engine.runner, "launch", lambda *args: _FailingResult(real_launch(*args), RankFailedError("rank 1")))
    engine.add_request("fatal", prompt, params)
    with pytest.raises(RankFailedError):
        for _ in range(3):
            engine.step()
    monkeypatch.setattr(engine.runner, "launch", real_launch)
    engine.abort("fatal")  # a real engine stops here; this one serves the module's other tests
    assert not engine.has_unfinished
