"""Tool calls in model output, per format: Mistral (`[TOOL_CALLS]` then a JSON list), Hermes (`<tool_call>{json}</tool_call>`).

One incremental parser serves streaming and whole outputs (parse_tool_calls feeds it everything at once), so a stream's
deltas always join to exactly the non-streamed result. A call is emitted once its JSON is complete and valid; a broken
one is returned as content, never as a half call. Unlike vLLM, text that may start a trigger is held back, not leaked.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Literal

ToolFormatName = Literal["mistral", "hermes"]
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How one model family writes calls: a trigger, then one call object (end tag) or a JSON list of them (no end)."""

    name: ToolFormatName
    trigger: str
    end: str | None  # None: the trigger is followed by a JSON list of calls


MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None)
HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>")
TOOL_FORMATS: dict[str, ToolFormat] = {"mistral": MISTRAL, "hermes": HERMES}


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True, slots=True)
class ParsedEvents:
    """What one feed() released: content text, then calls completed by this piece (in output order)."""

    content: str = ""
    calls: tuple[ToolCall, ...] = ()


@dataclass(slots=True)
class _Scan:
    """Where a JSON value ends in text that arrives in pieces (brackets and strings only; json.loads judges the rest)."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False

    def feed(self, text: str) -> int | None:
        """Index just past the end of the value in `text`, or None if it has not ended yet."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                continue
            if char == '"':
                self.in_string = True
            elif char in "[{":
                self.depth += 1
                self.started = True
            elif char in "]}":
                self.depth -= 1
                if self.started and self.depth <= 0:
                    return i + 1
            elif not self.started and not char.isspace():
                return i + 1  # not a list or object: let json.loads reject it
        return None


def _call_from(item: object) -> ToolCall | None:
    """A call from one parsed {"name", "arguments"} object (arguments an object, or JSON text of one)."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False))


def _calls_from(body: str, tool_format: ToolFormat) -> list[ToolCall] | None:
    """The calls one trigger's body holds, or None when it is not valid JSON of the right shape."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if tool_format.end is None and isinstance(value, list) else [value]
    if tool_format.end is None and not isinstance(value, list):
        return None
    calls = [_call_from(item) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


@dataclass(slots=True)
class ToolCallParser:
    """Incremental: feed() text deltas, then finish(). Content streams as soon as it cannot be part of a call.

    Whitespace before a call, and at the end of an output with calls, is dropped; content is only what the model wrote
    besides its calls.
    """

    tool_format: ToolFormat
    _held: str = ""  # text not yet released: a possible trigger start, whitespace, or a call being written
    _in_call: bool = False
    _scan: _Scan = field(default_factory=_Scan)  # the Mistral list being written
    _num_scanned: int = 0  # characters of that list the scanner has seen
    _num_calls: int = 0

    def feed(self, text: str) -> ParsedEvents:
        content: list[str] = []
        calls: list[ToolCall] = []
        self._held += text
        while True:
            if self._in_call:
                if not self._close_call(content, calls):
                    break
            elif not self._open_call(content):
                break
        return ParsedEvents("".join(content), tuple(calls))

    def finish(self) -> ParsedEvents:
        """Whatever is still held at the end: a last call whose end tag is missing or cut short if its JSON is complete
        (forced calls end without it; max_tokens may cut it), else plain content."""
        held, self._held = self._held, ""
        if self._in_call:
            body = held[len(self.tool_format.trigger) :]
            if self.tool_format.end is not None:
                body = _without_cut_end(body, self.tool_format.end)
            calls = _calls_from(body, self.tool_format)
            if calls is not None:
                self._num_calls += len(calls)
                return ParsedEvents("", tuple(calls))
            return ParsedEvents(held)
        if self._num_calls and not held.strip():
            return ParsedEvents()
        return ParsedEvents(held)

    def _open_call(self, content: list[str]) -> bool:
        """Release text before a trigger; True once a trigger starts a call (held from the trigger on)."""
        trigger = self.tool_format.trigger
        start = self._held.find(trigger)
        if start < 0:
            keep = _trigger_prefix_len(self._held, trigger)
            before, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
            self._release(before, content)
            return False
        before, self._held = self._held[:start], self._held[start:]
        self._release(before, content, is_before_call=True)
        self._in_call = True
        self._scan, self._num_scanned = _Scan(), 0
        return True

    def _release(self, text: str, content: list[str], is_before_call: bool = False) -> None:
        """Send text as content, but hold its trailing whitespace until text follows (dropped if a call follows)."""
        body = text.rstrip()
        if body:
            content.append(body)
        if not is_before_call:
            self._held = text[len(body) :] + self._held

    def _close_call(self, content: list[str], calls: list[ToolCall]) -> bool:
        """Complete the call being held when its end arrives; True to go on scanning what follows it."""
        trigger = self.tool_format.trigger
        if self.tool_format.end is not None:
            end = self._held.find(self.tool_format.end, len(trigger))
            if end < 0:
                return False
            stop = end + len(self.tool_format.end)
            body = self._held[len(trigger) : end]
        else:
            start = len(trigger) + self._num_scanned
            scanned = self._scan.feed(self._held[start:])
            if scanned is None:
                self._num_scanned = len(self._held) - len(trigger)
                return False
            stop = start + scanned
            body = self._held[len(trigger) : stop]
        raw, self._held = self._held[:stop], self._held[stop:]
        self._in_call = False
        parsed = _calls_from(body, self.tool_format)
        if parsed is None:
            content.append(raw)  # broken JSON: the model's text, as written
        else:
            calls.extend(parsed)
            self._num_calls += len(parsed)
        return True


def _without_cut_end(body: str, end: str) -> str:
    """The call's body without what a length cut left of its end tag ('\\n</tool_' of '\\n</tool_call>')."""
    body = body.rstrip()
    return body[: len(body) - _trigger_prefix_len(body, end)].rstrip()


def _trigger_prefix_len(text: str, trigger: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `trigger`."""
    for size in range(min(len(text), len(trigger) - 1), 0, -1):
        if trigger.startswith(text[-size:]):
            return size
    return 0


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None  # None when the output is only calls
    calls: list[ToolCall]


def parse_tool_calls(text: str, tool_format: ToolFormat) -> ParsedOutput:
    """A whole output's content and calls (the same answer the streaming parser gives, whatever the split)."""
    parser = ToolCallParser(tool_format)
    first, last = parser.feed(text), parser.finish()
    content = first.content + last.content
    calls = [*first.calls, *last.calls]
    return ParsedOutput(content if content or not calls else None, calls)
