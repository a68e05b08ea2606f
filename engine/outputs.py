"""What the engine hands back: RequestOutput deltas (streaming) or totals (offline LLM), and EngineStats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    token_id: int
    token: str  # the text of this token alone
    logprob: float


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob of one sampled token and the `k` most likely alternatives at that position."""

    sampled: Logprob
    top: list[Logprob]


@dataclass(slots=True)
class CompletionOutput:
    """One choice. In a streamed delta, text/token_ids/logprobs hold only what is new."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"; set once, on the last delta
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class RequestOutput:
    """A delta for one request: the choices that changed since the last one.

    `usage` and `queue_s` are set on the final delta (`finished` true) only; `prompt_logprobs` (when asked) on the
    first, one entry per prompt token, the first None (nothing precedes it).
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    usage: Usage | None = None
    queue_s: float | None = None  # seconds from arrival to first scheduled
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of the engine; counters are totals since start."""

    is_alive: bool
    error: str | None
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    kv_cache_usage: float  # 0..1, blocks in use by live sequences
    num_prompt_tokens: int
    num_generation_tokens: int
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    max_loras: int = 0  # LoRA adapter slots; 0: LoRA off
    running_lora_adapters: tuple[str, ...] = ()  # adapters of running requests, and of waiting ones (sorted names)
    waiting_lora_adapters: tuple[str, ...] = ()


def merge_delta(total: RequestOutput, delta: RequestOutput) -> None:
    """Fold a later delta of the same request into `total`, in place; choices stay in index order.

    Used to accumulate a whole result (offline LLM) and to join deltas that queued up while a stream's reader was busy.
    """
    for part in delta.outputs:
        position = 0
        while position < len(total.outputs) and total.outputs[position].index < part.index:
            position += 1
        if position == len(total.outputs) or total.outputs[position].index != part.index:
            total.outputs.insert(position, CompletionOutput(part.index))
        choice = total.outputs[position]
        choice.text += part.text
        choice.token_ids.extend(part.token_ids)
        if part.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + part.logprobs
        if part.finish_reason:
            choice.finish_reason, choice.stop_reason = part.finish_reason, part.stop_reason
    total.prompt_logprobs = total.prompt_logprobs or delta.prompt_logprobs  # only ever on a request's first delta
    if delta.finished:
        total.finished, total.usage, total.queue_s = True, delta.usage, delta.queue_s
