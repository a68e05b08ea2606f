"""Tool-call parsers on hand-written model outputs: both formats, several calls, broken JSON, text before the call, and
streaming split at every character boundary equal to the whole output."""

from __future__ import annotations

import json

import pytest

from gateway.tool_parsers import HERMES, MISTRAL, ToolCallParser, ToolFormat, new_call_id, parse_tool_calls

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
NOOP = '{"name": "noop", "arguments": {}}'
HERMES_TWO = f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{NOOP}\n</tool_call>\n"
MISTRAL_TWO = f'[TOOL_CALLS] [{WEATHER}, {{"name": "noop", "arguments": "{{\\"x\\": [1, \\"]\\"]}}"}}]'


def _calls(text: str, tool_format: ToolFormat) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in parse_tool_calls(text, tool_format).calls]


def test_hermes_two_calls_and_text_before() -> None:
    parsed = parse_tool_calls(HERMES_TWO, HERMES)
    assert parsed.content == "Let me check."
    assert _calls(HERMES_TWO, HERMES) == [("get_weather", {"city": "Paris", "unit": "C"}), ("noop", {})]
    assert all(call.id.startswith("call_") and len(call.id) == 29 for call in parsed.calls)
    assert len({call.id for call in parsed.calls}) == 2


def test_mistral_list_with_arguments_as_text() -> None:
    parsed = parse_tool_calls(MISTRAL_TWO, MISTRAL)
    assert parsed.content is None  # only calls
    assert _calls(MISTRAL_TWO, MISTRAL) == [("get_weather", {"city": "Paris", "unit": "C"}), ("noop", {"x": [1, "]"]})]


def test_plain_text_is_content_untouched() -> None:
    for tool_format in (HERMES, MISTRAL):
        text = "  Paris is sunny today.\n\n"
        assert parse_tool_calls(text, tool_format).content == text
        assert parse_tool_calls("", tool_format).content == ""


@pytest.mark.parametrize(
    ("text", "tool_format"),
    [
        ('<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>', HERMES),  # invalid JSON
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}', HERMES),  # cut off
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', HERMES),  # no name
        ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', HERMES),  # arguments not an object
        ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}', MISTRAL),  # cut off
        ('[TOOL_CALLS] {"name": "f", "arguments": {}}', MISTRAL),  # not a list
        ("[TOOL_CALLS] nothing", MISTRAL),
    ],
)
def test_broken_calls_are_content(text: str, tool_format: ToolFormat) -> None:
    parsed = parse_tool_calls(text, tool_format)
    assert parsed.calls == [] and parsed.content == text


def test_a_good_call_survives_a_broken_one_after_it() -> None:
    text = f'<tool_call>{WEATHER}</tool_call><tool_call>{{"name": "g", "arguments": }}</tool_call>'
    parsed = parse_tool_calls(text, HERMES)
    assert [call.name for call in parsed.calls] == ["get_weather"]
    assert parsed.content == '<tool_call>{"name": "g", "arguments": }</tool_call>'


def test_last_call_without_end_tag_counts_when_complete() -> None:
    assert _calls(f"<tool_call>\n{WEATHER}\n", HERMES) == [("get_weather", {"city": "Paris", "unit": "C"})]


def _streamed(pieces: list[str], tool_format: ToolFormat) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    parser = ToolCallParser(tool_format)
    events = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    content = "".join(event.content for event in events)
    calls = [(call.name, call.arguments) for event in events for call in event.calls]
    return (content if content or not calls else None), calls, [event.content for event in events]


OUTPUTS = [
    (HERMES_TWO, HERMES),
    (MISTRAL_TWO, MISTRAL),
    ("Sure <tool_ca then plain text <tool", HERMES),
    ('Hi [TOOL_CALL] [TOOL_CALLS] [{"name": "f", "arguments": {"s": "\\"}]"}}] bye', MISTRAL),
    ('x <tool_call>{"name": "f", "arguments": {"a": "</tool"}}</tool_call> after', HERMES),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}', HERMES),
]


@pytest.mark.parametrize(("text", "tool_format"), OUTPUTS)
def test_streaming_split_at_every_boundary_equals_whole(text: str, tool_format: ToolFormat) -> None:
    whole = parse_tool_calls(text, tool_format)
    expected = (whole.content, [(call.name, call.arguments) for call in whole.calls])
    for i in range(len(text) + 1):
        content, calls, _ = _streamed([text[:i], text[i:]], tool_format)
        assert (content, calls) == expected, f"split at {i}"
    content, calls, _ = _streamed(list(text), tool_format)  # one character at a time
    assert (content, calls) == expected


def test_trigger_prefix_is_held_then_released() -> None:
    _, _, released = _streamed(["Hello <tool", "_c", "ar is not a call"], HERMES)
    assert released == ["Hello", "", " <tool_car is not a call", ""]
    _, calls, released = _streamed(["Hello <tool", "_call>", WEATHER, "</tool_call>"], HERMES)
    assert released == ["Hello", "", "", "", ""] and [name for name, _ in calls] == ["get_weather"]


def test_call_ids_are_random() -> None:
    assert new_call_id() != new_call_id()


COMPACT_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}'


@pytest.mark.parametrize("kept", range(len("\n</tool_call>")))
def test_a_complete_call_parses_when_max_tokens_cut_its_end_tag(kept: int) -> None:
    """'...}}\\n</tool_' (the issue's output at max_tokens=32): the JSON is whole, only the end tag was cut."""
    text = COMPACT_CALL + "\n</tool_call>"[:kept]
    assert parse_tool_calls(text, HERMES).content is None
    assert _calls(text, HERMES) == [("get_weather", {"city": "Paris"})]
    content, calls, _ = _streamed(list(text), HERMES)  # a stream one character at a time reads the same
    assert content is None
    assert [(name, json.loads(arguments)) for name, arguments in calls] == [("get_weather", {"city": "Paris"})]


def test_a_call_cut_inside_its_json_is_content_not_a_half_call() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Par'
    parsed = parse_tool_calls(text, HERMES)
    assert (parsed.content, parsed.calls) == (text, [])


def test_forced_parallel_calls_the_last_without_its_end_tag() -> None:
    """The forced-calls grammar joins parallel calls with the end tag and leaves the last one's out."""
    text = COMPACT_CALL + "\n</tool_call>\n" + '<tool_call>\n{"name": "noop", "arguments": {}}'
    assert _calls(text, HERMES) == [("get_weather", {"city": "Paris"}), ("noop", {})]
    assert parse_tool_calls(text, HERMES).content is None
