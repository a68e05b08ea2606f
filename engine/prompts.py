"""Prompts in: a prompt (text, token ids or chat messages) -> token ids, checked against the model's limits.

Needs only the tokenizer and two model facts (vocabulary size, context length), so a process that does not hold the
model (the parent of the engine-core process) prepares prompts exactly as the engine would.
"""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.tokenizer import ChatPrompt, Tokenizer

Prompt = str | list[int] | list[dict[str, Any]] | ChatPrompt  # text, token ids, chat messages, or messages and tools


def tokenize_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a text (special tokens added), of chat messages rendered by the chat template, or the ids as given."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, ChatPrompt):  # messages and the tools the template renders
        return tokenizer.apply_chat_template(prompt.messages, prompt.tools)
    if prompt and all(isinstance(m, dict) for m in prompt):
        return tokenizer.apply_chat_template(prompt)  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def check_prompt(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise InvalidRequestError (naming the field at fault) if the prompt is empty, out of vocabulary or too long."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    num_wanted = 1 if params.max_tokens is None else params.max_tokens
    if len(prompt_ids) + num_wanted > max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_model_len} tokens; the request asks for {len(prompt_ids)} "
            f"prompt tokens plus {num_wanted} to generate",
            param="max_tokens" if params.max_tokens and len(prompt_ids) < max_model_len else "prompt",
        )
