"""Responses input -> the chat request chat.py builds: the stored conversation and this turn's items become messages,
function and namespace tools become chat tools, text.format becomes response_format.

Items are handled as JSON dicts, the shape the store keeps. Hosted tools (web_search, ...) are left out with a warning,
or refused when the `responses_hosted_tools` setting says "reject".
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gateway.errors import APIError, bad_request, from_validation_error
from gateway.protocol import ChatCompletionRequest, SamplingExtras
from gateway.response_store import ResponseStore
from gateway.responses_protocol import (
    IGNORED_INCLUDES,
    FunctionChoice,
    FunctionTool,
    HostedTool,
    ItemReference,
    NamespaceTool,
    ResponsesRequest,
)

logger = logging.getLogger(__name__)
_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
# chat's parameter names -> the Responses request's, so a 400 raised on the chat path names the field the client sent
_PARAM_NAMES = {
    "messages": "input",
    "prompt": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text",
}


def new_item_id(kind: str) -> str:
    return f"{_ID_PREFIX.get(kind, 'item')}_{uuid.uuid4().hex}"


def rename_param(error: APIError) -> APIError:
    """A chat-path error with the parameter renamed to the Responses request's name."""
    if error.param in _PARAM_NAMES:
        error.param = _PARAM_NAMES[error.param]
    return error


async def load_history(store: ResponseStore, previous_response_id: str, owner: str) -> list[dict[str, Any]]:
    """Every stored item of the chain ending at `previous_response_id`, oldest first (each turn's input, then output).

    A missing response (never stored, expired, deleted, or another key's) is a 404 naming it.
    """
    turns: list[list[dict[str, Any]]] = []
    response_id: str | None = previous_response_id
    seen: set[str] = set()
    while response_id is not None and response_id not in seen:
        seen.add(response_id)
        record = await store.get(response_id, owner)
        if record is None:
            where = "" if response_id == previous_response_id else f" (an earlier turn of {previous_response_id!r})"
            message = f"Previous response with id {response_id!r} not found{where}."
            raise APIError(404, message, param="previous_response_id", code="previous_response_not_found")
        turns.append([*record.input_items, *record.response.get("output", [])])
        response_id = record.previous_response_id
    return [item for turn in reversed(turns) for item in turn]


def input_items(body: ResponsesRequest, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This turn's items as stored: JSON dicts, each with an id; item_references replaced by the item they name."""
    known = {item["id"]: item for item in history if "id" in item}
    items: list[dict[str, Any]] = []
    for index, item in enumerate(body.items()):
        if isinstance(item, ItemReference):
            if item.id not in known:
                raise bad_request(f"input[{index}]: item_reference {item.id!r} names no earlier item", param="input")
            items.append(known[item.id])
            continue
        stored = item.model_dump(mode="json", exclude_none=True, by_alias=True)
        stored.setdefault("type", "message")
        if stored["type"] == "message" and isinstance(stored["content"], str):  # as OpenAI lists it: a list of parts
            part_type = "output_text" if stored["role"] == "assistant" else "input_text"
            stored["content"] = [{"type": part_type, "text": stored["content"]}]
        stored["id"] = stored.get("id") or new_item_id(stored["type"])
        known[stored["id"]] = stored
        items.append(stored)
    return items


def _content_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", part.get("refusal", ""))) for part in content)


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages of the conversation: calls join the assistant turn before them, outputs become tool messages."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    call_ids: set[str] = set()
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _content_text(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            call_ids.add(item["call_id"])
        elif kind == "function_call_output":
            if item["call_id"] not in call_ids:
                message = f"input: no function_call found for the function_call_output with call_id {item['call_id']!r}"
                raise bad_request(message, param="input", code="invalid_value")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _content_text(item["output"])})
        # reasoning items are left out of the prompt
    if not any(message["role"] != "system" for message in messages):
        raise bad_request("input must hold at least one message or function_call_output", param="input")
    return messages


@dataclass(frozen=True, slots=True)
class ChatTools:
    tools: list[dict[str, Any]]  # chat's {"type": "function", "function": {...}}
    namespaces: dict[str, str]  # function name -> the namespace tool it came from


def chat_tools(body: ResponsesRequest, rejects_hosted: bool) -> ChatTools:
    """Function tools, and the functions inside namespace tools, as chat tools; hosted tools left out or refused."""
    tools: list[dict[str, Any]] = []
    namespaces: dict[str, str] = {}

    def add(tool: FunctionTool, namespace: str | None) -> None:
        if any(existing["function"]["name"] == tool.name for existing in tools):
            raise bad_request(f"tools: the function name {tool.name!r} is given twice", param="tools")
        tools.append({"type": "function", "function": tool.model_dump(exclude_none=True, exclude={"type"})})
        if namespace is not None:
            namespaces[tool.name] = namespace

    for tool in body.tools or []:
        if isinstance(tool, HostedTool):
            if rejects_hosted:
                message = f"tools: the hosted tool {tool.type!r} cannot run on this server; only function tools can"
                raise bad_request(message, param="tools", code="unsupported_tool")
            logger.warning("hosted tool %r left out of the prompt: this server runs no hosted tools", tool.type)
        elif isinstance(tool, NamespaceTool):
            for inner in tool.tools:
                add(inner, tool.name)
        else:
            add(tool, None)
    return ChatTools(tools, namespaces)


def check_unsupported(body: ResponsesRequest) -> None:
    """Fields of OpenAI's schema this server cannot honour, each a 400 naming it."""
    for name, unused in body.unsupported.items():
        if getattr(body, name) not in unused:
            raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    for value in body.include or []:
        if value not in IGNORED_INCLUDES:
            raise bad_request(f"include {value!r} is not supported by this server", param="include", code="unsupported_parameter")
    if body.background and not body.store:
        raise bad_request("background requires store to be true", param="background")
    if body.background and body.stream:
        raise bad_request("background together with stream is not supported by this server", param="background")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    text_format = body.text.format if body.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return {"type": "json_object"}
    if text_format.name is None:
        raise bad_request("text.format json_schema needs a name", param="text")
    schema = {"name": text_format.name, "schema": text_format.schema_, "description": text_format.description}
    schema["strict"] = text_format.strict
    return {"type": "json_schema", "json_schema": {key: value for key, value in schema.items() if value is not None}}


def chat_request(body: ResponsesRequest, messages: list[dict[str, Any]], tools: ChatTools) -> ChatCompletionRequest:
    """The chat request chat.py would get for this turn (never streamed: the Responses events are built from deltas)."""
    tool_choice: Any = body.tool_choice
    if isinstance(tool_choice, FunctionChoice):
        tool_choice = {"type": "function", "function": {"name": tool_choice.name}}
    if not tools.tools and tool_choice == "auto":
        tool_choice = None  # only hosted tools were given, and they are left out
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tools": tools.tools or None,
        "tool_choice": tool_choice,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body),
        "seed": body.seed,
        "stop": body.stop,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        **{name: getattr(body, name) for name in SamplingExtras.model_fields},
    }
    try:
        return ChatCompletionRequest.model_validate({key: value for key, value in fields.items() if value is not None})
    except ValidationError as exc:
        raise rename_param(from_validation_error(exc)) from None
