"""What the engine's output-equality tests share: random token prompts, a stop string that the 8th generated token
completes, stepping an engine until a request finishes (also past a step in flight), aborting a request in flight and
reusing its id, a client's view of a finished request, and the check that every KV block went back to the pool."""

from __future__ import annotations

import random

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput, merge_delta

CONVERSATION = [{"role": "user", "content": "Write three sentences about the ocean."}]


def random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(3, 90))] for _ in range(count)]


def stop_completed_by_token_8(llm: LLM) -> tuple[CompletionOutput, int, str]:
    """The free greedy answer to CONVERSATION, where its 7th token's text ends, and a stop string spanning tokens 7 and
    8 (it matches once token 8 is detokenized)."""
    free = llm.chat(CONVERSATION, SamplingParams(max_tokens=40, temperature=0.0))[0].outputs[0]
    pieces = [llm.tokenizer.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    boundary = len(pieces[6])
    stop = free.text[boundary - 2 : boundary + 2]
    assert len(pieces[7]) >= boundary + 2 and free.text.index(stop) == boundary - 2
    return free, boundary, stop


def step_until_finished(engine: LLMEngine, max_steps: int = 100) -> RequestOutput:
    """Step an engine serving one request until it finishes (no step may fail) -> the request's deltas merged."""
    outputs: list[RequestOutput] = []
    for _ in range(max_steps):
        step = engine.step()
        assert step.failed == []
        outputs += step.outputs
        if outputs and outputs[-1].finished:
            break
    assert outputs and outputs[-1].finished, f"the request never finished in {max_steps} steps"
    total = RequestOutput(outputs[0].request_id, outputs[0].prompt_token_ids, [])
    for delta in outputs:
        merge_delta(total, delta)
    return total


def finish_past_a_step_in_flight(engine: LLMEngine, params: SamplingParams) -> tuple[RequestOutput, list[str]]:
    """Step CONVERSATION (request "stopped") until a stop string ends it on an engine that launches a step before it
    reads the last one back; the next step collects and drops the step in flight. -> the request's deltas merged, and
    the request id of each sequence in the step that was in flight."""
    engine.add_request("stopped", CONVERSATION, params)
    total = step_until_finished(engine)
    in_flight = engine._in_flight  # launched before the step whose text matched the stop string was read back
    assert in_flight is not None
    in_flight_ids = [seq.request_id for seq in in_flight.batch.seqs]
    assert not engine.has_unfinished  # every sequence of the step in flight is finished
    assert engine.step().outputs == [] and engine._in_flight is None  # collects and drops them
    return total, in_flight_ids


def add_requests_to_abort(
    reference: LLM, engine: LLMEngine, params: SamplingParams
) -> tuple[list[list[int]], list[int], list[int]]:
    """Add requests r0..r3 (random prompts) to `engine`, r1 to be aborted while in flight and its id reused -> the
    reference's token ids for r0..r3, the prompt that reuses r1's id, and the reference's token ids for that prompt."""
    prompts = random_prompts(4, seed=31)
    expected = [r.outputs[0].token_ids for r in reference.generate(prompts, params)]
    reused_prompt = random_prompts(1, seed=32)[0]
    reused_expected = reference.generate(reused_prompt, params)[0].outputs[0].token_ids
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    return expected, reused_prompt, reused_expected


def abort_r1_in_flight_and_reuse_its_id(engine: LLMEngine, reused_prompt: list[int], params: SamplingParams) -> None:
    """r1 is in the step in flight: abort it, and add a new request with the same id at once."""
    in_flight = engine._in_flight
    assert in_flight is not None and "r1" in {seq.request_id for seq in in_flight.batch.seqs}
    engine.abort("r1")
    engine.add_request("r1", reused_prompt, params)  # the old r1's work in flight is not the new one's


def client_view(result: RequestOutput, with_cached_tokens: bool = False) -> tuple:
    """Everything a client sees of a finished request (with the prefix-cache hits in usage when asked)."""
    choices = [
        (
            c.index,
            c.text,
            c.token_ids,
            c.finish_reason,
            c.stop_reason,
            [(e.sampled.token_id, round(e.sampled.logprob, 4), [t.token_id for t in e.top]) for e in c.logprobs or []],
        )
        for c in result.outputs
    ]
    usage = result.usage
    assert usage is not None
    counts = (usage.prompt_tokens, usage.completion_tokens) + ((usage.cached_tokens,) if with_cached_tokens else ())
    prompt_logprobs = [(e.sampled.token_id, round(e.sampled.logprob, 4)) if e else None for e in result.prompt_logprobs or []]
    return choices, counts, prompt_logprobs


def assert_all_blocks_free(engine: LLMEngine) -> None:
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(count == 0 for count in manager.ref_counts)
