"""Tiny Llama-shaped GGUF files written at test time with gguf.GGUFWriter, laid out as llama.cpp's converter writes them."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

Q = GGMLQuantizationType
HIDDEN, INTERMEDIATE, NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
# One file covers every exact decoder (Q4_0, Q4_1, Q8_0, F16, F32); the parts of each fused projection (q/k/v,
# gate/up) share one canonical format (Q4_0 and Q4_1 are both int4, group 32), so each can run as one quantized layer.
LAYER_TYPES = {
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.Q4_0,
    "attn_output": Q.Q8_0,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q4_0,
    "ffn_down": Q.Q8_0,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for q/k (its RoPE pairs neighbours; Hugging Face's pairs the two halves)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of llama_cpp_permute, written independently of the code under test."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_weights(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in Hugging Face row order (before llama.cpp's q/k permutation)."""
    rng = np.random.default_rng(seed)

    def matrix(n: int, k: int) -> np.ndarray:
        return (rng.standard_normal((n, k)) * 0.1).astype(np.float32)

    out = {"token_embd.weight": matrix(vocab_size, HIDDEN), "output_norm.weight": 1 + matrix(1, HIDDEN)[0]}
    out["output.weight"] = matrix(vocab_size, HIDDEN)
    shapes = {
        "attn_q": (NUM_HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (NUM_KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (NUM_KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, NUM_HEADS * HEAD_DIM),
        "ffn_gate": (INTERMEDIATE, HIDDEN),
        "ffn_up": (INTERMEDIATE, HIDDEN),
        "ffn_down": (HIDDEN, INTERMEDIATE),
    }
    for layer in range(NUM_LAYERS):
        for name, shape in shapes.items():
            out[f"blk.{layer}.{name}.weight"] = matrix(*shape)
        out[f"blk.{layer}.attn_norm.weight"] = 1 + matrix(1, HIDDEN)[0]
        out[f"blk.{layer}.ffn_norm.weight"] = 1 + matrix(1, HIDDEN)[0]
    return out


def tensor_type(name: str, layer_types: dict[str, GGMLQuantizationType] | None = None) -> GGMLQuantizationType:
    if name == "token_embd.weight":
        return Q.F16
    if name == "output.weight":
        return Q.Q8_0
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    return {**LAYER_TYPES, **(layer_types or {})}.get(kind, Q.F32)


def write_tiny_gguf(
    path: pathlib.Path,
    vocab_size: int,
    tokenizer_dir: pathlib.Path | None = None,
    layer_types: dict[str, GGMLQuantizationType] | None = None,
) -> pathlib.Path:
    """A tiny Llama GGUF at `path` (q/k rows permuted like llama.cpp's converter, mixed tensor types, LAYER_TYPES
    updated by `layer_types`); with `tokenizer_dir`, its tokenizer files are copied beside it (the GGUF itself then
    carries no tokenizer)."""
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(NUM_LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(vocab_size)
    for name, weight in random_weights(vocab_size).items():
        if ".attn_q." in name:
            weight = llama_cpp_permute(weight, NUM_HEADS)
        elif ".attn_k." in name:
            weight = llama_cpp_permute(weight, NUM_KV_HEADS)
        kind = tensor_type(name, layer_types)
        if kind == Q.F32:
            writer.add_tensor(name, weight)
        elif kind == Q.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(weight, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, path.parent / name)
    return path
