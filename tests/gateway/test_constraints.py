"""Request -> StructuredOutputs, and the tool-call structural tags: xgrammar 0.2.9 compiles them and they accept exactly
the calls the parsers read (arguments valid against the tool's schema)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import xgrammar
from transformers import AutoTokenizer

from engine.grammar_worker import compact_json_contents
from gateway.constraints import auto_calls_tag, forced_calls_tag, request_constraint, tool_constraint
from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ToolDefinition
from gateway.tool_parsers import HERMES, MISTRAL, parse_tool_calls

USER = [{"role": "user", "content": "hi"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "noop"}},
]


def _chat(**extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **extra})


def test_response_format_and_structured_outputs() -> None:
    assert request_constraint(_chat()) is None
    assert request_constraint(_chat(response_format={"type": "text"})) is None
    constraint = request_constraint(_chat(response_format={"type": "json_object"}))
    assert constraint is not None and constraint.outputs.json_object and constraint.param == "response_format"
    schema_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": CITY, "strict": True}}
    constraint = request_constraint(_chat(response_format=schema_format))
    assert constraint is not None and json.loads(constraint.outputs.json or "") == CITY
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "a", "structured_outputs": {"regex": "[ab]+"}})
    constraint = request_constraint(completion)
    assert constraint is not None and (constraint.outputs.regex, constraint.param) == ("[ab]+", "structured_outputs")
    constraint = request_constraint(_chat(structured_outputs={"json": CITY}))
    assert constraint is not None and json.loads(constraint.outputs.json or "") == CITY
    constraint = request_constraint(_chat(structured_outputs={"choice": ["yes", "no"]}))
    assert constraint is not None and constraint.outputs.choice == ("yes", "no")


@pytest.mark.parametrize("extra", [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}])
def test_structured_outputs_needs_exactly_one(extra: dict) -> None:
    with pytest.raises(APIError) as caught:
        request_constraint(_chat(structured_outputs=extra))
    assert caught.value.param == "structured_outputs"


def test_tool_choice_picks_the_tag_and_its_param() -> None:
    assert tool_constraint(_chat(), HERMES) is None
    assert tool_constraint(_chat(tools=TOOLS, tool_choice="none"), HERMES) is None
    auto = tool_constraint(_chat(tools=TOOLS), HERMES)
    assert auto is not None and auto.param == "tools"
    assert json.loads(auto.outputs.structural_tag or "")["format"]["type"] == "triggered_tags"
    required = tool_constraint(_chat(tools=TOOLS, tool_choice="required"), HERMES)
    assert required is not None and required.param == "tool_choice"
    named = tool_constraint(_chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "noop"}}), HERMES)
    assert named is not None
    tag = json.loads(named.outputs.structural_tag or "")["format"]  # one call of the named tool, and nothing after it
    assert (tag["type"], tag["begin"], tag["end"]) == ("tag", '<tool_call>\n{"name": "noop", "arguments": ', "}")


@pytest.fixture(scope="module")
def compiler(embedded_model_dir: pathlib.Path) -> xgrammar.GrammarCompiler:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    return xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))


def _compile(compiler: xgrammar.GrammarCompiler, tag: dict[str, Any]) -> xgrammar.CompiledGrammar:
    """As the engine compiles a structural tag: its JSON contents compact (engine/grammar_worker.py)."""
    return compiler.compile_structural_tag(compact_json_contents(json.dumps(tag)))


def _accepts(compiled: xgrammar.CompiledGrammar, text: str) -> bool:
    matcher = xgrammar.GrammarMatcher(compiled)
    return bool(matcher.accept_string(text)) and matcher.is_completed()


TOOL_MODELS = [ToolDefinition.model_validate(tool) for tool in TOOLS]
HERMES_OPEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}'  # a call without its end tag
HERMES_CALL = HERMES_OPEN + "\n</tool_call>"
HERMES_NOOP = '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'


def test_hermes_tags_compile_and_accept_valid_calls_only(compiler: xgrammar.GrammarCompiler) -> None:
    auto = _compile(compiler, auto_calls_tag(TOOL_MODELS, HERMES, is_parallel=True))
    assert _accepts(auto, "Let me look. " + HERMES_CALL)
    assert _accepts(auto, "No tools needed.")
    assert not _accepts(auto, '<tool_call>\n{"name": "get_weather", "arguments": {"town":"Paris"}}\n</tool_call>')
    assert not _accepts(auto, '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>')
    forced = _compile(compiler, forced_calls_tag(TOOL_MODELS, HERMES, is_parallel=True))
    assert _accepts(forced, HERMES_CALL + "\n" + HERMES_NOOP)
    assert _accepts(forced, HERMES_CALL + "\n" + HERMES_NOOP.removesuffix("\n</tool_call>"))  # the last end tag is optional
    assert not _accepts(forced, "Plain text")
    single = _compile(compiler, forced_calls_tag(TOOL_MODELS, HERMES, is_parallel=False))
    assert _accepts(single, HERMES_OPEN)
    assert not _accepts(single, HERMES_CALL + "\n" + HERMES_NOOP)
    calls = parse_tool_calls(HERMES_CALL + "\n" + HERMES_NOOP, HERMES).calls
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Paris"}), ("noop", {})]


def test_mistral_tags_compile_and_accept_valid_calls_only(compiler: xgrammar.GrammarCompiler) -> None:
    text = '[TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"noop","arguments":{}}]'
    auto = _compile(compiler, auto_calls_tag(TOOL_MODELS, MISTRAL, is_parallel=True))
    assert _accepts(auto, "Sure. " + text)
    assert _accepts(auto, "No tools needed.")
    assert not _accepts(auto, '[TOOL_CALLS] [{"name":"get_weather","arguments":{}}]')
    forced = _compile(compiler, forced_calls_tag(TOOL_MODELS, MISTRAL, is_parallel=False))
    assert _accepts(forced, '[TOOL_CALLS][{"name":"noop","arguments":{}}]')
    assert not _accepts(forced, text)  # two calls with parallel_tool_calls=false
    assert len(parse_tool_calls(text, MISTRAL).calls) == 2


def test_forced_calls_are_compact_and_end_with_their_json(compiler: xgrammar.GrammarCompiler) -> None:
    """No token on whitespace, a closing tag or text after the call: the grammar is complete when the call's JSON is."""
    weather = TOOL_MODELS[:1]
    single = _compile(compiler, forced_calls_tag(weather, HERMES, is_parallel=False))
    matcher = xgrammar.GrammarMatcher(single)
    assert matcher.accept_string(HERMES_OPEN) and matcher.is_completed()
    assert not matcher.accept_string("\n")  # nothing may follow but the stop token
    for spaced in ('{"city": "Paris"}', '{ "city":"Paris"}', '{\n  "city":"Paris"\n}'):
        assert not _accepts(single, HERMES_OPEN.replace('{"city":"Paris"}', spaced)), spaced
    assert _accepts(single, HERMES_OPEN.replace("Paris", "New York"))  # spaces inside strings are the model's to write
    parallel = _compile(compiler, forced_calls_tag(weather, HERMES, is_parallel=True))
    assert _accepts(parallel, HERMES_OPEN) and _accepts(parallel, HERMES_CALL)
    assert _accepts(parallel, HERMES_CALL + "\n" + HERMES_OPEN.replace("Paris", "Oslo"))
    assert not _accepts(parallel, HERMES_CALL + "\n")


def test_auto_and_mistral_arguments_are_compact(compiler: xgrammar.GrammarCompiler) -> None:
    auto = _compile(compiler, auto_calls_tag(TOOL_MODELS, HERMES, is_parallel=False))
    assert _accepts(auto, "Let me look. " + HERMES_CALL)
    assert not _accepts(auto, "Let me look. " + HERMES_CALL.replace('{"city":"Paris"}', '{"city": "Paris"}'))
    mistral = _compile(compiler, forced_calls_tag(TOOL_MODELS, MISTRAL, is_parallel=False))
    assert not _accepts(mistral, '[TOOL_CALLS] [{"name": "noop", "arguments": {}}]')


def test_only_plain_json_contents_are_made_compact() -> None:
    """compact_json_contents leaves contents that set their own whitespace rule or style, and never edits a schema."""
    bounded = {"type": "json_schema", "json_schema": CITY, "max_whitespace_cnt": 1}
    xml = {"type": "json_schema", "json_schema": CITY, "style": "qwen_xml"}
    # a schema whose properties look like a json_schema format must come through as a schema, untouched
    lookalike = {"type": "object", "properties": {"type": {"const": "json_schema"}, "json_schema": {"type": "object"}}}
    plain = {"type": "json_schema", "json_schema": lookalike}
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [bounded, xml, plain]}}
    elements = json.loads(compact_json_contents(json.dumps(tag)))["format"]["elements"]
    assert elements[:2] == [bounded, xml]
    assert elements[2]["type"] == "grammar" and '"\\"type\\""' in elements[2]["grammar"]
    assert compact_json_contents("{not json") == "{not json"  # xgrammar words the error
