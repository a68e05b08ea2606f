"""MistralForCausalLM over a paged KV cache; serves model_type mistral and llama.

Parameter names are Hugging Face's, except that q/k/v and gate/up are fused into one matrix each at load time
(`qkv_proj`, `gate_up_proj`); the loader writes each Hugging Face tensor into its slice, see PACKED_MODULES.
Under tensor parallelism every rank builds the same classes with its share of the heads and MLP columns (parallel.py).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.attention import AttentionMetadata, paged_attention, write_kv
from engine.model.config import ModelConfig
from engine.model.cpu_layers import LayerKernel, fits
from engine.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from engine.model.lora import project
from engine.model.parallel import WHOLE, Partition, RowParallelLinear

# Hugging Face module name -> (our fused module name, shard index). Shard sizes come from the model config.
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key, value) [num_blocks, block_size, num_kv_heads, head_dim]


class MistralAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, partition: Partition) -> None:
        super().__init__()
        self.num_heads = partition.num_heads(config)  # this rank's heads (all of them without tensor parallelism)
        self.num_kv_heads = partition.num_kv_heads(config)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, partition)
        self.rotary_emb = rotary_emb

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = project(self.qkv_proj, x, meta.lora)  # [num_tokens, q_size + 2 * kv_size]
        q = self._rotate_and_write(positions, qkv, kv, meta)  # [num_tokens, num_heads, head_dim]
        out = paged_attention(q, kv[0], kv[1], meta, self.scale, self.sliding_window)  # [num_tokens, num_heads, head_dim]
        return project(self.o_proj, out.reshape(num_tokens, self.q_size), meta.lora)

    def _rotate_and_write(
        self, positions: torch.Tensor, qkv: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        """Rotary on q and k, this step's K/V written to the cache -> q rotated [num_tokens, num_heads, head_dim]."""
        kernel, cos_signed_sin = self.rotary_emb.cpu_kernel, self.rotary_emb.cos_signed_sin
        if kernel is not None and cos_signed_sin is not None and fits(qkv, *kv):  # CPU-only speedup: one C call
            return kernel.rotary_write_kv(positions, qkv, self.num_heads, cos_signed_sin, kv[0], kv[1], meta.slot_mapping)
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if q.is_cuda:  # GPU-only speedup: rotary on q and k and the K/V write in one Triton kernel, q rotated in place
            from engine.model import triton_layers  # Triton comes with CUDA builds of torch; CPU installs need not have it

            assert self.rotary_emb.cos_sin is not None, "RotaryEmbedding.build() was not called"
            triton_layers.rotary_write_kv(positions, q, k, v, self.rotary_emb.cos_sin, kv[0], kv[1], meta.slot_mapping)
        else:
            q, k = self.rotary_emb(positions, q, k)
            write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        return q


class MistralDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, partition: Partition) -> None:
        super().__init__()
        self.self_attn = MistralAttention(config, rotary_emb, partition)
        self.mlp = GatedMLP(config, partition)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings at the first layer, residual None), residual: the stream
        before it -> this layer's (MLP output, residual). Each add is done by the norm after it (fused on CUDA)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_and_norm(x, residual)
        x, residual = self.post_attention_layernorm.add_and_norm(self.self_attn(positions, x, kv, meta), residual)
        return self.mlp(x, meta.lora), residual


class MistralModel(nn.Module):
    def __init__(self, config: ModelConfig, partition: Partition) -> None:
        super().__init__()
        # _weight skips the random init: on the meta device normal_ imports torch._dynamo, 10 s on a busy 2-CPU box
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )  # weight [vocab_size, hidden]
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(
            MistralDecoderLayer(config, self.rotary_emb, partition) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        residual = None
        for layer, kv in zip(self.layers, kv_cache, strict=True):
            x, residual = layer(positions, x, residual, kv, meta)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm.add_and_norm(x, residual)[0]


class MistralForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, partition: Partition = WHOLE) -> None:
        super().__init__()
        self.config = config
        self.partition = partition
        self.model = MistralModel(config, partition)
        # Tied checkpoints have no lm_head tensor: logits use the embedding matrix. Under tensor parallelism only rank 0
        # samples, so ranks 1..N-1 hold no lm_head and never compute logits.
        has_lm_head = not config.tie_word_embeddings and partition.rank == 0
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if has_lm_head else None
        self.cpu_logits_weight: tuple[torch.Tensor, torch.Tensor] | None = None  # set by pack_cpu_logits()
        self.quant_lm_head: nn.Module | None = None  # a QuantLinear when the weights are quantized (quant_linear.py)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> fp32 logits [num_rows, vocab]."""
        if self.quant_lm_head is not None:
            return self.quant_lm_head(hidden).float()
        if self.cpu_logits_weight is not None:
            return torch._C._nn.mkldnn_linear(hidden.to_mkldnn(), *self.cpu_logits_weight).to_dense()
        return (hidden @ self.logits_weight.t()).float()

    @property
    def logits_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def pack_cpu_logits(self) -> None:
        """CPU fp32 only: a oneDNN copy of the logits matrix; its GEMM streams the 100+ MB matrix about 1.7x faster."""
        weight = self.logits_weight
        if self.quant_lm_head is not None:  # the logits come from the quantized copy
            return
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
            self.cpu_logits_weight = (weight.detach().to_mkldnn(), bias.to_mkldnn())

    def use_cpu_layer_kernel(self, kernel: LayerKernel) -> None:
        """fp32 CPU only: run the norms, the rotary and the K/V write through the C kernel of cpu_layers.py."""
        for module in self.modules():
            if isinstance(module, RMSNorm | RotaryEmbedding):
                module.cpu_kernel = kernel

    def packed_shard_sizes(self, fused_name: str) -> list[int]:
        """Rows of each Hugging Face tensor inside our fused matrix (this rank's slice of each)."""
        c, p = self.config, self.partition
        if fused_name == "qkv_proj":
            q_size, kv_size = p.num_heads(c) * c.head_dim, p.num_kv_heads(c) * c.head_dim
            return [q_size, kv_size, kv_size]
        return [p.intermediate_size(c), p.intermediate_size(c)]
