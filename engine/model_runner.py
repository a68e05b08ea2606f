"""ModelRunner: one scheduled step -> model inputs + attention metadata (input_batch.py) -> the model -> the sampler.

Logits are computed only at the positions that sample (the last token of each sequence that reaches its end), and at
every prompt position of sequences that ask for prompt logprobs (logprobs.py scores those).
On CUDA, unless enforce_eager, pure-decode steps replay CUDA graphs (cuda_graphs.py) instead of running eagerly.
launch() queues a step on the device and returns an InFlight handle of device tensors; InFlight.result() reads them
back, the one point where the host waits for the device.
Look-ahead scheduling (llm_engine.py) launches a step before the previous one's result is read: `pending` names the
rows whose last input token is still on the device, in the previous step's sampled-token tensor; they get it by a
device-side copy after the inputs are uploaded (stream-ordered after that sampling; on CPU it has already run). On CUDA
the sampled tokens are then also copied to pinned host memory as soon as they are drawn, so result() waits only for
its own step and not for the one launched after it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from engine.cuda_graphs import DecodeGraphs
from engine.distributed import TensorParallelGroup
from engine.input_batch import InputBatch, StepInputs
from engine.logits_processors import on_device
from engine.logprobs import PendingPromptScores, PromptScore, score_prompts
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
class PendingInputs:
    """Look-ahead: the batch indices whose last input token is row src_rows[j] of the previous step's token_ids."""

    token_ids: torch.Tensor  # [num_samples of the previous step] int64, on the device
    batch_idx: list[int]
    src_rows: list[int]


@dataclass(slots=True)
class InFlight:
    """A launched step: its sampled tokens and prompt scores, still on the device."""

    sampled: SampledTokens | None  # None: no sequence samples in this step
    prompt_scores: PendingPromptScores | None
    token_ids: torch.Tensor | None = None  # [num_samples] the sampled tokens on the device, for a look-ahead step
    copied: torch.cuda.Event | None = None  # recorded after `sampled` was copied to pinned host memory (look-ahead)

    def result(self) -> RunnerOutput:
        """Wait for the step and read its outputs back."""
        if self.copied is not None:
            self.copied.synchronize()
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
        max_num_batched_tokens: int | None = None,  # the scheduler's token budget; None: bounded by the KV cache's slots
        enforce_eager: bool = True,
        cpu_decode_kernel: DecodeKernel | None = None,
        tp_group: TensorParallelGroup | None = None,
        seed: int = 0,
        is_look_ahead: bool = False,
        num_lora_slots: int = 0,  # the model's LoRA slots, slot 0 included; 0: no LoRA layers
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed)  # seed: the shared draw of requests without their own
        self.is_copied_out = is_look_ahead and device.type == "cuda"  # sampled tokens to pinned host memory at once
        self.tp_group = tp_group  # tensor parallelism: ranks 1..N-1 get each step's inputs before rank 0 runs it
        # A step's new tokens need KV slots of their own, so the cache's slot count bounds them when the scheduler's
        # budget is not given; the token buffers then cost 48 bytes a slot (host + device), 0.04% of a Mistral-7B slot.
        num_slots = kv_cache[0][0].shape[0] * block_size
        max_num_tokens = min(max_num_batched_tokens or num_slots, num_slots, max_num_seqs * max_model_len)
        max_blocks_per_seq = -(-max_model_len // block_size)
        self.inputs = InputBatch(
            device,
            block_size,
            max(max_num_tokens, max_num_seqs),
            max_num_seqs,
            max_blocks_per_seq,
            cpu_decode_kernel,
            num_lora_slots,
            model.model.embed_tokens.weight.dtype,
        )
        self.decode_graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not enforce_eager:  # GPU-only speedup; eager stays the reference
            self.decode_graphs = DecodeGraphs(model, kv_cache, self.inputs, max_num_seqs)

    @torch.inference_mode()
    def launch(
        self,
        batch: ScheduledBatch,
        rows: list[SampleRow],
        prompt_logprobs: list[int | None] | None = None,
        token_mask: TokenBitmask | None = None,
        pending: PendingInputs | None = None,
    ) -> InFlight:
        """Queue one step on the device without waiting for it (on CPU it runs here).
        `rows` describe, in batch order, the sequences for which batch.samples(i) is true;
        `prompt_logprobs`, per batch index, the top-k of prompt logprobs to score in this step's chunk (None: none);
        `token_mask` (structured outputs) forbids tokens in some of those rows;
        `pending` (look-ahead) the rows whose last token comes from the previous step's sampled tokens."""
        num_padded_seqs = None
        if self.decode_graphs is not None and sum(batch.num_new_tokens) == len(batch):  # pure decode: replay a graph
            num_padded_seqs = self.decode_graphs.padded_size(len(batch))
        inputs = self.inputs.prepare(batch, num_padded_seqs)
        if pending is not None and pending.batch_idx:
            _fill_pending(inputs, pending)
        if num_padded_seqs is not None and self.decode_graphs is not None:
            hidden = self.decode_graphs.replay(len(batch))
        else:
            hidden = self._run_eager(inputs)
        scores = None
        if prompt_logprobs is not None and any(k is not None for k in prompt_logprobs):
            scores = score_prompts(self.model, hidden, batch, inputs.query_start_loc_cpu, prompt_logprobs)
        if inputs.sample_idx.numel() == 0:
            return InFlight(None, scores)
        logits = self.model.compute_logits(hidden[inputs.sample_idx])  # [num_samples, vocab]
        sampled = self.sampler.sample(logits, rows, token_mask)
        if not self.is_copied_out:
            return InFlight(sampled, scores, sampled.token_ids)
        host, copied = _copy_to_host(sampled)
        return InFlight(host, scores, sampled.token_ids, copied)

    def _run_eager(self, inputs: StepInputs) -> torch.Tensor:
        if self.tp_group is not None:  # every rank runs this step on its slice; a failure is RankFailedError
            return self.tp_group.run_step(self.model, inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        return self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)


def _fill_pending(inputs: StepInputs, pending: PendingInputs) -> None:
    """Write the previous step's sampled tokens into the rows' last input positions, on the device."""
    device = inputs.input_ids.device
    starts = inputs.query_start_loc_cpu
    dst = on_device([starts[i + 1] - 1 for i in pending.batch_idx], device)  # [num_pending]
    src = on_device(pending.src_rows, device)  # [num_pending]
    inputs.input_ids.index_copy_(0, dst, pending.token_ids.index_select(0, src))


def _copy_to_host(sampled: SampledTokens) -> tuple[SampledTokens, torch.cuda.Event]:
    """Queue copies of a step's sampled tensors to pinned host memory -> the host twin and the event that ends them."""

    def to_host(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        return torch.empty(values.shape, dtype=values.dtype, pin_memory=True).copy_(values, non_blocking=True)

    host = dataclasses.replace(
        sampled,
        token_ids=to_host(sampled.token_ids),
        sampled_logprobs=to_host(sampled.sampled_logprobs),
        top_logprobs=to_host(sampled.top_logprobs),
        top_ids=to_host(sampled.top_ids),
    )
    copied = torch.cuda.Event()
    copied.record()
    return host, copied
