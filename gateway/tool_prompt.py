"""The chat prompt of a request with tools: which call format the model uses, and how tools and past calls reach it.

A template that renders tools (Mistral's, Hermes-style ones) gets them as Hugging Face expects, through ChatPrompt. A
template that ignores them (SmolLM2's) still tells the model: a system prompt lists the tools and the call syntax, past
calls become assistant text in that syntax and tool results become `<tool_response>` user turns, as Hermes/Qwen write.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from engine import ChatPrompt, ChatTemplateInfo, Prompt
from gateway.protocol import ChatCompletionRequest
from gateway.tool_parsers import HERMES, MISTRAL, ToolFormat

_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
)
_HERMES_SYNTAX = (
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_MISTRAL_SYNTAX = (
    "To call functions, reply with [TOOL_CALLS] followed by a JSON list of calls: "
    '[TOOL_CALLS] [{"name": <function-name>, "arguments": <args-json-object>}]'
)


def choose_tool_format(setting: str, info: ChatTemplateInfo) -> ToolFormat:
    """`mistral` or `hermes` as set; `auto`: Mistral when the vocabulary has [TOOL_CALLS], else Hermes."""
    if setting == "mistral" or (setting == "auto" and info.has_tool_calls_token):
        return MISTRAL
    return HERMES


@dataclass(frozen=True, slots=True)
class ToolPrompt:
    prompt: Prompt
    tool_format: ToolFormat


def build_chat_prompt(body: ChatCompletionRequest, setting: str, info: ChatTemplateInfo) -> ToolPrompt:
    """The engine prompt for the request's messages, with its tools when tool_choice is not none."""
    tool_format = choose_tool_format(setting, info)
    messages = body.engine_messages()
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []] if body.calls_tools else []
    has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not tools and not has_tool_turns:
        return ToolPrompt(messages, tool_format)
    if info.renders_tools:
        if tool_format is MISTRAL:
            messages = [_with_mistral_ids(message) for message in messages]
        return ToolPrompt(ChatPrompt(messages, tools or None), tool_format)
    return ToolPrompt(_as_text_turns(messages, tools, tool_format), tool_format)


def _mistral_id(call_id: str) -> str:
    """Mistral's templates want 9 alphanumeric characters; the same id always maps to the same 9."""
    cleaned = "".join(char for char in call_id if char.isalnum())
    return cleaned[-9:] if len(cleaned) >= 9 else hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _with_mistral_ids(message: dict[str, Any]) -> dict[str, Any]:
    message = dict(message)
    if "tool_call_id" in message:
        message["tool_call_id"] = _mistral_id(message["tool_call_id"])
    if "tool_calls" in message:
        message["tool_calls"] = [{**call, "id": _mistral_id(call["id"])} for call in message["tool_calls"]]
    return message


def _call_text(call: dict[str, Any], tool_format: ToolFormat) -> str:
    """A past call as the tool-call grammar has the model write it (gateway/constraints.py): compact JSON arguments, in
    Hermes' `{"name": ..., "arguments": ...}` wrapper, or (Mistral) a compact object of the call list."""
    name, arguments = call["function"]["name"], call["function"]["arguments"]
    if tool_format is MISTRAL:
        return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))
    compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + compact + "}"


def _as_text_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_format: ToolFormat) -> list[dict[str, Any]]:
    """Plain role/content messages for a template that ignores tools: a tool system prompt, calls and results as text."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        content = message["content"]
        if message.get("tool_calls"):
            calls = message["tool_calls"]
            if tool_format is MISTRAL:
                written = f"{MISTRAL.trigger} [" + ",".join(_call_text(call, MISTRAL) for call in calls) + "]"
            else:
                written = "\n".join(f"{HERMES.trigger}\n{_call_text(call, HERMES)}\n{HERMES.end}" for call in calls)
            content = f"{content}\n{written}" if content else written
            turns.append({"role": "assistant", "content": content})
        elif message["role"] == "tool":
            turns.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            turns.append({key: value for key, value in message.items() if key in ("role", "content", "name")})
    if tools:
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        system = _TOOLS_INTRO.format(tools=listing) + (_MISTRAL_SYNTAX if tool_format is MISTRAL else _HERMES_SYNTAX)
        if turns and turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{system}"}
        else:
            turns.insert(0, {"role": "system", "content": system})
    return turns
