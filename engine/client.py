"""EngineClient: what the gateway calls on an engine, declared once. AsyncEngine implements it; so do the gateway
tests' FakeEngine and the benchmarks' ZeroCostEngine, which stand in for it without a model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from engine.outputs import EngineStats, RequestOutput
from engine.prompts import Prompt
from engine.sampling_params import SamplingParams
from engine.tokenizer import ChatTemplateInfo


@runtime_checkable
class EngineClient(Protocol):
    @property
    def max_model_len(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """Changes when the model or a setting that changes outputs does (the gateway's system_fingerprint)."""
        ...

    @property
    def chat_template_info(self) -> ChatTemplateInfo: ...

    @property
    def is_alive(self) -> bool:
        """Started, running and not shut down: /health answers 200 only then."""
        ...

    def start(self) -> None: ...

    def shutdown(self) -> None:
        """Stop; pending and later requests fail with EngineDeadError."""
        ...

    def stats(self) -> EngineStats: ...

    def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; raises InvalidRequestError, EngineOverloadedError or EngineDeadError before the first.
        Closing the iterator early aborts the request."""
        ...

    def abort(self, request_id: str) -> None: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def tokenize(
        self, prompt: str | list[dict[str, str]], *, add_special_tokens: bool, add_generation_prompt: bool = True
    ) -> list[int]: ...

    def detokenize(self, token_ids: list[int]) -> str: ...

    def token_texts(self, token_ids: list[int]) -> list[str]: ...


@runtime_checkable
class LoraClient(Protocol):
    """An engine that serves LoRA adapters beside its base model (AsyncEngine); the gateway offers them when it is one."""

    lora_names: list[str]  # served adapters, in load order

    async def load_lora_adapter(self, name: str, path: str) -> None: ...

    async def unload_lora_adapter(self, name: str) -> None: ...
