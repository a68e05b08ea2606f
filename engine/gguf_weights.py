"""A GGUF file's tensors as our Hugging Face names and canonical weights, and its ModelConfig from the GGUF metadata.

Q4_0, Q4_1 and Q8_0 blocks are re-laid out into Int4Weight / Int8Weight (engine/model/quant.py), never through floats:
the 4-bit codes and int8 values are copied bit for bit, each block's fp16 scale (and Q4_1's fp16 min) widened to fp32,
which is exact. F32/F16/BF16 tensors stay float. Other types (K-quants, I-quants) are dequantized to float32 here with
`gguf.quants.dequantize`, logged once per type. llama.cpp's converter permutes the rows of attn_q/attn_k (for its
interleaved RoPE); we undo it, and because it moves whole rows, it applies to quantized rows as they are.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from engine.gguf_file import GGUFError, GGUFFile, TensorInfo, tensor_bytes
from engine.model.config import ModelConfig
from engine.model.quant import Int4Weight, Int8Weight, QuantizedWeight

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)  # llama.cpp writes Mistral 7B models as "llama" too
GGUF_BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_FLOAT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}

Weight = torch.Tensor | QuantizedWeight


def hf_name(gguf_name: str) -> str | None:
    """token_embd.weight -> model.embed_tokens.weight, blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def gguf_model_config(gguf: GGUFFile) -> ModelConfig:
    """ModelConfig from the GGUF metadata ({arch}.block_count, .attention.head_count, ...), refusing what we do not run."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise GGUFError(f"{gguf.path.name}: GGUF architecture {arch!r} is not supported; supported: {supported}")

    def field(key: str) -> int | float:
        value = meta.get(f"{arch}.{key}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise GGUFError(f"{gguf.path.name}: GGUF metadata {arch}.{key} is missing or not a single number ({value!r})")
        return value

    if "rope_freqs.weight" in gguf.tensors:
        raise GGUFError(f"{gguf.path.name}: llama3-style RoPE frequency factors (tensor rope_freqs.weight) are not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{gguf.path.name}: RoPE scaling {scaling!r} is not supported; supported: none, linear")
    embed = gguf.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise GGUFError(f"{gguf.path.name}: tensor token_embd.weight is missing or not a matrix")
    num_heads = int(field("attention.head_count"))
    hidden_size = int(field("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden_size // num_heads)
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{gguf.path.name}: partial rotary ({arch}.rope.dimension_count != head_dim {head_dim}) is not supported")
    return ModelConfig(
        model_type="llama",
        vocab_size=embed.shape[0],
        hidden_size=hidden_size,
        intermediate_size=int(field("feed_forward_length")),
        num_hidden_layers=int(field("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv") or num_heads),
        head_dim=head_dim,
        max_position_embeddings=int(field("context_length")),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_type="linear" if scaling == "linear" else "default",
        rope_factor=float(meta.get(f"{arch}.rope.scaling.factor", 1.0)),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
    )


def gguf_weights(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, Weight]]:
    """(Hugging Face name, weight) for every tensor; a name we do not map is passed on as is (the loader reports it)."""
    logged: set[GGMLQuantizationType] = set()
    with gguf.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for info in gguf.tensors.values():
            name = hf_name(info.name) or info.name
            kind = info.tensor_type
            if kind not in (*_FLOAT_TYPES, GGMLQuantizationType.BF16, *_EXACT) and kind not in logged:
                logged.add(kind)
                logger.info("GGUF tensors of type %s are dequantized to float32 at load (first: %s)", kind.name, info.name)
            raw = tensor_bytes(data, info)  # [num_rows, row_bytes]
            num_heads = _rope_heads(name, config)
            if num_heads and len(info.shape) == 2:  # quantized rows move whole: reorder the bytes before decoding
                raw = raw[_hf_row_order(info.name, raw.shape[0], num_heads, config.head_dim)]
            try:
                weight = decode_tensor(info, raw)
            except (ValueError, TypeError, NotImplementedError) as exc:
                raise GGUFError(f"tensor {info.name} ({kind.name}, shape {info.shape}) cannot be decoded: {exc}") from exc
            if num_heads and len(info.shape) == 1 and isinstance(weight, torch.Tensor):  # a q/k bias
                weight = weight[torch.from_numpy(_hf_row_order(info.name, weight.shape[0], num_heads, config.head_dim))]
            yield name, weight


def decode_tensor(info: TensorInfo, raw: np.ndarray) -> Weight:
    """uint8 [num_rows, row_bytes] -> a float tensor in info.shape, or Int4Weight / Int8Weight for Q4_0, Q4_1, Q8_0."""
    kind = info.tensor_type
    if kind in _FLOAT_TYPES:
        return torch.from_numpy(raw.view(_FLOAT_TYPES[kind])).reshape(info.shape)
    if kind == GGMLQuantizationType.BF16:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(info.shape)
    if kind in _EXACT and len(info.shape) == 2:
        return _EXACT[kind](raw, *info.shape)
    return torch.from_numpy(gguf_dequantize(raw, kind)).reshape(info.shape)


def _block_scales(blocks: np.ndarray, begin: int) -> torch.Tensor:
    """The fp16 at byte `begin` of each block, widened (exactly) to fp32: [N, num_blocks]."""
    return torch.from_numpy(blocks[..., begin : begin + 2].copy().view(np.float16)[..., 0].astype(np.float32))


def _int4(raw: np.ndarray, n: int, k: int, has_min: bool) -> Int4Weight:
    """Q4_0 (w = d * (q - 8)) or Q4_1 (w = d * q + m). A block's byte j holds values j (low nibble) and j + 16 (high)."""
    head = 4 if has_min else 2
    blocks = raw.reshape(n, k // GGUF_BLOCK, head + GGUF_BLOCK // 2)  # [N, num_blocks, block_bytes]
    scales = _block_scales(blocks, 0)  # [N, num_blocks]
    zeros = _block_scales(blocks, 2) if has_min else -8.0 * scales  # -8 * an fp16 is exact in fp32
    codes = blocks[..., head:]  # [N, num_blocks, 16]
    q = np.concatenate([codes & 0x0F, codes >> 4], axis=-1).reshape(n, k)  # [N, K], values 0..15 in order
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K // 2]: value 2j low, 2j + 1 high (numpy: torch's uint8 ops took 5x as long)
    return Int4Weight(packed=torch.from_numpy(packed), scales=scales, zeros=zeros, group_size=GGUF_BLOCK)


def _int8(raw: np.ndarray, n: int, k: int) -> Int8Weight:
    """Q8_0: w = d * q, q int8, one fp16 d per block of 32."""
    blocks = raw.reshape(n, k // GGUF_BLOCK, 2 + GGUF_BLOCK)  # [N, num_blocks, 34]
    qweight = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(n, k))  # [N, K]
    return Int8Weight(qweight=qweight, scales=_block_scales(blocks, 0), group_size=GGUF_BLOCK)


def canonical_kind(tensor_type: GGMLQuantizationType) -> str | None:
    """ "int4" or "int8" (group 32) for the types decoded exactly into quantized weights, None for the rest (float)."""
    if tensor_type in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
        return "int4"
    return "int8" if tensor_type == GGMLQuantizationType.Q8_0 else None


_EXACT = {
    GGMLQuantizationType.Q4_0: lambda raw, n, k: _int4(raw, n, k, has_min=False),
    GGMLQuantizationType.Q4_1: lambda raw, n, k: _int4(raw, n, k, has_min=True),
    GGMLQuantizationType.Q8_0: _int8,
}


def _rope_heads(name: str, config: ModelConfig) -> int:
    """Heads of a tensor llama.cpp's converter row-permuted (q: attention heads, k: K/V heads), else 0."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.num_key_value_heads
    return 0


def _hf_row_order(name: str, num_rows: int, num_heads: int, head_dim: int) -> np.ndarray:
    """Hugging Face row -> GGUF row. Within each head, llama.cpp's converter interleaves the two rotate-half halves:
    GGUF row h*head_dim + 2i + s holds Hugging Face row h*head_dim + s*head_dim/2 + i."""
    if num_rows != num_heads * head_dim or head_dim % 2:
        raise GGUFError(f"tensor {name}: {num_rows} rows, expected {num_heads} heads x {head_dim} (an even head_dim)")
    return np.arange(num_rows).reshape(num_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)
