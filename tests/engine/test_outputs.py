"""merge_delta (joining deltas of one request) and AsyncEngine's use of it: a reader that falls behind catches up in one delta."""

from __future__ import annotations

import asyncio
import pathlib
import time

from engine import AsyncEngine, EngineConfig, SamplingParams
from engine.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs, Usage, merge_delta


def _logprobs(token_id: int) -> list[TokenLogprobs]:
    return [TokenLogprobs(Logprob(token_id, f"<{token_id}>", -1.0), [])]


def test_merge_joins_each_choice_by_index_and_keeps_index_order() -> None:
    total = RequestOutput("r", [1, 2], [CompletionOutput(1, "b", [11], _logprobs(11))])
    later = [CompletionOutput(0, "a", [10]), CompletionOutput(1, "c", [12], _logprobs(12))]
    merge_delta(total, RequestOutput("r", [1, 2], later))
    assert [choice.index for choice in total.outputs] == [0, 1]
    assert (total.outputs[0].text, total.outputs[0].token_ids, total.outputs[0].logprobs) == ("a", [10], None)
    assert (total.outputs[1].text, total.outputs[1].token_ids) == ("bc", [11, 12])
    assert [entry.sampled.token_id for entry in total.outputs[1].logprobs or []] == [11, 12]
    assert not total.finished and total.usage is None


def test_merge_takes_finish_reason_usage_and_queue_time_from_the_last_delta() -> None:
    total = RequestOutput("r", [1], [CompletionOutput(0, "a", [10])])
    usage = Usage(1, 2, cached_tokens=0)
    last = CompletionOutput(0, "", [], finish_reason="stop", stop_reason="END")
    merge_delta(total, RequestOutput("r", [1], [last], finished=True, usage=usage, queue_s=0.5))
    choice = total.outputs[0]
    assert (choice.text, choice.finish_reason, choice.stop_reason) == ("a", "stop", "END")
    assert total.finished and total.usage == usage and total.queue_s == 0.5


def test_a_reader_that_falls_behind_gets_the_queued_tokens_in_one_delta(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    engine = AsyncEngine(EngineConfig(model=str(tiny_mistral_sliding_dir)))
    engine.start()
    num_tokens = 12

    async def read_late() -> list[RequestOutput]:
        stream = engine.generate("late", [100, 200, 300], SamplingParams(max_tokens=num_tokens, ignore_eos=True))
        first = await anext(stream)  # the request is running; now stop reading until the engine is done with it
        deadline_s = time.monotonic() + 60
        while engine.stats().num_running or engine.stats().num_waiting:
            assert time.monotonic() < deadline_s, f"the request did not finish: {engine.stats()}"
            await asyncio.sleep(0.01)
        # The loop thread hands a step's deltas to this loop (call_soon_threadsafe) before it publishes the stats that
        # said "done", so they are queued ahead of this task's next turn: one yield lets them land.
        await asyncio.sleep(0)
        return [first] + [delta async for delta in stream]

    try:
        deltas = asyncio.run(read_late())
    finally:
        engine.shutdown()
    # Without joining there would be one delta per token; the first read may already have joined some
    assert len(deltas) <= 2 and len(deltas[-1].outputs[0].token_ids) > 1, [len(d.outputs[0].token_ids) for d in deltas]
    assert sum(len(delta.outputs[0].token_ids) for delta in deltas) == num_tokens
    assert deltas[-1].finished and deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == num_tokens
    assert deltas[-1].outputs[0].finish_reason == "length"
