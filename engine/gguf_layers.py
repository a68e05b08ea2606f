"""A GGUF file's weights for the loader: float tensors for the float parameters, and the quantized weights put into the
model as they are, as QuantLinear layers (engine/model/quant_linear.py).

A fused projection (q/k/v, gate/up) becomes one QuantLinear when its parts share one canonical format (int4 or int8,
one group size): Q4_0 and Q4_1 parts fuse, a Q8_0 part beside them does not. Any other projection keeps the float
weights the loader already filled (F16/F32 tensors, dequantized K-quants). The embedding stays float (a lookup reads a
few rows); the logits matrix (lm_head, or the tied token embedding) is quantized when the file stores it quantized.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.gguf_file import GGUFFile, read_gguf
from engine.gguf_weights import canonical_kind, gguf_weights, hf_name
from engine.model.config import ModelConfig
from engine.model.mistral import MistralForCausalLM
from engine.model.quant import QuantizedWeight, concat_rows, dequantize
from engine.model.quant_kernels import QuantKernel, load_quant_kernel
from engine.model.quant_linear import QuantLinear

logger = logging.getLogger(__name__)

# A tensor's reader: given a tensor-parallel shard (dim, start, stop) or None, the tensor or its slice; None when a
# quantized layer takes the weight as it is (no float copy).
TensorReader = Callable[[tuple[int, int, int] | None], torch.Tensor | None]

# (module in the decoder layer, our fused projection, its Hugging Face parts)
_PROJECTIONS = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", "o_proj", ("o_proj",)),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
    ("mlp", "down_proj", ("down_proj",)),
)


def kept_quantized(gguf: GGUFFile, config: ModelConfig) -> set[str]:
    """Hugging Face names of the weights _install takes as they are (so the loader need not fill them as floats):
    the parts of each projection whose parts share one format, and an untied lm_head stored quantized."""
    kinds = {hf_name(name): canonical_kind(info.tensor_type) for name, info in gguf.tensors.items() if len(info.shape) == 2}
    kept: set[str] = set()
    for i in range(config.num_hidden_layers):
        for module_name, _, parts in _PROJECTIONS:
            names = [f"model.layers.{i}.{module_name}.{part}.weight" for part in parts]
            if kinds.get(names[0]) is not None and len({kinds.get(name) for name in names}) == 1:
                kept.update(names)
    if not config.tie_word_embeddings and kinds.get("lm_head.weight") is not None:
        kept.add("lm_head.weight")
    return kept


def _install(model: MistralForCausalLM, weights: dict[str, QuantizedWeight], kernel: QuantKernel | None) -> int:
    """Replace each projection whose parts are all in `weights` (Hugging Face names; one format, see kept_quantized) and
    the logits matrix when it is there; returns how many layers."""
    count = 0
    for i, layer in enumerate(model.model.layers):
        for module_name, fused, parts in _PROJECTIONS:
            found = [weights.get(f"model.layers.{i}.{module_name}.{part}.weight") for part in parts]
            ws = [w for w in found if w is not None]
            if len(ws) < len(parts):
                continue  # a float part, or formats that do not fuse: the float layer stays
            parent = getattr(layer, module_name)
            linear = getattr(parent, fused)
            bias = None if linear.bias is None else linear.bias.data
            setattr(parent, fused, QuantLinear(concat_rows(ws), bias, kernel, bool(getattr(linear, "is_sharded", False))))
            count += 1
    logits = weights.get("model.embed_tokens.weight" if model.lm_head is None else "lm_head.weight")
    if logits is not None:
        model.quant_lm_head = QuantLinear(logits, None, kernel)
        model.lm_head = None  # untied: the float matrix is no longer used (tied: it is the embedding, which stays)
        count += 1
    return count


def gguf_tensors(
    gguf_path: Path, model_config: ModelConfig, quantized: dict[str, QuantizedWeight] | None
) -> Iterator[tuple[str, TensorReader]]:
    """A GGUF file's tensors as float tensors (int4/int8 ones dequantized exactly). With `quantized`, the weights that
    quantized layers will take as they are (kept_quantized) go there instead, their readers returning None (no float
    copy), and a quantized tied embedding goes there too (for the logits) besides being dequantized for the lookup."""
    gguf = read_gguf(gguf_path)
    kept = kept_quantized(gguf, model_config) if quantized is not None else set()
    for name, weight in gguf_weights(gguf, model_config):
        if isinstance(weight, torch.Tensor):
            yield name, functools.partial(_slice, weight)
            continue
        if quantized is not None and (name in kept or name == "model.embed_tokens.weight"):
            quantized[name] = weight
        yield name, _filled_later if name in kept else functools.partial(_slice, dequantize(weight))


def _filled_later(shard: tuple[int, int, int] | None) -> None:
    """The reader of a weight a quantized layer takes as it is (install_quantized): nothing to copy."""


def install_quantized(
    model: MistralForCausalLM,
    quantized: dict[str, QuantizedWeight],
    kernel_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Serve a GGUF file's int4/int8 weights at their own precision, after the float load; the C kernel on CPU fp32."""
    start = time.perf_counter()
    is_cpu_fp32 = device.type == "cpu" and dtype == torch.float32
    kernel = load_quant_kernel(kernel_dir) if is_cpu_fp32 else None
    count = _install(model, quantized, kernel)
    path = "C kernel" if kernel is not None else "PyTorch dequantize + matmul"
    logger.info("GGUF: %d quantized layers serve their own int4/int8 weights (%s), set up in %.1fs", count, path,
                time.perf_counter() - start)  # fmt: skip


def _slice(tensor: torch.Tensor, shard: tuple[int, int, int] | None) -> torch.Tensor:
    if shard is None:
        return tensor
    dim, begin, end = shard
    return tensor.narrow(dim, begin, end - begin)
