"""Request models of /v1/completions and /v1/chat/completions, their limits, and request -> SamplingParams.

Strict and closed (extra="forbid"): an unknown field is a 400, and OpenAI fields we do not implement are a 400 naming them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine import InvalidRequestError, SamplingParams, StructuredOutputs
from gateway.errors import APIError, bad_request
from gateway.settings import Settings

_UNSUPPORTED = "not supported by this server"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class StructuredOutputsRequest(StrictModel):
    """vLLM's `structured_outputs` extra (what openai users pass in `extra_body`): exactly one constraint."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema (object or text)")
    json_object: bool | None = Field(None, description="Any JSON object")
    regex: str | None = None
    choice: list[str] | None = Field(None, description="One of these strings")
    grammar: str | None = Field(None, description="An EBNF grammar (xgrammar / GBNF syntax)")
    structural_tag: str | None = Field(None, description="An xgrammar structural tag (JSON text)")


class SamplingExtras(StrictModel):
    """vLLM's sampling extras, which every generation endpoint (/v1/responses too) accepts under the same names."""

    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    structured_outputs: StructuredOutputsRequest | None = Field(None, description="vLLM's constrained-output extra")


class GenerationRequest(SamplingExtras):
    """Fields both endpoints share, with OpenAI's names and ranges; vLLM's sampling extras come from SamplingExtras."""

    # field name -> values that mean "not used" (anything else is a 400 naming the field)
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {}
    max_tokens_param: ClassVar[str] = "max_tokens"
    logprobs_param: ClassVar[str] = "logprobs"
    default_max_tokens: ClassVar[int | None] = None  # None: up to the context length

    model: str = Field(description="The served model name (see GET /v1/models)")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = Field(None, description="Accepted, not used")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return None

    def check(self, settings: Settings) -> None:
        """Unsupported fields and the server's limits, each a 400 naming its param."""
        for name, unused in self.unsupported.items():
            if getattr(self, name) not in unused:
                raise bad_request(f"'{name}' is {_UNSUPPORTED}", param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if self.n > settings.max_n:
            raise bad_request(f"n must be at most {settings.max_n}", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stop) > settings.max_stop_strings:
            raise bad_request(f"at most {settings.max_stop_strings} stop strings are allowed", param="stop")
        if self.logit_bias is not None and len(self.logit_bias) > settings.max_logit_bias:
            raise bad_request(f"logit_bias may have at most {settings.max_logit_bias} entries", param="logit_bias")
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and settings.max_tokens_limit is not None and max_tokens > settings.max_tokens_limit:
            raise bad_request(f"max_tokens must be at most {settings.max_tokens_limit}", param=self.max_tokens_param)
        logprobs = self.requested_logprobs()
        if logprobs is not None and logprobs > settings.max_logprobs:
            raise bad_request(f"{self.logprobs_param} must be at most {settings.max_logprobs}", param=self.logprobs_param)

    def sampling_params(
        self, max_tokens_limit: int | None, structured: StructuredOutputs | None = None, skip_special_tokens: bool = True
    ) -> SamplingParams:
        """Build SamplingParams; its own checks become a 400 naming the param."""
        max_tokens = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = _min_or_none(self.default_max_tokens, max_tokens_limit)
        try:
            return SamplingParams(
                n=self.n,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                min_p=self.min_p or 0.0,
                repetition_penalty=self.repetition_penalty or 1.0,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                logit_bias=_token_bias(self.logit_bias),
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                logprobs=self.requested_logprobs(),
                structured_outputs=structured,
                skip_special_tokens=skip_special_tokens,
            )
        except InvalidRequestError as exc:
            raise bad_request(str(exc), param=exc.param, code="invalid_value") from exc


def _min_or_none(a: int | None, b: int | None) -> int | None:
    values = [value for value in (a, b) if value is not None]
    return min(values) if values else None


def _token_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    if logit_bias is None:
        return None
    try:
        return {int(token_id): bias for token_id, bias in logit_bias.items()}
    except ValueError:
        raise bad_request("logit_bias keys must be token ids", param="logit_bias", code="invalid_value") from None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {"suffix": (None, "")}
    default_max_tokens: ClassVar[int | None] = 16  # OpenAI's default for completions

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0, description="0 only with echo: score the prompt, generate nothing")] | None = None
    echo: bool = Field(False, description="Return the prompt before the completion; with logprobs, the prompt's logprobs too")
    logprobs: Annotated[int, Field(ge=0)] | None = None
    suffix: str | None = Field(None, description=f"Must be null or empty: {_UNSUPPORTED}")
    best_of: Annotated[int, Field(ge=1)] | None = Field(None, description="Must be null or equal to n")

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def check(self, settings: Settings) -> None:
        super().check(settings)
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of other than n is {_UNSUPPORTED}", param="best_of", code="unsupported_parameter")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens must be at least 1 (0 only with echo, to score the prompt)", param="max_tokens")

    def sampling_params(
        self, max_tokens_limit: int | None, structured: StructuredOutputs | None = None, skip_special_tokens: bool = True
    ) -> SamplingParams:
        """With echo, logprobs also asks for the prompt's (how lm-evaluation-harness scores a text through a server)."""
        params = super().sampling_params(max_tokens_limit, structured, skip_special_tokens)
        return dataclasses.replace(params, prompt_logprobs=self.logprobs) if self.echo else params

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of engine prompts (one engine request each)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return prompt  # type: ignore[return-value]


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(StrictModel):
    name: str
    arguments: str = Field(description="JSON text of the arguments object")


class ToolCallIn(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(StrictModel):
    """One message; fields OpenAI's SDK may echo back from a response are accepted only when empty."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description="The author's name, passed to the chat template")
    refusal: str | None = Field(None, description="Must be null")
    tool_calls: list[ToolCallIn] | None = Field(None, description="Calls an assistant message made")
    tool_call_id: str | None = Field(None, description="On a tool message: the call it answers")
    function_call: Any = Field(None, description=f"Must be null: {_UNSUPPORTED}")
    audio: Any = Field(None, description=f"Must be null: {_UNSUPPORTED}")
    annotations: list[Any] | None = Field(None, description="Accepted, not used (assistant messages echoed back)")

    def as_engine_message(self, index: int) -> dict[str, Any]:
        """The message as the chat template expects it (Hugging Face's shape; tool call arguments as objects)."""
        for name in ("refusal", "function_call", "audio"):
            if getattr(self, name) is not None:
                raise bad_request(f"messages[{index}].{name} is {_UNSUPPORTED}", param="messages", code="unsupported_parameter")
        if self.tool_calls and self.role != "assistant":
            raise bad_request(f"messages[{index}].tool_calls is only allowed on assistant messages", param="messages")
        if self.role == "tool" and not self.tool_call_id:
            raise bad_request(f"messages[{index}].tool_call_id is required on tool messages", param="messages")
        if self.content is None and not self.tool_calls:
            raise bad_request(f"messages[{index}].content is required", param="messages")
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [_engine_tool_call(call, index) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _engine_tool_call(call: ToolCallIn, index: int) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        raise bad_request(f"messages[{index}].tool_calls: arguments must be JSON text", param="messages") from None
    function = {"name": call.function.name, "arguments": arguments}
    return {"id": call.id, "type": "function", "function": function}


class JSONSchemaFormat(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the output must match")
    strict: bool | None = Field(None, description="Strict or not, the output is constrained to the schema")


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object")
    strict: bool | None = Field(None, description="Strict or not, calls are constrained once they start")


class ToolDefinition(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {
        "functions": (None, []),
        "function_call": (None, "none"),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "prediction": (None,),
        "web_search_options": (None,),
        "reasoning_effort": (None,),
        "metadata": (None,),
        "store": (None, False),
    }
    max_tokens_param: ClassVar[str] = "max_completion_tokens"
    logprobs_param: ClassVar[str] = "top_logprobs"

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = Field(None, description="Unset: auto when tools are given, else none")
    functions: list[Any] | None = Field(None, description=f"Deprecated by OpenAI, {_UNSUPPORTED}: use tools")
    function_call: Any = Field(None, description=f"Deprecated by OpenAI, {_UNSUPPORTED}: use tool_choice")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call; unset: true")
    response_format: ResponseFormat | None = None
    audio: Any = Field(None, description=_UNSUPPORTED)
    modalities: list[str] | None = Field(None, description='Only ["text"]')
    prediction: Any = Field(None, description=_UNSUPPORTED)
    web_search_options: Any = Field(None, description=_UNSUPPORTED)
    reasoning_effort: str | None = Field(None, description=_UNSUPPORTED)
    metadata: dict[str, str] | None = Field(None, description=_UNSUPPORTED)
    store: bool | None = Field(None, description="Only false")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self, settings: Settings) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        super().check(settings)
        if self.tool_choice not in (None, "none") and not self.tools:
            raise bad_request("tool_choice is only allowed when tools are given", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {tool.function.name for tool in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise bad_request(
                    f"tool_choice names an unknown function {self.tool_choice.function.name!r}", param="tool_choice"
                )
        is_formatted = self.response_format is not None and self.response_format.type != "text"
        if is_formatted and self.structured_outputs is not None:
            raise bad_request("give response_format or structured_outputs, not both", param="structured_outputs")
        if self.calls_tools and (is_formatted or self.structured_outputs is not None):
            param = "response_format" if is_formatted else "structured_outputs"
            raise bad_request(f"{param} together with tools is {_UNSUPPORTED}; set tool_choice to none", param=param)

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def calls_tools(self) -> bool:
        """Whether the model is offered tools (and its output is parsed for calls)."""
        return bool(self.tools) and self.effective_tool_choice != "none"

    def engine_messages(self) -> list[dict[str, Any]]:
        return [message.as_engine_message(index) for index, message in enumerate(self.messages)]


def check_model(requested: str, served: str, adapters: Sequence[str] = ()) -> str | None:
    """404 unless `requested` is the served model or one of its LoRA adapters -> the adapter's name, or None."""
    if requested in adapters:
        return requested
    if requested != served:
        names = ", ".join(f"`{name}`" for name in (served, *adapters))
        message = f"The model `{requested}` does not exist; this server serves {names} (GET /v1/models lists them)."
        raise APIError(404, message, param="model", code="model_not_found")
    return None
