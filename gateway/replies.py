"""Reply and stream-chunk models of /v1/completions and /v1/chat/completions, shaped like OpenAI's; the logprobs formats.

Split from protocol.py (requests) to keep each under one screenful of models; both feed /openapi.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field

from engine import Logprob, TokenLogprobs, Usage

_MIN_LOGPROB = -9999.0  # JSON has no -inf


def _is_none(value: object) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def total(cls, usages: list[Usage]) -> UsageInfo:
        prompt = sum(usage.prompt_tokens for usage in usages)
        completion = sum(usage.completion_tokens for usage in usages)
        cached = sum(usage.cached_tokens for usage in usages)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and also each stream chunk (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=_is_none)  # left out without calls, as OpenAI does


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = Field(None, exclude_if=_is_none)
    arguments: str | None = Field(None, exclude_if=_is_none)


class ToolCallDelta(BaseModel):
    """The first delta of a call has its id, type and name (arguments ""); the next ones add argument text."""

    index: int
    id: str | None = Field(None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(None, exclude_if=_is_none)
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    # Unset fields are left out of the JSON (per field: a model-wide wrap serializer cost ~25% more per stream chunk)
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


_Envelope = TypeVar("_Envelope", CompletionResponse, ChatCompletionResponse, ChatCompletionChunk)


@dataclass(frozen=True)
class ReplyHead:
    """What a whole response and every stream chunk of it share, completion or chat."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    def envelope(self, envelope_type: type[_Envelope], choices: list[Any], usage: UsageInfo | None) -> _Envelope:
        """An `envelope_type` (a whole response or one stream chunk) around `choices`."""
        return envelope_type(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.system_fingerprint,
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sirocco"
    max_model_len: int
    root: str | None = None  # a LoRA adapter's folder
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def public_finish_reason(reason: str | None) -> Literal["stop", "length"] | None:
    """OpenAI's finish reasons: "length" for max_tokens or the context, "stop" for everything else that ends a choice."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def chat_finish_reason(reason: str | None, has_tool_calls: bool) -> FinishReason | None:
    """As public_finish_reason, but "tool_calls" for a choice that ended with calls (not cut by length)."""
    public = public_finish_reason(reason)
    return "tool_calls" if public == "stop" and has_tool_calls else public


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def completion_logprobs(entries: list[TokenLogprobs | None], text_offset: int, first_token: str = "") -> CompletionLogprobs:
    """Completions format: parallel lists; `text_offset` is where the first token starts in the choice's text.

    A None entry is the prompt's first token (echo with logprobs), `first_token`: nothing precedes it, so OpenAI and vLLM
    give it a null logprob and null top_logprobs.
    """
    result = CompletionLogprobs()
    for entry in entries:
        if entry is None:
            result.tokens.append(first_token)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            result.text_offset.append(text_offset)
            text_offset += len(first_token)
            continue
        result.tokens.append(entry.sampled.token)
        result.token_logprobs.append(_logprob(entry.sampled.logprob))
        top = {item.token: _logprob(item.logprob) for item in entry.top}
        top.setdefault(entry.sampled.token, _logprob(entry.sampled.logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(entry.sampled.token)
    return result


def _top(item: Logprob) -> TopLogprob:
    return TopLogprob(token=item.token, logprob=_logprob(item.logprob), bytes=list(item.token.encode("utf-8")))


def chat_logprobs(entries: list[TokenLogprobs]) -> ChatLogprobs:
    """Chat format: one object per token with its bytes and the top alternatives."""
    content = [
        ChatTokenLogprob(**_top(entry.sampled).model_dump(), top_logprobs=[_top(item) for item in entry.top]) for entry in entries
    ]
    return ChatLogprobs(content=content)
