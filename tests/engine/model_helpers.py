"""Test helper: run our model directly over a paged cache (prefill in chunks, then token-by-token decode)."""

from __future__ import annotations

import pathlib

import torch

from engine.kv_cache import allocate_kv_cache
from engine.loader import load_model, read_model_config
from engine.model import AttentionMetadata, MistralForCausalLM
from engine.model.cpu_attention import DecodeKernel
from engine.model.cpu_layers import LayerKernel

BLOCK_SIZE = 16


def load(model_dir: pathlib.Path, layer_kernel: LayerKernel | None = None) -> MistralForCausalLM:
    """fp32 on CPU; layer_kernel: the C norms and rotary, as the engine attaches them (None: the PyTorch path)."""
    model = load_model(model_dir, read_model_config(model_dir), torch.device("cpu"), torch.float32)
    if layer_kernel is not None:
        model.use_cpu_layer_kernel(layer_kernel)
    return model


@torch.inference_mode()
def paged_logits(
    model: MistralForCausalLM, token_ids: list[int], prefill_len: int, chunk: int, decode_kernel: DecodeKernel | None = None
) -> torch.Tensor:
    """Logits at every position [len(token_ids), vocab]: the first prefill_len tokens in chunks, the rest one at a time.

    decode_kernel: the C decode-attention kernel for the single-token steps (None: the PyTorch reference path).
    Blocks are scattered (a shuffled block table) so that a wrong slot or gather cannot go unnoticed.
    """
    num_blocks = -(-len(token_ids) // BLOCK_SIZE) + 3
    kv = allocate_kv_cache(model.config, num_blocks, BLOCK_SIZE, torch.device("cpu"), torch.float32)
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))[: num_blocks - 3].tolist()
    out = []
    start = 0
    while start < len(token_ids):
        n = min(chunk, prefill_len - start) if start < prefill_len else 1
        positions = list(range(start, start + n))
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([start + n], dtype=torch.int32),
            block_tables=torch.tensor([table], dtype=torch.int32),
            slot_mapping=torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]),
            query_lens_cpu=[n],
            seq_lens_cpu=[start + n],
            max_seq_len=start + n,
            is_decode_only=n == 1,
            cpu_decode_kernel=decode_kernel,
        )
        hidden = model(torch.tensor(token_ids[start : start + n]), torch.tensor(positions), kv, meta)
        out.append(model.compute_logits(hidden))
        start += n
    return torch.cat(out)


@torch.inference_mode()
def hf_logits(model_dir: pathlib.Path, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf(torch.tensor([token_ids])).logits[0].float()
