"""SamplingParams: how one request is sampled and when it stops. Validated on construction.

Field names and meanings follow vLLM's SamplingParams, so its users feel at home.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.structured import StructuredOutputs

MAX_N = 128
MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: until the context length; 0: only score the prompt (with prompt_logprobs)
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: sampled token plus the top k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob (the first: None) plus the top k
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # constrain the output to a grammar (engine/structured.py)
    lora: str | None = None  # the LoRA adapter (served name) to generate with; None: the base model
    stop_strings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"must be an integer in 1..{MAX_N}")
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
            "max_tokens",
            "must be at least 0",
        )
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens")
        _check(_is_number(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or positive")
        if self.top_k == -1:
            self.top_k = 0
        _check(_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(
            _is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 100.0,
            "repetition_penalty",
            "must be in (0, 100]",
        )
        _check(
            _is_number(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"
        )
        _check(
            _is_number(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            "must be in [-2, 2]",
        )
        if self.logit_bias is not None:
            for token_id, bias in self.logit_bias.items():
                _check(isinstance(token_id, int) and token_id >= 0, "logit_bias", "keys must be token ids >= 0")
                _check(_is_number(bias) and -100.0 <= bias <= 100.0, "logit_bias", "values must be in [-100, 100]")
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        _check(self.lora is None or (isinstance(self.lora, str) and bool(self.lora)), "lora", "must be an adapter name")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stop), "stop", "must be non-empty strings")
        self.stop_strings = tuple(stop)
        ids = self.stop_token_ids or []
        _check(all(isinstance(t, int) and t >= 0 for t in ids), "stop_token_ids", "must be token ids >= 0")
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"must be in 0..{MAX_LOGPROBS}",
        )
        _check(
            self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
            "prompt_logprobs",
            f"must be in 0..{MAX_LOGPROBS}",
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # rejects NaN


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{name} {rule}", param=name)  # a ValueError subclass
