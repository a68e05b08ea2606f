"""Request fields -> the engine's StructuredOutputs: response_format, vLLM's structured_outputs extra, and tool calls.

Tool calls become xgrammar structural tags in the model's own call syntax: under `auto` the model writes free text
until the trigger, then the call's JSON is constrained; `required` and a named function force calls from the start.
Each Constraint remembers the request field it came from, so a grammar the engine cannot compile is a 400 naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine import InvalidRequestError, StructuredOutputs
from gateway.errors import bad_request
from gateway.protocol import (
    ChatCompletionRequest,
    GenerationRequest,
    NamedToolChoice,
    StructuredOutputsRequest,
    ToolDefinition,
)
from gateway.tool_parsers import ToolFormat

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class Constraint:
    outputs: StructuredOutputs
    param: str  # the request field it came from: response_format, structured_outputs, tools or tool_choice


def _make(param: str, **kwargs: Any) -> Constraint:
    try:
        return Constraint(StructuredOutputs(**kwargs), param)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), param=param, code="invalid_value") from exc


def request_constraint(body: GenerationRequest) -> Constraint | None:
    """The constraint of response_format (chat) or structured_outputs (both endpoints), if any."""
    if isinstance(body, ChatCompletionRequest) and body.response_format is not None:
        response_format = body.response_format
        if response_format.type == "json_object":
            return _make("response_format", json_object=True)
        if response_format.type == "json_schema":
            if response_format.json_schema is None or response_format.json_schema.schema_ is None:
                raise bad_request("response_format json_schema needs json_schema.schema", param="response_format")
            return _make("response_format", json=json.dumps(response_format.json_schema.schema_))
    if body.structured_outputs is not None:
        return _structured_outputs(body.structured_outputs)
    return None


def _structured_outputs(extra: StructuredOutputsRequest) -> Constraint:
    schema = extra.json_schema
    return _make(
        "structured_outputs",
        json=json.dumps(schema) if isinstance(schema, dict) else schema,
        json_object=bool(extra.json_object),
        regex=extra.regex,
        choice=tuple(extra.choice) if extra.choice is not None else None,
        grammar=extra.grammar,
        structural_tag=extra.structural_tag,
    )


def tool_constraint(body: ChatCompletionRequest, tool_format: ToolFormat) -> Constraint | None:
    """The structural tag for the request's tool_choice in `tool_format`; None when no tools are offered."""
    if not body.calls_tools or not body.tools:
        return None
    choice = body.effective_tool_choice
    is_parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        tools = [tool for tool in body.tools if tool.function.name == choice.function.name]
        tag = forced_calls_tag(tools, tool_format, is_parallel=False)
        return _make("tool_choice", structural_tag=json.dumps(tag))
    if choice == "required":
        return _make("tool_choice", structural_tag=json.dumps(forced_calls_tag(body.tools, tool_format, is_parallel)))
    return _make("tools", structural_tag=json.dumps(auto_calls_tag(body.tools, tool_format, is_parallel)))


def _arguments_schema(tool: ToolDefinition) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters else ANY_OBJECT


def _hermes_tag(tool: ToolDefinition, end: str = "}\n</tool_call>") -> dict[str, Any]:
    """`<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>` with ARGS matching the tool's parameters.

    ARGS is compact JSON: the engine compiles structural tags' JSON contents without free whitespace.
    """
    begin = '<tool_call>\n{"name": ' + json.dumps(tool.function.name) + ', "arguments": '
    content = {"type": "json_schema", "json_schema": _arguments_schema(tool)}
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def _hermes_forced_calls(tools: list[ToolDefinition], is_parallel: bool) -> dict[str, Any]:
    """One call without its `\\n</tool_call>`, or (parallel) calls joined by it, the last one's optional.

    One call: the grammar is complete the moment its JSON is, so the output ends there (the parser reads a call without
    its end tag at the end of an output), and no token goes on a closing tag. Parallel: the model says when it is done,
    which it does after an end tag (given no place for one, a small model goes on writing calls to reach it).
    """
    calls = [_hermes_tag(tool, end="}") for tool in tools]
    call = calls[0] if len(calls) == 1 else {"type": "or", "elements": calls}
    if not is_parallel:
        return call
    end = {"type": "const_string", "value": "\n</tool_call>"}
    more = {"type": "sequence", "elements": [end, {"type": "const_string", "value": "\n"}, call]}
    return {"type": "sequence", "elements": [call, {"type": "star", "content": more}, {"type": "optional", "content": end}]}


def _mistral_list(tools: list[ToolDefinition], is_parallel: bool) -> dict[str, Any]:
    """Optional space, then a JSON list of {"name", "arguments"} calls (one call unless parallel)."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "arguments": _arguments_schema(tool)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not is_parallel:
        schema["maxItems"] = 1
    space = {"type": "regex", "pattern": "[ ]?"}
    return {"type": "sequence", "elements": [space, {"type": "json_schema", "json_schema": schema}]}


def forced_calls_tag(tools: list[ToolDefinition], tool_format: ToolFormat, is_parallel: bool) -> dict[str, Any]:
    """Calls from the first token on (at least one; exactly one unless parallel), and nothing after them."""
    if tool_format.end is None:
        start = {"type": "const_string", "value": tool_format.trigger}
        content = {"type": "sequence", "elements": [start, _mistral_list(tools, is_parallel)]}
    else:
        content = _hermes_forced_calls(tools, is_parallel)
    return {"type": "structural_tag", "format": content}


def auto_calls_tag(tools: list[ToolDefinition], tool_format: ToolFormat, is_parallel: bool) -> dict[str, Any]:
    """Free text until the format's trigger, then constrained calls."""
    if tool_format.end is None:
        tags = [{"type": "tag", "begin": tool_format.trigger, "content": _mistral_list(tools, is_parallel), "end": ""}]
        is_first_only = True  # one [TOOL_CALLS] list holds every call
    else:
        tags = [_hermes_tag(tool) for tool in tools]
        is_first_only = not is_parallel
    content = {"type": "triggered_tags", "triggers": [tool_format.trigger], "tags": tags, "stop_after_first": is_first_only}
    return {"type": "structural_tag", "format": content}
