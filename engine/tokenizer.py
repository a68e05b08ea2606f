"""Tokenizer: a transformers tokenizer from a local directory (encode, chat template), incremental UTF-8 safe decoding and
stop-string hold-back. Loads local files only; the detokenizer uses the prefix/read-offset window, like vLLM's, over a
few recent character boundaries.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import AutoTokenizer

from engine.errors import InvalidRequestError

REPLACEMENT_CHAR = "\ufffd"
# Decode windows start this many emitted steps back, so context-dependent pieces (SentencePiece's leading space) decode
# exactly as they do inside the whole text.
NUM_CONTEXT_STEPS = 3
# Prompt tokens that seed the first window (the prompt's end gives the first generated token its context).
NUM_PROMPT_CONTEXT_IDS = 5
# SentencePiece byte runs are held whole up to this many tokens (bounded latency; a longer run decodes as it goes).
MAX_HELD_BYTE_RUN = 16


# A tool the chat template is shown once at load time, to learn whether it writes `tools` into the prompt.
_PROBE_TOOL = {"type": "function", "function": {"name": "sirocco_probe_tool", "description": "", "parameters": {}}}
MISTRAL_TOOL_CALLS_TOKEN = "[TOOL_CALLS]"


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """Chat messages (Hugging Face / OpenAI dicts, tool calls included) and the tools offered, for the chat template."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class ChatTemplateInfo:
    """What the model's chat template and vocabulary say about tool calling."""

    renders_tools: bool  # the template writes the `tools` it is given into the prompt
    has_tool_calls_token: bool  # the vocabulary has Mistral's [TOOL_CALLS] token


class Tokenizer:
    """The model's tokenizer and chat template, loaded from a local model directory."""

    def __init__(self, model_dir: str | pathlib.Path) -> None:
        model_path = pathlib.Path(model_dir)
        self._tokenizer: Any = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.vocab_size: int = len(self._tokenizer)
        self.eos_token_ids: frozenset[int] = frozenset(read_generation_eos_ids(model_path) | tokenizer_eos_ids(self._tokenizer))
        # Everything decode(skip_special_tokens=True) drops: declared special tokens plus added tokens marked special.
        added = self._tokenizer.added_tokens_decoder.items()
        self.special_token_ids: frozenset[int] = frozenset(self._tokenizer.all_special_ids) | {i for i, t in added if t.special}
        self.byte_fallback_ids: frozenset[int] = find_byte_fallback_ids(self._tokenizer)
        self._decode_ids = _fast_decode(self._tokenizer)
        self.chat_template_info = ChatTemplateInfo(
            renders_tools=self._renders_tools(), has_tool_calls_token=MISTRAL_TOOL_CALLS_TOKEN in self._tokenizer.get_vocab()
        )

    @property
    def hf_tokenizer(self) -> Any:
        """The transformers tokenizer itself (for xgrammar's tokenizer info)."""
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, by default with the model's own special tokens (BOS where the tokenizer adds one)."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._decode_ids(token_ids, skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """The text of one token decoded alone (for logprobs); half a character decodes as U+FFFD."""
        return str(self._decode_ids([token_id], skip_special_tokens=False))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Render chat messages (and tools) with the model's template (by default ending with the generation prompt).

        The rendered text already holds the template's special tokens (BOS included), so by default none are added.
        """
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except (TemplateError, TypeError, KeyError, ValueError, AttributeError) as exc:
            raise InvalidRequestError(f"the chat template cannot render these messages: {exc}", param="messages") from exc
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _renders_tools(self) -> bool:
        if not getattr(self._tokenizer, "chat_template", None):
            return False
        messages = [{"role": "user", "content": "hi"}]
        try:
            text = self._tokenizer.apply_chat_template(messages, tools=[_PROBE_TOOL], add_generation_prompt=True, tokenize=False)
        except Exception:  # any template failure: do not trust it with tools
            return False
        return "sirocco_probe_tool" in str(text)

    def detokenizer(self, prompt_token_ids: list[int] | None = None, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one sequence; the prompt's last ids give the first tokens their context."""
        return IncrementalDetokenizer(self, prompt_token_ids or [], skip_special_tokens)


def read_generation_eos_ids(model_dir: pathlib.Path) -> set[int]:
    """`eos_token_id` (int or list) from generation_config.json, if the file exists."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return set()
    value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    return as_id_set(value)


def tokenizer_eos_ids(tokenizer: Any) -> set[int]:
    return as_id_set(tokenizer.eos_token_id)


def find_byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of SentencePiece byte tokens (`<0xE6>`), if the model falls back to bytes; empty for byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(backend.model, "byte_fallback", False):
        return frozenset()
    return frozenset(i for token, i in tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token))


def as_id_set(value: object) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


class IncrementalDetokenizer:
    """Turns one sequence's token ids into text deltas that never split a UTF-8 character.

    Each step decodes a small window `ids[prefix_offset:]`; the text past `ids[prefix_offset:read_offset]` is emitted
    once it does not end in U+FFFD (half a character). `prefix_offset` trails a few steps behind, always on a character
    boundary, so context-dependent spacing matches the full decode. With skip_special_tokens, special ids are dropped on
    arrival, as decode() itself drops them before decoding. A run of SentencePiece byte tokens is held until it ends,
    because one invalid byte turns the whole run into U+FFFD (runs longer than MAX_HELD_BYTE_RUN decode as they go);
    a run of invalid bytes is held until text follows it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._ids = [t for t in prompt_token_ids if t not in self._skipped_ids][-NUM_PROMPT_CONTEXT_IDS:]  # the window
        self._read_offset = len(self._ids)
        self._boundaries: deque[int] = deque([0], maxlen=NUM_CONTEXT_STEPS)  # recent read offsets; [0] starts the window
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset], cached between steps
        self._num_run_bytes = 0  # length of the SentencePiece byte-token run at the end of the ids

    def add(self, token_id: int) -> str:
        """Append one generated token; return the new text that is safe to emit (possibly empty)."""
        if token_id in self._skipped_ids:
            return ""
        self._ids.append(token_id)
        self._num_run_bytes = self._num_run_bytes + 1 if token_id in self._tokenizer.byte_fallback_ids else 0
        if 0 < self._num_run_bytes < MAX_HELD_BYTE_RUN:
            return ""  # the run may go on, and one invalid byte anywhere in it turns all of it into U+FFFD
        return self._advance(is_final=False)

    def flush(self) -> str:
        """Text still held at the end of the sequence (for example half a character the model never finished)."""
        return self._advance(is_final=True)

    def _advance(self, is_final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        prefix_offset = self._boundaries[0]
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[prefix_offset:])
        if not is_final and (len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""  # half a character (or nothing new yet): wait for the next token
        delta = new_text[len(self._prefix_text) :]
        self._read_offset = len(self._ids)
        self._boundaries.append(self._read_offset)
        self._prefix_text = None
        self._trim()
        return delta

    def _trim(self) -> None:
        """Drop ids before the window so memory and slicing stay O(window) however long the sequence grows."""
        start = self._boundaries[0]
        if start == 0:
            return
        del self._ids[:start]
        self._read_offset -= start
        self._boundaries = deque((b - start for b in self._boundaries), maxlen=NUM_CONTEXT_STEPS)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


def _fast_decode(hf_tokenizer: Any) -> Callable[..., str]:
    """decode(ids, skip_special_tokens=...) of the `tokenizers` backend itself when transformers' decode would return
    the same text (a fast tokenizer that cleans up no spaces), else transformers' decode. The backend's is 2-3x
    cheaper per call (2 against 5 us for a few ids), and the engine decodes twice per generated token."""
    backend = getattr(hf_tokenizer, "_tokenizer", None)
    if backend is None or getattr(hf_tokenizer, "clean_up_tokenization_spaces", False) or not hasattr(backend, "decode"):
        return hf_tokenizer.decode
    return backend.decode


class StopStringMatcher:
    """Holds back text that may start a stop string; reports the first stop string to complete.

    When several could match, the one that ends first wins (ties: the longer), which is what a stream would see
    first, so the result never depends on how the text was split into deltas. Nothing after a match is emitted.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._max_held = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""
        self.is_stopped = False

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Return (text safe to emit now, the stop string that just matched or None)."""
        if not self._stop:
            return delta, None
        if self.is_stopped:
            return "", None
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self._held = ""
            self.is_stopped = True
            return text[:start], stop
        num_held = self._num_held(text)
        self._held = text[len(text) - num_held :]
        return text[: len(text) - num_held], None

    def flush(self) -> str:
        """Held text at the end of the sequence when no stop string matched."""
        held, self._held = self._held, ""
        return "" if self.is_stopped else held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stop:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _num_held(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for size in range(min(len(text), self._max_held), 0, -1):
            suffix = text[-size:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return size
        return 0
