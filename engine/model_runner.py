"""ModelRunner: flattens one scheduled step into model inputs + attention metadata, runs the model, samples.

Logits are computed only at the positions that sample (the last token of each sequence that reaches its end), and at
every prompt position of sequences that ask for prompt logprobs (logprobs.py scores those).
On CUDA, unless enforce_eager, pure-decode steps replay CUDA graphs (cuda_graphs.py) instead of running eagerly.
launch() queues a step on the device and returns an InFlight handle of device tensors; InFlight.result() reads them
back, the one point where the host waits for the device. execute() is both in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.cuda_graphs import DecodeGraphs
from engine.distributed import TensorParallelGroup
from engine.logprobs import PendingPromptScores, PromptScore, score_prompts
from engine.model.attention import AttentionMetadata
from engine.model.cpu_attention import DecodeKernel
from engine.model.mistral import KVCache, MistralForCausalLM
from engine.sampler import SampledTokens, Sampler, SamplerOutput, SampleRow
from engine.scheduler import ScheduledBatch
from engine.structured import TokenBitmask


@dataclass(slots=True)
class RunnerOutput:
    sampled: SamplerOutput
    prompt_scores: dict[int, list[PromptScore]] = field(default_factory=dict)  # batch index -> this step's prompt scores


@dataclass(slots=True)
class InFlight:
    """A launched step: its sampled tokens and prompt scores, still on the device."""

    sampled: SampledTokens | None  # None: no sequence samples in this step
    prompt_scores: PendingPromptScores | None

    def result(self) -> RunnerOutput:
        """Wait for the step and read its outputs back."""
        sampled = self.sampled.result() if self.sampled is not None else SamplerOutput([], [])
        return RunnerOutput(sampled, self.prompt_scores.result() if self.prompt_scores is not None else {})


class ModelRunner:
    def __init__(
        self,
        model: MistralForCausalLM,
        kv_cache: KVCache,
        block_size: int,
        device: torch.device,
        *,
        max_num_seqs: int = 1,
        max_model_len: int = 0,
        enforce_eager: bool = True,
        cpu_decode_kernel: DecodeKernel | None = None,
        tp_group: TensorParallelGroup | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed)  # seed: the shared draw of requests without their own
        self.cpu_decode_kernel = cpu_decode_kernel
        self.tp_group = tp_group  # tensor parallelism: ranks 1..N-1 get each step's inputs before rank 0 runs it
        self.decode_graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not enforce_eager:  # GPU-only speedup; eager stays the reference
            self.decode_graphs = DecodeGraphs(model, kv_cache, max_num_seqs, -(-max_model_len // block_size))

    def execute(
        self,
        batch: ScheduledBatch,
        rows: list[SampleRow],
        prompt_logprobs: list[int | None] | None = None,
        token_mask: TokenBitmask | None = None,
    ) -> RunnerOutput:
        """Run one step and wait for its outputs (launch(...).result())."""
        return self.launch(batch, rows, prompt_logprobs, token_mask).result()

    @torch.inference_mode()
    def launch(
        self,
        batch: ScheduledBatch,
        rows: list[SampleRow],
        prompt_logprobs: list[int | None] | None = None,
        token_mask: TokenBitmask | None = None,
    ) -> InFlight:
        """Queue one step on the device without waiting for it (on CPU it runs here).
        `rows` describe, in batch order, the sequences for which batch.samples(i) is true;
        `prompt_logprobs`, per batch index, the top-k of prompt logprobs to score in this step's chunk (None: none);
        `token_mask` (structured outputs) forbids tokens in some of those rows."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        query_start_loc, seq_lens, query_lens = [0], [], []
        bs = self.block_size
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + num_new])
            positions.extend(range(start, start + num_new))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + num_new))
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(start + num_new)
            query_lens.append(num_new)
            if batch.samples(i):
                sample_idx.append(query_start_loc[-1] - 1)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in batch.seqs]
        is_decode_only = len(input_ids) == len(batch.seqs)
        if is_decode_only and self.decode_graphs is not None and self.decode_graphs.fits(len(batch.seqs), max_blocks):
            hidden = self.decode_graphs.replay(input_ids, positions, slots, seq_lens, tables)
        else:
            hidden = self._run_eager(input_ids, positions, slots, query_start_loc, seq_lens, query_lens, tables)
        scores = None
        if prompt_logprobs is not None and any(k is not None for k in prompt_logprobs):
            scores = score_prompts(self.model, hidden, batch, query_start_loc, prompt_logprobs)
        if not sample_idx:
            return InFlight(None, scores)
        logits = self.model.compute_logits(hidden[self._tensor(sample_idx, torch.long)])  # [num_samples, vocab]
        return InFlight(self.sampler.sample(logits, rows, token_mask), scores)

    def _run_eager(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        query_start_loc: list[int],
        seq_lens: list[int],
        query_lens: list[int],
        tables: list[list[int]],
    ) -> torch.Tensor:
        meta = AttentionMetadata(
            query_start_loc=self._tensor(query_start_loc, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=self._tensor(tables, torch.int32),
            slot_mapping=self._tensor(slots, torch.long),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_seq_len=max(seq_lens),
            is_decode_only=len(input_ids) == len(seq_lens),
            cpu_decode_kernel=self.cpu_decode_kernel,
        )
        input_ids_t, positions_t = self._tensor(input_ids, torch.long), self._tensor(positions, torch.long)
        if self.tp_group is not None:  # every rank runs this step on its slice; a failure is RankFailedError
            return self.tp_group.run_step(self.model, input_ids_t, positions_t, self.kv_cache, meta)
        return self.model(input_ids_t, positions_t, self.kv_cache, meta)

    def _tensor(self, data: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor
