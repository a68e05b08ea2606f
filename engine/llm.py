"""LLM: the offline API, shaped like vLLM's. All prompts go through one engine at once and are batched."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from engine.config import EngineConfig
from engine.errors import RequestFailedError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, merge_delta
from engine.prompts import Prompt
from engine.sampling_params import SamplingParams


class LLM:
    """`LLM()` runs the embedded model; `LLM(model="mistralai/Mistral-7B-Instruct-v0.3")` a Hub or local checkpoint."""

    def __init__(self, model: str | None = None, dtype: str | None = None, device: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype or "auto", device=device, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[int] | Seq[str] | Seq[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Prompts are text or token ids; one SamplingParams for all, or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run(list(prompts), sampling_params)  # type: ignore[arg-type]

    def chat(
        self,
        conversations: list[dict[str, str]] | Seq[list[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, rendered by the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        return self._run(list(conversations), sampling_params)  # type: ignore[arg-type]

    def _run(self, prompts: list[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        order = []
        for prompt, params in zip(prompts, params_list, strict=True):
            request_id = f"llm-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, params)
            order.append(request_id)
        results: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished:
            step = self.engine.step()
            if step.failed:
                raise RequestFailedError(f"request {step.failed[0][0]} failed: {step.failed[0][1]}")
            for delta in step.outputs:
                _accumulate(results, delta)
        return [results[request_id] for request_id in order]


def _accumulate(results: dict[str, RequestOutput], delta: RequestOutput) -> None:
    total = results.setdefault(delta.request_id, RequestOutput(delta.request_id, delta.prompt_token_ids, []))
    merge_delta(total, delta)
