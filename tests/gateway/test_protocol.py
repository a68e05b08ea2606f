"""Protocol models: parsing, accepted no-op values of unsupported fields, request -> SamplingParams."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.replies import DeltaMessage, public_finish_reason
from gateway.settings import Settings

USER = [{"role": "user", "content": "hi"}]


def test_completion_prompt_forms() -> None:
    def prompts(prompt: object) -> object:
        return CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompts()

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts([[1], [2]]) == [[1], [2]]
    with pytest.raises(ValidationError):
        prompts([["a"]])


def test_defaults_map_to_sampling_params() -> None:
    params = CompletionRequest.model_validate({"model": "m", "prompt": "a"}).sampling_params(None)
    assert (params.max_tokens, params.temperature, params.top_p, params.n, params.logprobs) == (16, 1.0, 1.0, 1, None)
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "max_tokens": 5, "max_completion_tokens": 7})
    assert chat.sampling_params(None).max_tokens == 7
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 3})
    assert chat.sampling_params(None).logprobs == 3


def test_null_sampling_fields_mean_defaults() -> None:
    body = {"model": "m", "messages": USER, "temperature": None, "top_p": None, "stop": None, "seed": None}
    params = ChatCompletionRequest.model_validate(body).sampling_params(None)
    assert (params.temperature, params.top_p, params.stop_strings, params.seed) == (1.0, 1.0, (), None)


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_choice": "none"},
        {"tools": []},
        {"response_format": {"type": "text"}},
        {"store": False},
        {"modalities": ["text"]},
        {"parallel_tool_calls": None},
    ],
)
def test_unsupported_fields_accept_their_no_op_values(extra: dict) -> None:
    ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **extra}).check(Settings())


def test_best_of_equal_to_n_is_fine() -> None:
    CompletionRequest.model_validate({"model": "m", "prompt": "a", "n": 2, "best_of": 2}).check(Settings())
    with pytest.raises(APIError) as caught:
        CompletionRequest.model_validate({"model": "m", "prompt": "a", "best_of": 3}).check(Settings())
    assert caught.value.param == "best_of"


def test_strict_types() -> None:
    for bad in ({"n": "2"}, {"stream": "yes"}, {"max_tokens": 1.5}, {"seed": True}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate_json(__import__("json").dumps({"model": "m", "prompt": "a", **bad}))


def test_delta_omits_unset_fields_and_finish_reasons_are_openai_values() -> None:
    assert DeltaMessage(content="x").model_dump() == {"content": "x"}
    assert DeltaMessage(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}
    assert [public_finish_reason(r) for r in (None, "stop", "length", "abort")] == [None, "stop", "length", "stop"]
