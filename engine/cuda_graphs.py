"""DecodeGraphs: the model's forward for pure-decode steps, captured as CUDA graphs at padded batch sizes and replayed.

CUDA only, and only on the Triton attention path (it makes no host syncs). Inputs live in static buffers; a step of n
sequences replays the smallest captured size >= n, whose padded rows write nothing (slot -1) and read nothing
(seq_len 0), and whose hidden states are dropped. Eager execution stays the reference path.
"""

from __future__ import annotations

import torch

from engine.model.attention import AttentionMetadata
from engine.model.mistral import KVCache, MistralForCausalLM


def padded_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, then every multiple of 32, up to and including max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8, 16) if b < max_num_seqs]
    sizes += list(range(32, max_num_seqs, 32))
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: MistralForCausalLM, kv_cache: KVCache, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        device = model.model.embed_tokens.weight.device
        assert device.type == "cuda", "CUDA graphs need a CUDA model"
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = padded_batch_sizes(max_num_seqs)
        max_bs = self.batch_sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        # Static inputs: every replay reads these addresses, so a step copies its values in rather than passing tensors.
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)  # one token per sequence, fixed
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # [batch_size, hidden], written by each replay
        self.num_replays = 0
        self._capture_all()

    def _meta(self, batch_size: int) -> AttentionMetadata:
        # The host-side fields are for the reference path only, which never runs on CUDA; the kernels read the tensors.
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            slot_mapping=self.slot_mapping[:batch_size],
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=[0] * batch_size,
            max_seq_len=0,
            is_decode_only=True,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for batch_size in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its memory pool
            args = (self.input_ids[:batch_size], self.positions[:batch_size], self.kv_cache, self._meta(batch_size))
            self.model(*args)  # warm-up outside capture: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[batch_size] = self.model(*args)
            pool = graph.pool()
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()

    def fits(self, num_seqs: int, num_blocks_per_seq: int) -> bool:
        return num_seqs <= self.batch_sizes[-1] and num_blocks_per_seq <= self.max_blocks_per_seq

    def replay(
        self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """One decode step of n sequences (tables padded to one width) -> hidden states [n, hidden]."""
        n = len(input_ids)
        batch_size = next(b for b in self.batch_sizes if b >= n)
        pad = batch_size - n
        _copy_in(self.input_ids[:batch_size], input_ids + [0] * pad, torch.long)
        _copy_in(self.positions[:batch_size], positions + [0] * pad, torch.long)
        _copy_in(self.slot_mapping[:batch_size], slots + [-1] * pad, torch.long)  # padded rows write nowhere
        _copy_in(self.seq_lens[:batch_size], seq_lens + [0] * pad, torch.int32)  # ... and read nothing
        _copy_in(self.block_tables[:n, : len(tables[0])], tables, torch.int32)
        self.graphs[batch_size].replay()
        self.num_replays += 1
        return self.hidden[batch_size][:n]


def _copy_in(dest: torch.Tensor, values: list[int] | list[list[int]], dtype: torch.dtype) -> None:
    dest.copy_(torch.tensor(values, dtype=dtype).pin_memory(), non_blocking=True)
