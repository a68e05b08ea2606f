"""FakeEngine: an engine.EngineClient (AsyncEngine's interface) with scripted output, for gateway tests without a model.

Choice i of a request emits tokens " t0", " t1", ... (token id 100 + j); prompt token id t has the text "<t>" and the
logprob -t / 10 (the first, as the real engine reports it, none); max_tokens 0 finishes at once with nothing.
Magic words in the prompt trigger failures:
TOO_LONG (InvalidRequestError), OVERLOAD (EngineOverloadedError), DEAD (EngineDeadError), CRASH (RuntimeError),
FAIL_MID (RequestFailedError after the first delta), SLOW (a pause before each step). A structured-outputs constraint
holding INVALID_GRAMMAR fails as the grammar engine's compile error does. `script` replaces the output: each choice
emits those text pieces, one a step, then finishes with "stop".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine import (
    ChatPrompt,
    ChatTemplateInfo,
    CompletionOutput,
    EngineStats,
    Logprob,
    Prompt,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    Usage,
)
from engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError


def _prompt_ids(prompt: Prompt) -> list[int]:
    if isinstance(prompt, ChatPrompt):
        return _prompt_ids(prompt.messages)
    if isinstance(prompt, str):
        return [len(word) for word in prompt.split()] or [0]
    if prompt and isinstance(prompt[0], dict):
        return [len(word) for message in prompt for word in message["content"].split()] or [0]
    return list(prompt)  # type: ignore[arg-type]


def _text(prompt: Prompt) -> str:
    if isinstance(prompt, ChatPrompt):
        return _text(prompt.messages)
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], dict):
        return " ".join(message["content"] for message in prompt)  # type: ignore[index]
    return ""


class FakeEngine:
    def __init__(self, max_model_len: int = 64, step_s: float = 0.0) -> None:
        self.max_model_len = max_model_len
        self.fingerprint = "fake0123456789ab"
        self.step_s = step_s
        self.is_alive = True
        self.requests: dict[str, tuple[Prompt, SamplingParams]] = {}
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.num_generation_tokens = 0
        self.chat_template_info = ChatTemplateInfo(renders_tools=False, has_tool_calls_token=False)
        self.script: list[str] | None = None

    def start(self) -> None:
        pass

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)

    def shutdown(self) -> None:
        """Like AsyncEngine.shutdown: the engine stops and later requests fail as with a dead engine."""
        self.is_alive = False

    def decode(self, token_ids: list[int]) -> str:
        return "".join(f"<{token_id}>" for token_id in token_ids)

    def tokenize(self, prompt: Prompt, *, add_special_tokens: bool, add_generation_prompt: bool = True) -> list[int]:
        """Word lengths; 1 (BOS) first with add_special_tokens, 99 last for a chat generation prompt."""
        if "TOO_LONG" in _text(prompt):
            raise InvalidRequestError("the chat template cannot render these messages", param="messages")
        is_chat = not isinstance(prompt, str)
        return [1] * add_special_tokens + _prompt_ids(prompt) + [99] * (is_chat and add_generation_prompt)

    def detokenize(self, token_ids: list[int]) -> str:
        if any(t >= 1000 for t in token_ids):
            raise InvalidRequestError("token ids must be in [0, 1000)", param="tokens")
        return self.decode(token_ids)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [f"<{token_id}>" for token_id in token_ids]

    def stats(self) -> EngineStats:
        return EngineStats(
            is_alive=self.is_alive,
            error=None,
            num_running=len(self.running),
            num_waiting=0,
            num_kv_blocks=100,
            num_free_kv_blocks=100 - len(self.running),
            kv_cache_usage=len(self.running) / 100,
            num_prompt_tokens=7,
            num_generation_tokens=self.num_generation_tokens,
            num_preemptions=0,
            prefix_cache_queries=4,
            prefix_cache_hits=2,
        )

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        text = _text(prompt)
        prompt_ids = _prompt_ids(prompt)
        if not self.is_alive or "DEAD" in text:
            raise EngineDeadError("the engine is not running")
        if "TOO_LONG" in text or len(prompt_ids) + (params.max_tokens or 0) > self.max_model_len:
            raise InvalidRequestError("prompt + max_tokens is longer than the context", param="prompt")
        if "OVERLOAD" in text:
            raise EngineOverloadedError("queue full")
        if "CRASH" in text:
            raise RuntimeError("boom")
        if params.structured_outputs is not None and "INVALID_GRAMMAR" in params.structured_outputs.key[1]:
            raise InvalidRequestError("cannot compile the grammar: INVALID_GRAMMAR", param="structured_outputs")
        self.requests[request_id] = (prompt, params)
        self.running.add(request_id)
        finished = False
        try:
            async for output in self._steps(request_id, prompt_ids, params, slow="SLOW" in text, fail="FAIL_MID" in text):
                finished = output.finished
                yield output
        finally:
            self.running.discard(request_id)
            if not finished:
                self.abort(request_id)

    async def _steps(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, slow: bool, fail: bool
    ) -> AsyncIterator[RequestOutput]:
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        prompt_logprobs = self._prompt_logprobs(prompt_ids, params)
        if max_tokens == 0:
            outputs = [CompletionOutput(index=index, finish_reason="length") for index in range(params.n)]
            usage = Usage(len(prompt_ids), 0, cached_tokens=0)
            yield RequestOutput(request_id, prompt_ids, outputs, True, usage, 0.001, prompt_logprobs=prompt_logprobs)
            return
        done = [False] * params.n
        num_tokens = 0
        for step in range(max_tokens):
            await asyncio.sleep(0.02 if slow else self.step_s)
            if fail and step == 1:
                raise RequestFailedError("injected failure")
            outputs = []
            for index in range(params.n):
                if done[index]:
                    continue
                token = f" t{step}" if self.script is None else self.script[step]
                if self.script is not None:
                    num_tokens += 1
                    done[index] = step == len(self.script) - 1
                    outputs.append(self._output(index, step, token, params, "stop" if done[index] else None))
                    continue
                if token.strip() in params.stop_strings:
                    done[index] = True
                    outputs.append(CompletionOutput(index=index, finish_reason="stop", stop_reason=token.strip()))
                    continue
                num_tokens += 1
                self.num_generation_tokens += 1
                done[index] = step == max_tokens - 1
                outputs.append(self._output(index, step, token, params, "length" if done[index] else None))
            is_finished = all(done)
            usage = Usage(len(prompt_ids), num_tokens, cached_tokens=1) if is_finished else None
            yield RequestOutput(
                request_id,
                prompt_ids,
                outputs,
                finished=is_finished,
                usage=usage,
                queue_s=0.001 if is_finished else None,
                prompt_logprobs=prompt_logprobs if step == 0 else None,
            )
            if is_finished:
                return

    @staticmethod
    def _prompt_logprobs(prompt_ids: list[int], params: SamplingParams) -> list[TokenLogprobs | None] | None:
        if params.prompt_logprobs is None:
            return None
        top = [Logprob(200 + k, f" alt{k}", -1.0 - k) for k in range(params.prompt_logprobs)]
        return [None] + [TokenLogprobs(Logprob(t, f"<{t}>", -t / 10), top) for t in prompt_ids[1:]]

    @staticmethod
    def _output(index: int, step: int, token: str, params: SamplingParams, finish_reason: str | None) -> CompletionOutput:
        logprobs = None
        if params.logprobs is not None:
            top = [Logprob(200 + k, f" alt{k}", -1.0 - k) for k in range(params.logprobs)]
            logprobs = [TokenLogprobs(sampled=Logprob(100 + step, token, -0.5), top=top)]
        return CompletionOutput(index=index, text=token, token_ids=[100 + step], logprobs=logprobs, finish_reason=finish_reason)
