"""Sirocco's engine: the only names the gateway may import."""

import os

# OpenMP workers sleep between parallel regions instead of spinning, so that a team as large as the CPU count never
# holds a CPU the server's event loop needs (engine/threads.py says what spinning cost). libgomp reads this once, when
# torch loads it, which is below; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.async_engine import AsyncEngine
from engine.client import EngineClient, LoraClient
from engine.config import ConfigError, EngineConfig
from engine.errors import EngineDeadError, EngineError, EngineOverloadedError, InvalidRequestError, RequestFailedError
from engine.llm import LLM
from engine.lora import LoraError
from engine.outputs import CompletionOutput, EngineStats, Logprob, RequestOutput, TokenLogprobs, Usage
from engine.preflight import check_config
from engine.prompts import Prompt
from engine.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams
from engine.structured import StructuredOutputs
from engine.tokenizer import ChatPrompt, ChatTemplateInfo

__all__ = [
    "LLM",
    "MAX_LOGPROBS",
    "MAX_N",
    "AsyncEngine",
    "ChatPrompt",
    "ChatTemplateInfo",
    "CompletionOutput",
    "ConfigError",
    "EngineClient",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineOverloadedError",
    "EngineStats",
    "InvalidRequestError",
    "Logprob",
    "LoraClient",
    "LoraError",
    "Prompt",
    "RequestFailedError",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputs",
    "TokenLogprobs",
    "Usage",
    "check_config",
]
