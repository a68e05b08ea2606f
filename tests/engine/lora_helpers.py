"""Test helpers for LoRA: tiny random Llama checkpoints, PEFT adapters made at test time, and PEFT's greedy output."""

from __future__ import annotations

import pathlib

import torch

from tests.conftest import save_tiny_model

ATTENTION = ["q_proj", "v_proj"]


def write_tiny_llama(out_dir: pathlib.Path, tokenizer_dir: pathlib.Path, hidden_size: int = 64) -> pathlib.Path:
    """A tiny random LlamaForCausalLM (fixed seed) with SmolLM2's tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden_size,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    return save_tiny_model(LlamaForCausalLM, config, 1, out_dir, tokenizer_dir)


def write_adapter(
    base_dir: pathlib.Path, out_dir: pathlib.Path, rank: int, alpha: int, targets: list[str], rslora: bool, seed: int
) -> pathlib.Path:
    """A PEFT LoRA adapter on base_dir with random A and non-zero random B (PEFT starts B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def peft_greedy(base_dir: pathlib.Path, adapter_dir: pathlib.Path | None, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers + PEFT greedy continuation of `prompt` (the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()
