"""DecodeGraphs: the model's forward for pure-decode steps, captured as CUDA graphs at padded batch sizes and replayed.

CUDA only, and only on the Triton attention path (it makes no host syncs). The graphs read InputBatch's device
buffers, which prepare() has already filled for the step (padded to the graph's size): a replay copies nothing. A step
of n sequences replays the smallest captured size >= n, whose padded rows write nothing (slot -1) and read nothing
(seq_len 0), and whose hidden states are dropped. Eager execution stays the reference path.
"""

from __future__ import annotations

import torch

from engine.input_batch import InputBatch
from engine.model.mistral import KVCache, MistralForCausalLM


def padded_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to and including max_num_seqs: a step pads at most 7 rows.

    Cost, at max_num_seqs 256: 35 graphs where the previous 1, 2, 4, 8, 16, then every 32 took 13. Capture time grows
    with the count: each graph is one warm-up and one captured decode forward, ~10-20 ms each on Mistral-7B shapes on
    an H200, so ~1-2 s in all (an estimate; bench/gpu.py's load_seconds shows the real figure). Memory barely grows:
    the graphs share one memory pool, captured largest first, so the pool is about the largest graph's activations
    (a few [256, hidden] and [256, intermediate] tensors: tens of MiB).
    """
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: MistralForCausalLM, kv_cache: KVCache, inputs: InputBatch, max_num_seqs: int) -> None:
        assert inputs.device.type == "cuda", "CUDA graphs need a CUDA model"
        self.model = model
        self.kv_cache = kv_cache
        self.inputs = inputs
        self.batch_sizes = padded_batch_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # [batch_size, hidden], written by each replay
        self.num_replays = 0
        self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        # InputBatch's buffers start as padded decode rows (slot -1, seq_len 0): capture writes no KV and reads none.
        pool = None
        for batch_size in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its memory pool
            input_ids, positions, meta = self.inputs.decode_graph_inputs(batch_size)
            self.model(input_ids, positions, self.kv_cache, meta)  # warm-up outside capture: Triton compiles, cuBLAS picks
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[batch_size] = self.model(input_ids, positions, self.kv_cache, meta)
            pool = graph.pool()
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured batch size a decode step of num_seqs replays, or None if none is large enough."""
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def replay(self, num_seqs: int) -> torch.Tensor:
        """One decode step, its inputs already in the buffers padded to padded_size(num_seqs) -> hidden [num_seqs, hidden]."""
        batch_size = self.padded_size(num_seqs)
        assert batch_size is not None
        self.graphs[batch_size].replay()
        self.num_replays += 1
        return self.hidden[batch_size][:num_seqs]
