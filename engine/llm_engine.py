"""LLMEngine: the synchronous core loop. add_request / step / abort; a step is schedule, run, postprocess.

Postprocess appends each sampled token, detokenizes incrementally, applies stop rules (EOS, stop token ids,
stop strings held back until they can no longer match, max_tokens, context length) and emits deltas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.embedded import cache_root
from engine.errors import InvalidRequestError
from engine.kv_cache import allocate_kv_cache, num_blocks_for
from engine.loader import load_model, read_model_config, resolve_device_dtype, resolve_model_dir
from engine.model.cpu_attention import DecodeKernel, load_decode_kernel
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, EngineStats, Logprob, RequestOutput, TokenLogprobs, Usage
from engine.sampler import SampleRow
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict[str, str]]


@dataclass(slots=True)
class _Choice:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    generator: torch.Generator | None  # a seeded request's own; unseeded choices share the sampler's
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[_Choice]
    stop_ids: frozenset[int]
    max_tokens: int
    deltas: dict[int, CompletionOutput] = field(default_factory=dict)  # this step's news, by choice index

    @property
    def is_finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


@dataclass(slots=True)
class StepResult:
    outputs: list[RequestOutput]
    failed: list[tuple[str, Exception]]  # requests that failed this step, with why


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_dir = resolve_model_dir(config)
        self.model_config = read_model_config(model_dir)
        self.device, self.dtype = resolve_device_dtype(config)
        model = load_model(model_dir, self.model_config, self.device, self.dtype)
        self.tokenizer = Tokenizer(model_dir)
        num_blocks = num_blocks_for(config, self.model_config, self.dtype, _free_cuda_bytes(config, self.device))
        capacity = num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings, capacity)
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len is above the model's max_position_embeddings ({self.model_config.max_position_embeddings})"
            )
        kv_cache = allocate_kv_cache(self.model_config, num_blocks, config.block_size, self.device, self.dtype)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            model,
            kv_cache,
            config.block_size,
            self.device,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            enforce_eager=config.enforce_eager,
            cpu_decode_kernel=self._cpu_decode_kernel(),
            seed=config.seed,
        )
        self.requests: dict[str, _Request] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        logger.info("KV cache: %d blocks of %d tokens; max_model_len %d", num_blocks, config.block_size, self.max_model_len)

    def _cpu_decode_kernel(self) -> DecodeKernel | None:
        """The C decode-attention kernel for fp32 CPU caches (built into Sirocco's cache once), or None."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        return load_decode_kernel(cache_root(self.config.cache_dir))

    # --- requests in ---------------------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.apply_chat_template(prompt)  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def prepare(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Tokenize and check a prompt; raises InvalidRequestError. Touches no engine state (any thread may call it)."""
        prompt_ids = self.tokenize(prompt)
        self._check_prompt(prompt_ids, params)
        return prompt_ids

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_s: float | None = None) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.prepare(prompt, params)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_ids)
        arrival_s = time.monotonic() if arrival_s is None else arrival_s
        stop_ids = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids)
        choices: list[_Choice] = []
        for index in range(params.n):
            leader = choices[0].seq if choices and self.config.enable_prefix_caching else None
            seq = Sequence(request_id, index, list(prompt_ids), len(prompt_ids), arrival_s, leader=leader)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(hash((params.seed, index)) & (2**63 - 1))
            detokenizer = self.tokenizer.detokenizer(prompt_ids, params.skip_special_tokens)
            choices.append(_Choice(seq, detokenizer, StopStringMatcher(params.stop_strings), generator))
        self.requests[request_id] = _Request(request_id, prompt_ids, params, choices, stop_ids, max_tokens)
        for choice in choices:
            self.scheduler.add(choice.seq)
        self.num_prompt_tokens += len(prompt_ids)

    def _check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        wanted = len(prompt_ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for {len(prompt_ids)} "
                f"prompt tokens plus {params.max_tokens or 1} to generate",
                param="max_tokens" if params.max_tokens and len(prompt_ids) < self.max_model_len else "prompt",
            )

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            for choice in request.choices:
                self.scheduler.finish(choice.seq)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # --- one step ------------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return StepResult([], [])
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = now
        sampling = [i for i in range(len(batch)) if batch.samples(i)]
        rows = [self._sample_row(batch.seqs[i]) for i in sampling]
        try:
            sampled = self.runner.execute(batch, rows)
        except Exception as exc:  # a failed forward pass fails the requests in it, not the engine
            logger.exception("step failed")
            return StepResult([], self._fail({seq.request_id for seq in batch.seqs}, exc))
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)
        touched: dict[str, _Request] = {}
        failed: list[tuple[str, Exception]] = []
        for j, i in enumerate(sampling):
            seq = batch.seqs[i]
            request = self.requests[seq.request_id]
            try:
                self._append_token(request, request.choices[seq.index], sampled.token_ids[j], sampled.logprobs[j])
            except Exception as exc:  # e.g. a tokenizer failure: this request only
                logger.exception("postprocess failed for request %s", seq.request_id)
                failed.extend(self._fail({seq.request_id}, exc))
                continue
            touched[request.request_id] = request
        return StepResult([self._collect(r) for r in touched.values() if r.request_id in self.requests], failed)

    def _sample_row(self, seq: Sequence) -> SampleRow:
        request = self.requests[seq.request_id]
        choice = request.choices[seq.index]
        return SampleRow(request.params, choice.generator, seq, request.stop_ids)

    def _append_token(self, request: _Request, choice: _Choice, token_id: int, logprobs: tuple | None) -> None:
        seq, params = choice.seq, request.params
        seq.token_ids.append(token_id)
        self.num_generation_tokens += 1
        delta = request.deltas.setdefault(seq.index, CompletionOutput(seq.index))
        delta.token_ids.append(token_id)
        if logprobs is not None:
            delta.logprobs = delta.logprobs or []
            delta.logprobs.append(self._token_logprobs(token_id, logprobs))
        text = ""
        if token_id in request.stop_ids:
            choice.finish_reason = "stop"
            choice.stop_reason = None if token_id in self.tokenizer.eos_token_ids and not params.stop_token_ids else token_id
        else:
            text = choice.detokenizer.add(token_id)
            if seq.num_output_tokens >= request.max_tokens or len(seq) >= self.max_model_len:
                choice.finish_reason = "length"
        if choice.finish_reason is not None:
            text += choice.detokenizer.flush()
        emitted, matched = choice.stop_matcher.feed(text)
        if matched is not None:
            choice.finish_reason, choice.stop_reason = "stop", matched
        elif choice.finish_reason is not None:
            emitted += choice.stop_matcher.flush()
        delta.text += emitted
        if choice.finish_reason is not None:
            delta.finish_reason = choice.finish_reason
            delta.stop_reason = choice.stop_reason
            self.scheduler.finish(seq)

    def _token_logprobs(self, token_id: int, logprobs: tuple) -> TokenLogprobs:
        sampled_lp, top_ids, top_lps = logprobs
        text = self.tokenizer.token_text
        top = [Logprob(t, text(t), lp) for t, lp in zip(top_ids, top_lps, strict=True)]
        return TokenLogprobs(Logprob(token_id, text(token_id), sampled_lp), top)

    def _collect(self, request: _Request) -> RequestOutput:
        """This step's deltas for one request; the final one carries usage and frees the request."""
        outputs = [request.deltas[i] for i in sorted(request.deltas)]
        request.deltas = {}
        output = RequestOutput(request.request_id, request.prompt_token_ids, outputs)
        if request.is_finished:
            del self.requests[request.request_id]
            first = request.choices[0].seq
            output.finished = True
            output.usage = Usage(
                prompt_tokens=len(request.prompt_token_ids),
                completion_tokens=sum(c.seq.num_output_tokens for c in request.choices),
                cached_tokens=first.num_cached_tokens,
            )
            output.queue_s = (first.first_scheduled_s or first.arrival_s) - first.arrival_s
        return output

    def _fail(self, request_ids: set[str], exc: Exception) -> list[tuple[str, Exception]]:
        for request_id in request_ids:
            self.abort(request_id)
        return [(request_id, exc) for request_id in request_ids]

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            is_alive=True,
            error=None,
            num_running=len({s.request_id for s in self.scheduler.running}),
            num_waiting=len({s.request_id for s in self.scheduler.waiting} - {s.request_id for s in self.scheduler.running}),
            num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
        )


def _free_cuda_bytes(config: EngineConfig, device: torch.device) -> int | None:
    """On CUDA: what gpu_memory_utilization leaves for the KV cache after the weights, with room for activations."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    activation_reserve = 2 << 30  # TODO(#6): measure with a profiling pass
    return max(0, int(total * config.gpu_memory_utilization) - used - activation_reserve)
