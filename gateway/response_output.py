"""Engine deltas -> Responses output items and stream events, through chat's tool-call parser.

One builder serves both replies: the non-streamed one drops the events, so a stream always ends with exactly the
output a plain request gets. Text becomes a `message` item; each parsed call closes it and becomes a `function_call`
item (a call is never streamed as text). Events are plain dicts; the endpoint numbers and frames them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine import CompletionOutput
from gateway.response_input import new_item_id
from gateway.responses_protocol import OutputFunctionCall, OutputItem, OutputMessage, OutputTextPart
from gateway.tool_parsers import ParsedEvents, ToolCall, ToolCallParser, ToolFormat

Event = dict[str, Any]


def _dump(item: OutputItem | OutputTextPart) -> dict[str, Any]:
    return item.model_dump(mode="json")


@dataclass
class OutputBuilder:
    """Feed it deltas of one choice; it keeps the output items and returns the events each delta makes."""

    tool_format: ToolFormat | None  # None: the output is not parsed for calls
    namespaces: dict[str, str]  # function name -> its namespace tool
    items: list[OutputItem] = field(default_factory=list)
    finish_reason: str | None = None
    _parser: ToolCallParser | None = None
    _message: OutputMessage | None = None  # the message item being written

    def __post_init__(self) -> None:
        self._parser = ToolCallParser(self.tool_format) if self.tool_format is not None else None

    @property
    def is_cut(self) -> bool:
        return self.finish_reason == "length"

    @property
    def has_calls(self) -> bool:
        return any(isinstance(item, OutputFunctionCall) for item in self.items)

    def feed(self, delta: CompletionOutput) -> list[Event]:
        events: list[Event] = []
        parsed = self._parse(delta)
        if parsed.content:
            events += self._text(parsed.content)
        for call in parsed.calls:
            events += self._close_message()
            events += self._call(call)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            if not self.items:
                events += self._open_message()  # an empty answer is still one (empty) message
            events += self._close_message()
        return events

    def _parse(self, delta: CompletionOutput) -> ParsedEvents:
        if self._parser is None:
            return ParsedEvents(delta.text)
        events = self._parser.feed(delta.text)
        if delta.finish_reason is None:
            return events
        last = self._parser.finish()
        return ParsedEvents(events.content + last.content, events.calls + last.calls)

    def _open_message(self) -> list[Event]:
        self._message = OutputMessage(id=new_item_id("message"), status="in_progress", content=[])
        self.items.append(self._message)
        index = len(self.items) - 1
        part = OutputTextPart(text="")
        added = {"type": "response.output_item.added", "output_index": index, "item": _dump(self._message)}
        self._message.content.append(part)
        part_added = {
            "type": "response.content_part.added",
            "item_id": self._message.id,
            "output_index": index,
            "content_index": 0,
            "part": _dump(part),
        }
        return [added, part_added]

    def _text(self, text: str) -> list[Event]:
        events = self._open_message() if self._message is None else []
        assert self._message is not None
        self._message.content[0].text += text
        delta = {
            "type": "response.output_text.delta",
            "item_id": self._message.id,
            "output_index": len(self.items) - 1,
            "content_index": 0,
            "delta": text,
            "logprobs": [],
        }
        return [*events, delta]

    def _close_message(self) -> list[Event]:
        message, self._message = self._message, None
        if message is None:
            return []
        message.status = "incomplete" if self.is_cut else "completed"
        index = self.items.index(message)
        part = message.content[0]
        where = {"item_id": message.id, "output_index": index, "content_index": 0}
        return [
            {"type": "response.output_text.done", **where, "text": part.text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": _dump(part)},
            {"type": "response.output_item.done", "output_index": index, "item": _dump(message)},
        ]

    def _call(self, call: ToolCall) -> list[Event]:
        item = OutputFunctionCall(
            id=new_item_id("function_call"),
            call_id=call.id,
            name=call.name,
            arguments="",
            status="in_progress",
            namespace=self.namespaces.get(call.name),
        )
        self.items.append(item)
        index = len(self.items) - 1
        added = {"type": "response.output_item.added", "output_index": index, "item": _dump(item)}
        item.arguments, item.status = call.arguments, "completed"
        where = {"item_id": item.id, "output_index": index}
        return [
            added,
            {"type": "response.function_call_arguments.delta", **where, "delta": call.arguments},
            {"type": "response.function_call_arguments.done", **where, "name": call.name, "arguments": call.arguments},
            {"type": "response.output_item.done", "output_index": index, "item": _dump(item)},
        ]
