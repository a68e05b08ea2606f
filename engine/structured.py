"""Structured outputs: what a request asks its output to match (StructuredOutputs), and the grammar engine that makes it.

StructuredOutputManager owns xgrammar's side: the tokenizer info, compiled grammars (compiled in a child process with a
time bound, cached LRU), one GrammarMatcher per sequence and the step's token bitmask. The sampler only applies the mask.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from engine.errors import EngineOverloadedError, InvalidRequestError
from engine.grammar_worker import GrammarCompileError, GrammarCompileTimeout, GrammarCompileWorker

MAX_TEXT_BYTES = 64 * 1024  # a schema, regex, grammar or tag longer than this is refused before compiling
COMPILE_TIMEOUT_S = 10.0  # a legitimate schema compiles in well under a second; past this it is refused
MAX_CACHE_BYTES = 256 << 20  # compiled grammars kept (xgrammar's own size estimate), least recently used evicted first


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """Exactly one constraint. Field names follow vLLM's `structured_outputs` request extra.

    json: a JSON schema (text); json_object: any JSON object; regex: a regular expression; choice: one of these
    strings; grammar: an EBNF grammar (xgrammar / GBNF syntax); structural_tag: an xgrammar structural tag (JSON text),
    free text until a trigger string, then the tag's constrained content (tool calls under tool_choice=auto).
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        kinds = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None]
        kinds += [self.grammar is not None, self.structural_tag is not None]
        if sum(kinds) != 1:
            raise InvalidRequestError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, grammar, structural_tag",
                param="structured_outputs",
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice must be a non-empty list of strings", param="structured_outputs")
        if len(self.key[1].encode("utf-8", errors="replace")) > MAX_TEXT_BYTES:
            raise InvalidRequestError(
                f"structured_outputs.{self.key[0]} is longer than {MAX_TEXT_BYTES // 1024} KiB", param="structured_outputs"
            )

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what the compiled-grammar cache is keyed by."""
        if self.json is not None:
            return ("json", self.json)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", "\x00".join(self.choice))
        if self.grammar is not None:
            return ("grammar", self.grammar)
        return ("structural_tag", self.structural_tag or "")


@dataclass(slots=True)
class TokenBitmask:
    """One step's grammar mask: bit j of row i allows token j in sampler row i. Only the constrained rows are filled and
    applied; the others stay all-allowed and are never read. (Not a gathered [num_constrained, ...] mask: on CPU, gathering
    and scattering back 8 rows of 49k logits with index_select / index_put took 16-94 ms against 2-4 ms for the kernel.)"""

    bitmask: torch.Tensor  # int32 [num_rows, ceil(vocab / 32)], CPU
    row_ids: list[int]  # the constrained sampler rows (logits rows), ascending

    def apply(self, logits: torch.Tensor) -> None:
        """logits: [num_rows, vocab]; forbidden tokens of the constrained rows become -inf, in place."""
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        indices = None if len(self.row_ids) == logits.shape[0] else self.row_ids
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)


class StructuredOutputManager:
    """Compiles and caches grammars, makes matchers, fills the step's bitmask. compile() is safe from any thread."""

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        *,
        compile_timeout_s: float = COMPILE_TIMEOUT_S,  # read at each compile
        max_cache_bytes: int = MAX_CACHE_BYTES,
    ) -> None:
        """vocab_size: the model's (its logits' width), which may exceed the tokenizer's; stop_token_ids: the EOS ids."""
        self.vocab_size = vocab_size
        self.compile_timeout_s = compile_timeout_s
        self.max_cache_bytes = max_cache_bytes
        self._hf_tokenizer = hf_tokenizer
        self._stop_token_ids = sorted(stop_token_ids)
        self._info: xgr.TokenizerInfo | None = None  # built on first use: 0.3 s that most engines never need
        self._worker: GrammarCompileWorker | None = None
        self._compile_lock = threading.Lock()  # one compile at a time (the worker serves one caller)
        self._cache_lock = threading.Lock()  # the loop thread looks up while another thread compiles
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._cache_bytes = 0
        self.num_compiles = 0

    def compile(self, structured: StructuredOutputs) -> xgr.CompiledGrammar:
        """The compiled grammar, from the cache or compiled now; raises InvalidRequestError if it cannot be compiled."""
        cached = self._lookup(structured.key)
        if cached is not None:
            return cached
        # Waiting behind another compile is bounded too: at worst one child start plus one full timeout.
        if not self._compile_lock.acquire(timeout=self.compile_timeout_s + 120.0):
            raise EngineOverloadedError("the grammar compiler is busy; retry later")
        try:
            cached = self._lookup(structured.key)  # compiled by the request we waited for
            if cached is not None:
                return cached
            kind, text = compile_args(structured)
            try:
                payload = self._compile_worker().compile(kind, text, self.compile_timeout_s)
            except GrammarCompileTimeout as exc:
                message = f"structured_outputs.{structured.key[0]} is too complex: {exc}"
                raise InvalidRequestError(message, param="structured_outputs") from exc
            except GrammarCompileError as exc:
                message = f"structured_outputs.{structured.key[0]} cannot be compiled: {short_error(str(exc))}"
                raise InvalidRequestError(message, param="structured_outputs") from exc
            compiled = xgr.CompiledGrammar.deserialize_json(payload, self._tokenizer_info())
            self.num_compiles += 1
        finally:
            self._compile_lock.release()
        self._store(structured.key, compiled)
        return compiled

    def matcher(self, structured: StructuredOutputs, stop_token_ids: Sequence[int]) -> xgr.GrammarMatcher:
        """A fresh matcher for one sequence; the grammar ends on any of stop_token_ids (the request's stop ids)."""
        compiled = self.compile(structured)  # a cache hit unless evicted since prepare(): then compiled here, bounded
        return xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids) or None)

    def fill_bitmask(self, matchers: Sequence[xgr.GrammarMatcher | None]) -> TokenBitmask | None:
        """The mask for one step's sampler rows (None: unconstrained row); None when no row needs one."""
        row_ids = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if not row_ids:
            return None
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # int32 [num_rows, ceil(vocab / 32)], all ones
        for i in row_ids:
            matcher = matchers[i]
            assert matcher is not None
            matcher.fill_next_token_bitmask(bitmask, i)
        return TokenBitmask(bitmask, row_ids)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()

    def _tokenizer_info(self) -> xgr.TokenizerInfo:
        if self._info is None:
            self._info = xgr.TokenizerInfo.from_huggingface(
                self._hf_tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
            )
        return self._info

    def _compile_worker(self) -> GrammarCompileWorker:
        if self._worker is None:
            self._worker = GrammarCompileWorker(self._tokenizer_info().serialize_json())
        return self._worker

    def _lookup(self, key: tuple[str, str]) -> xgr.CompiledGrammar | None:
        with self._cache_lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            return compiled

    def _store(self, key: tuple[str, str], compiled: xgr.CompiledGrammar) -> None:
        with self._cache_lock:
            if key in self._cache:
                return
            self._cache[key] = compiled
            self._cache_bytes += compiled.memory_size_bytes
            while self._cache_bytes > self.max_cache_bytes and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= evicted.memory_size_bytes


def compile_args(structured: StructuredOutputs) -> tuple[str, str]:
    """(worker compile kind, text) for one constraint."""
    if structured.json is not None:
        return ("json_schema", structured.json)
    if structured.json_object:
        return ("json_object", '{"type": "object"}')
    if structured.regex is not None:
        return ("regex", structured.regex)
    if structured.choice is not None:
        # JSON string literals are valid EBNF string literals (same escapes); one alternative per choice.
        return ("ebnf", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in structured.choice))
    if structured.grammar is not None:
        return ("ebnf", structured.grammar)
    return ("structural_tag", structured.structural_tag or "")


def short_error(message: str, max_chars: int = 300) -> str:
    """xgrammar's error on one line, without its timestamp, C++ source location and check expression."""
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    line = re.sub(r"^\[[\d:.]+\]\s+\S+:\d+:\s*", "", line)
    line = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", line)
    line = line.split(" The JSON string is:")[0]
    return line if len(line) <= max_chars else line[: max_chars - 3] + "..."
