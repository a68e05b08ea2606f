"""GrammarCompileWorker: compiles grammars with xgrammar in a child process, so a hostile grammar costs a timeout.

xgrammar's compiler has no time bound and a Python thread cannot be stopped, so a compile that overruns kills the child
(a fresh one starts on the next compile). The child is a plain `python -c` on main() (not multiprocessing's spawn,
which re-runs the parent's main script); the compiled grammar comes back serialized as JSON. One caller at a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection

import xgrammar as xgr

# What the child compiles; each kind maps to one xgrammar GrammarCompiler method (see _compile).
COMPILE_KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")
_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parents[1])  # the child imports this same engine package


class GrammarCompileError(Exception):
    """xgrammar refused the grammar (the message is xgrammar's), or the child crashed on it."""


class GrammarCompileTimeout(Exception):
    """The compile ran past its time bound; the child was killed."""


class GrammarCompileWorker:
    """A child process holding an xgrammar GrammarCompiler for one tokenizer; started on the first compile."""

    def __init__(self, tokenizer_info_json: str, start_timeout_s: float = 120.0) -> None:
        self.tokenizer_info_json = tokenizer_info_json
        self.start_timeout_s = start_timeout_s  # importing torch + xgrammar in the child takes seconds on a busy CPU
        self._process: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._finalizer: weakref.finalize | None = None

    def compile(self, kind: str, text: str, timeout_s: float) -> str:
        """The serialized CompiledGrammar; raises GrammarCompileError, or GrammarCompileTimeout past timeout_s."""
        assert kind in COMPILE_KINDS, kind
        send, recv = self._ensure_started()
        send.send((kind, text))
        if not recv.poll(timeout_s):
            self.close()
            raise GrammarCompileTimeout(f"compiling took longer than {timeout_s:g} s")
        try:
            status, payload = recv.recv()
        except (EOFError, OSError) as exc:  # the child died (xgrammar crashed on this input, or it was killed)
            self.close()
            raise GrammarCompileError("the grammar compiler crashed on this input") from exc
        if status != "ok":
            raise GrammarCompileError(payload)
        return str(payload)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._process = self._send = self._recv = self._finalizer = None

    def _ensure_started(self) -> tuple[Connection, Connection]:
        if self._send is not None and self._recv is not None and self._process is not None and self._process.poll() is None:
            return self._send, self._recv
        self.close()
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])}
        entry = "import sys; from engine.grammar_worker import main; main(int(sys.argv[1]), int(sys.argv[2]))"
        command = [sys.executable, "-c", entry, str(to_child_r), str(to_parent_w)]
        process = subprocess.Popen(command, pass_fds=(to_child_r, to_parent_w), stdin=subprocess.DEVNULL, env=env)
        os.close(to_child_r)
        os.close(to_parent_w)
        send, recv = Connection(to_child_w, readable=False), Connection(to_parent_r, writable=False)
        self._finalizer = weakref.finalize(self, _stop, process, send, recv)
        self._process, self._send, self._recv = process, send, recv
        send.send(self.tokenizer_info_json)
        try:
            ready = recv.poll(self.start_timeout_s) and recv.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.close()
            raise RuntimeError(f"the grammar compiler process did not start within {self.start_timeout_s:g} s")
        return send, recv


def _stop(process: subprocess.Popen[bytes], send: Connection, recv: Connection) -> None:
    send.close()  # the child exits on EOF; kill it anyway in case it is stuck in a compile
    recv.close()
    if process.poll() is None:
        process.kill()
    process.wait(timeout=5)


def _serve(recv: Connection, send: Connection) -> None:
    """The child: compile what arrives, answer ("ok", serialized grammar) or ("error", message), until the pipe closes."""
    info = xgr.TokenizerInfo.deserialize_json(recv.recv())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # the parent keeps the cache
    send.send("ready")
    while True:
        try:
            kind, text = recv.recv()
        except (EOFError, OSError):
            return
        try:
            answer = ("ok", _compile(compiler, kind, text).serialize_json())
        except Exception as exc:  # xgrammar raises RuntimeError, ValueError, its own InvalidJSONError ...
            answer = ("error", str(exc))
        send.send(answer)


def _compile(compiler: xgr.GrammarCompiler, kind: str, text: str) -> xgr.CompiledGrammar:
    # Compact JSON (no free whitespace): small models otherwise emit runs of whitespace until max_tokens.
    if kind == "json_schema":
        return compiler.compile_json_schema(text, any_whitespace=False)
    if kind == "json_object":
        return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=False)
    if kind == "regex":
        return compiler.compile_regex(text)
    if kind == "ebnf":
        return compiler.compile_grammar(text)
    return compiler.compile_structural_tag(compact_json_contents(text))


def compact_json_contents(tag_text: str) -> str:
    """The structural tag with each plain JSON-schema content turned into a grammar of compact JSON (no free whitespace,
    separators "," and ":"), as json_schema outputs are: xgrammar's own allows any whitespace and no lower bound than 1
    (max_whitespace_cnt). Contents that set max_whitespace_cnt, any_order, excludes or an XML style are left as given."""
    try:
        tag = json.loads(tag_text)
    except json.JSONDecodeError:
        return tag_text  # xgrammar words the error
    return json.dumps(_compact(tag))


def _compact(node: object) -> object:
    if isinstance(node, list):
        return [_compact(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema":  # a leaf: its schema is the user's, never rewritten
        is_plain = isinstance(node.get("json_schema"), dict) and node.get("style", "json") == "json"
        if not is_plain or not node.keys() <= {"type", "json_schema", "style"}:
            return node
        grammar = xgr.Grammar.from_json_schema(json.dumps(node["json_schema"]), any_whitespace=False, separators=(",", ":"))
        return {"type": "grammar", "grammar": str(grammar)}
    return {key: _compact(value) for key, value in node.items()}


def main(recv_fd: int, send_fd: int) -> None:
    """The child's entry point (see GrammarCompileWorker._ensure_started)."""
    _serve(Connection(recv_fd, writable=False), Connection(send_fd, readable=False))
