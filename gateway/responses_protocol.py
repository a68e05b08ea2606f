"""Request and reply models of POST /v1/responses (OpenAI's Responses API): input items, tools, text format, Response.

Strict like protocol.py: an unknown field is a 400. Fields of OpenAI's schema that this server cannot honour are
accepted only with their "unused" value (a 400 naming them otherwise); hints that change nothing we could do
(reasoning, include of items we never produce, prompt_cache_key, service_tier) are accepted and echoed.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from gateway.protocol import FunctionDefinition, SamplingExtras, StrictModel

_UNSUPPORTED = "not supported by this server"
HOSTED_TOOLS = (
    "web_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "file_search",
    "code_interpreter",
    "computer_use",
    "computer_use_preview",
    "image_generation",
    "mcp",
    "local_shell",
)
# `include` values naming output we never produce (hosted tools, images, reasoning): nothing to include, so accepted
IGNORED_INCLUDES = (
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
    "file_search_call.results",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "message.input_image.image_url",
)


def _is_none(value: object) -> bool:
    return value is None


def _type_of(value: Any) -> str:
    """An item's `type`; a message may leave it out (OpenAI's EasyInputMessage)."""
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return str(getattr(value, "type", "message"))


class InputText(StrictModel):
    type: Literal["input_text"]
    text: str


class OutputText(StrictModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = Field(None, description="Accepted, not used")
    logprobs: list[Any] | None = Field(None, description="Accepted, not used")


class Refusal(StrictModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | OutputText | Refusal, Field(discriminator="type")]


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    status: str | None = Field(None, description="Accepted, not used (items echoed back)")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.refusal if isinstance(part, Refusal) else part.text for part in self.content)


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    id: str | None = None
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str = Field(description="JSON text of the arguments object")
    namespace: str | None = Field(None, description="The namespace tool the function belongs to, if any")
    status: str | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[ContentPart]
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.refusal if isinstance(part, Refusal) else part.text for part in self.output)


class ReasoningItem(BaseModel):
    """Accepted and left out of the prompt (this server produces no reasoning of its own)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]
    id: str | None = None


class ItemReference(StrictModel):
    type: Literal["item_reference"]
    id: str


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")],
    Discriminator(_type_of),
]


class FunctionTool(FunctionDefinition):
    """Chat's function definition, flat: the Responses shape puts `type` beside the name."""

    type: Literal["function"]


class NamespaceTool(StrictModel):
    """A group of function tools (Codex CLI sends one); its functions are offered to the model by their own names."""

    type: Literal["namespace"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    tools: list[FunctionTool]


class HostedTool(BaseModel):
    """A tool OpenAI runs on its side (web_search, file_search, ...): this server cannot; see the hosted_tools setting."""

    model_config = ConfigDict(extra="allow")
    type: Literal[HOSTED_TOOLS]  # type: ignore[valid-type]


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[NamespaceTool, Tag("namespace")] | Annotated[HostedTool, Tag("hosted")],
    Discriminator(lambda value: "hosted" if _type_of(value) in HOSTED_TOOLS else _type_of(value)),
]


class FunctionChoice(StrictModel):
    type: Literal["function"]
    name: str


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="json_schema: the schema the output must match")
    strict: bool | None = None


class TextOptions(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted, not used")


class ReasoningOptions(StrictModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponseStreamOptions(StrictModel):
    include_obfuscation: bool | None = Field(None, description="Accepted; events are never padded")


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)]


class ResponsesRequest(SamplingExtras):
    """POST /v1/responses."""

    # field name -> values that mean "not used" (anything else is a 400 naming the field)
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {
        "conversation": (None,),
        "prompt": (None,),
        "max_tool_calls": (None,),
        "top_logprobs": (None, 0),
        "truncation": (None, "disabled"),
        "context_management": (None,),
    }

    model: str = Field(description="The served model name (see GET /v1/models)")
    input: str | Annotated[list[InputItem], Field(max_length=4096)] = Field(
        default_factory=list, description="A user message, or a list of items"
    )
    instructions: str | None = Field(None, description="A system message put first (not carried by previous_response_id)")
    previous_response_id: str | None = None
    store: bool = Field(True, description="Keep the response and its input for previous_response_id and GET")
    background: bool = Field(False, description="Answer at once (queued) and generate in the background; needs store")
    stream: bool = False
    stream_options: ResponseStreamOptions | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    tools: Annotated[list[Tool], Field(max_length=512)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = Field(
        None, description="Unset: auto when tools are given"
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call; unset: true")
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = Field(None, description="Accepted; this server produces no reasoning items")
    include: list[str] | None = Field(None, description="Only values naming output this server never produces")
    metadata: Metadata | None = Field(None, description="Up to 16 string pairs, echoed back")
    user: str | None = Field(None, description="Accepted, not used")
    safety_identifier: str | None = Field(None, description="Accepted, not used")
    prompt_cache_key: str | None = Field(None, description="Accepted, not used (the prefix cache needs no key)")
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    client_metadata: dict[str, Any] | None = Field(None, description="Accepted, not used (Codex CLI sends it)")
    truncation: Literal["auto", "disabled"] | None = Field(None, description='Only "disabled": a prompt too long is a 400')
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(None, description="Only 0")
    max_tool_calls: Annotated[int, Field(ge=1)] | None = Field(None, description=_UNSUPPORTED)
    conversation: Any = Field(None, description=f"{_UNSUPPORTED}: use previous_response_id")
    prompt: Any = Field(None, description=f"Prompt templates are {_UNSUPPORTED}")
    context_management: Any = Field(None, description=_UNSUPPORTED)
    # chat's sampling fields that the Responses API lacks (vLLM's extras come from SamplingExtras)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem | ItemReference]:
        """The input as a list of items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


# --- the reply ---------------------------------------------------------------------------------------------------


class OutputTextPart(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputTextPart]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]
    namespace: str | None = Field(None, exclude_if=_is_none)


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(BaseModel):
    code: str
    message: str


ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]


class ResponseObject(BaseModel):
    """The Response, as POST returns it, GET reads it back and each stream lifecycle event carries it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    background: bool
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ReasoningOptions
    service_tier: str
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: str
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str]


class InputItemList(BaseModel):
    """GET /v1/responses/{id}/input_items: a page of the stored input items, OpenAI's list shape."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
