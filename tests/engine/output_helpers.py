"""What the engine's output-equality tests share: random token prompts, a client's view of a finished request, and
the check that every KV block went back to the pool."""

from __future__ import annotations

import random

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput


def random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(3, 90))] for _ in range(count)]


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
