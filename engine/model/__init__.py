"""The Mistral-family model (Llama included) over a paged KV cache. Imports only torch."""

from engine.model.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.mistral import MistralForCausalLM

__all__ = ["AttentionMetadata", "MistralForCausalLM", "ModelConfig"]
