"""LLMEngine: the synchronous core loop. add_request / step / abort; a step is schedule, run, postprocess.

Postprocess has two halves. The fast one appends each sampled token, advances the grammar and finishes choices by stop
token, max_tokens or context length: all the next schedule and sampler read. The slow one detokenizes incrementally,
applies stop strings (held back until they can no longer match) and emits deltas. With async output (on CUDA) the slow
half of step N-1 runs while the device runs step N; a stop string then may end a choice whose next token is already in
flight, and that token is dropped. Logprobs entries describe exactly the text emitted: a stop token gets none, and an
entry waits for its text (logprobs.py).

Look-ahead scheduling (EngineConfig.async_scheduling) also takes the wait for step N off the device's path: step()
advances step N's sequences as if it were done (computed tokens, a PENDING_TOKEN_ID placeholder for each token it
samples), schedules and launches step N+1, whose pending input tokens are copied from N's sampled tokens on the device,
and only then waits for N and runs both its postprocess halves, replacing the placeholders. A choice that N finishes
(stop token or string, abort, failure) has its N+1 token dropped, as above. No placeholder is added for a token that
will end its choice by length, so nothing is scheduled past max_tokens or the context. A step looks ahead only when no
live request needs the previous token on the host before the next launch (_blocks_look_ahead: structured outputs,
penalties, n > 1, prompt logprobs) and without tensor parallelism; otherwise it runs in the order above. Step N's
full blocks enter the prefix cache when N is read back, after N+1 was scheduled: a request admitted into N+1 cannot
reuse them (it computes them itself, with the same result).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.distributed import TensorParallelGroup
from engine.errors import InvalidRequestError, RankFailedError
from engine.fingerprint import engine_fingerprint
from engine.kv_cache import num_blocks_for
from engine.loader import check_max_model_len, read_model_config, resolve_device_dtype, resolve_model_dir
from engine.logprobs import PromptLogprobs
from engine.lora import LoraAdapter, LoraError, LoraRegistry, LoraSlots, parse_lora_modules, resolve_adapter_dir
from engine.memory_profile import cuda_kv_cache_bytes
from engine.model.mistral import MistralForCausalLM
from engine.model_runner import ModelRunner, PendingInputs
from engine.outputs import CompletionOutput, EngineStats, Logprob, RequestOutput, TokenLogprobs, Usage
from engine.prompts import Prompt, check_prompt, tokenize_prompt
from engine.rank import Rank, RankSpec, build_rank
from engine.request_state import Accepted, Choice, Launched, Request, StepWork
from engine.sampler import SampleRow
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import PENDING_TOKEN_ID, Sequence
from engine.structured import StructuredOutputManager
from engine.threads import SMALL_STEP_TOKENS, StepThreads, set_torch_threads
from engine.tokenizer import StopStringMatcher, Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepResult:
    outputs: list[RequestOutput]
    failed: list[tuple[str, Exception]]  # requests that failed this step, with why


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device, self.dtype = resolve_device_dtype(config)
        self.step_threads: StepThreads | None = None  # CPU: one thread for small steps, the whole team for the others
        if self.device.type == "cpu":
            self.step_threads = StepThreads(set_torch_threads(config.num_threads))
            logger.info("torch threads: %d (1 for steps under %d tokens)", self.step_threads.num_threads, SMALL_STEP_TOKENS)
        model_dir = resolve_model_dir(config)
        self.model_dir = model_dir
        self.model_config = read_model_config(model_dir)
        check_max_model_len(config, self.model_config)  # before the weights: a bad setting fails in a second
        self.lora_registry: LoraRegistry | None = None
        if config.is_lora_enabled:  # adapters are read and checked before the weights: a bad one fails in a second
            self.lora_registry = LoraRegistry(self.model_config, config.max_lora_rank, config.max_cpu_loras or config.max_loras)
            for name, path in parse_lora_modules(config.lora_modules).items():
                self.lora_registry.add(name, resolve_adapter_dir(path, config.download_dir, config.hf_token))
        spec = RankSpec.first(config, model_dir, self.model_config, self.device, self.dtype)  # this process is rank 0
        rank = build_rank(spec, self._size_kv_cache)
        self.lora_slots: LoraSlots | None = None
        if self.lora_registry is not None and rank.lora_layers is not None:
            self.lora_slots = LoraSlots(config.max_loras, self.lora_registry, lambda slot, a: self._load_lora(rank, slot, a))
        start_s = time.perf_counter()
        self.tokenizer = Tokenizer(model_dir)
        logger.info("loaded the tokenizer in %.1fs", time.perf_counter() - start_s)
        self.structured = StructuredOutputManager(
            self.tokenizer.hf_tokenizer, self.model_config.vocab_size, sorted(self.tokenizer.eos_token_ids)
        )
        capacity = rank.num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings, capacity)
        logger.info("max_model_len %d", self.max_model_len)
        self.fingerprint = engine_fingerprint(config, model_dir, self.dtype, self.device, self.max_model_len)
        self.block_manager = BlockManager(rank.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.lora_slots)
        self.tp_group: TensorParallelGroup | None = None
        if config.tensor_parallel_size > 1:  # starts ranks 1..N-1; raises RankFailedError, leaving no process behind
            self.tp_group = TensorParallelGroup(config, spec, rank)
        self.runner = ModelRunner(
            rank.model,
            rank.kv_cache,
            config.block_size,
            self.device,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            # no CUDA graphs across ranks, nor with LoRA (the graphs are captured without adapter rows) (yet)
            enforce_eager=config.enforce_eager or self.tp_group is not None or self.lora_slots is not None,
            cpu_decode_kernel=rank.kernel,
            tp_group=self.tp_group,
            seed=config.seed,
            is_look_ahead=config.async_scheduling,
            num_lora_slots=config.max_loras + 1 if self.lora_slots is not None else 0,
        )
        self.requests: dict[str, Request] = {}
        self.can_look_ahead = config.async_scheduling and self.tp_group is None  # no look-ahead across ranks (yet)
        is_async_output = config.async_output
        if is_async_output is None:  # on CPU the launch runs the forward itself: nothing to overlap with, but look-ahead
            is_async_output = self.can_look_ahead or (self.device.type == "cuda" and self.tp_group is None)
        self.is_async_output = is_async_output
        self._look_ahead_blockers: dict[str, Request] = {}  # live requests that need each token on the host
        self.num_look_ahead_steps = 0  # steps that launched the next one before finishing the one in flight
        self._in_flight: Launched | None = None
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def _load_lora(self, rank: Rank, slot: int, adapter: LoraAdapter) -> None:
        """Write an adapter into `slot` on every rank: ranks 1..N-1 receive it before the step that first uses it."""
        if self.tp_group is not None:
            self.tp_group.load_lora(slot, adapter)
        rank.load_lora(slot, adapter.weights)

    def _size_kv_cache(self, model: MistralForCausalLM, num_kv_heads: int) -> int:
        """KV blocks per rank: from the settings, or from what a profiled step leaves of the GPU (memory_profile.py)."""
        free_bytes = cuda_kv_cache_bytes(self.config, model, self.model_config, num_kv_heads)
        return num_blocks_for(self.config, self.model_config, self.dtype, free_bytes, num_kv_heads)

    # --- requests in ---------------------------------------------------------------------------------------

    def prepare(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Tokenize and check a prompt, compile its grammar; raises InvalidRequestError. Any thread may call it."""
        prompt_ids = tokenize_prompt(self.tokenizer, prompt)
        check_prompt(prompt_ids, params, self.vocab_size, self.max_model_len)
        if params.structured_outputs is not None:  # compiled (and cached) here, off the loop thread under AsyncEngine
            self.structured.compile(params.structured_outputs)
        return prompt_ids

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_s: float | None = None) -> None:
        """Prepare the prompt, then add it; raises InvalidRequestError."""
        if request_id in self.requests:  # before preparing: the prompt may take a while to tokenize
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.add_prepared(request_id, self.prepare(prompt, params), params, arrival_s)

    def add_prepared(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival_s: float | None = None
    ) -> None:
        """Add a request whose prompt prepare() (or a client holding the same facts) already tokenized and checked."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        arrival_s = time.monotonic() if arrival_s is None else arrival_s
        lora_id = self._lora_id(params.lora)
        stop_ids = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids)
        is_scoring = params.prompt_logprobs is not None
        choices: list[Choice] = []
        for index in range(params.n):
            # Followers wait for choice 0's prompt, so the first delta carries its scores (and they reuse its blocks).
            leader = choices[0].seq if choices and (self.config.enable_prefix_caching or is_scoring) else None
            seq = Sequence(request_id, index, list(prompt_ids), len(prompt_ids), arrival_s, leader=leader, lora_id=lora_id)
            seq.is_scoring_prompt = is_scoring and index == 0
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(hash((params.seed, index)) & (2**63 - 1))
            detokenizer = self.tokenizer.detokenizer(prompt_ids, params.skip_special_tokens)
            matcher = None
            if params.structured_outputs is not None:
                matcher = self.structured.matcher(params.structured_outputs, stop_ids)
            choices.append(Choice(seq, detokenizer, StopStringMatcher(params.stop_strings), generator, matcher))
        prompt_logprobs = PromptLogprobs(prompt_ids) if is_scoring else None
        request = Request(request_id, prompt_ids, params, choices, stop_ids, max_tokens, prompt_logprobs)
        self.requests[request_id] = request
        if _blocks_look_ahead(params):
            self._look_ahead_blockers[request_id] = request
        for choice in choices:
            self.scheduler.add(choice.seq)
        self.num_prompt_tokens += len(prompt_ids)

    def _lora_id(self, name: str | None) -> int:
        """The adapter a request names -> its id (0: the base model); raises InvalidRequestError when not served."""
        if name is None:
            return 0
        if self.lora_registry is None:
            raise InvalidRequestError(f"LoRA adapter {name!r} asked for, but this server runs no adapters", param="model")
        try:
            return self.lora_registry.lora_id(name)
        except LoraError as exc:
            raise InvalidRequestError(str(exc), param="model") from exc

    # --- LoRA adapters -------------------------------------------------------------------------------------

    @property
    def lora_names(self) -> list[str]:
        """The adapters served, in load order."""
        return list(self.lora_registry.ids) if self.lora_registry is not None else []

    def add_lora(self, name: str, path: str) -> None:
        """Load and check an adapter and serve it as `name`; raises LoraError. Call it on the loop's thread."""
        self._enabled_registry().add(name, resolve_adapter_dir(path, self.config.download_dir, self.config.hf_token))

    def remove_lora(self, name: str) -> None:
        """Stop serving an adapter; its running requests finish with it. Raises LoraError when it is not served."""
        lora_id = self._enabled_registry().remove(name)
        if self.lora_slots is not None:
            self.lora_slots.forget(lora_id)

    def _enabled_registry(self) -> LoraRegistry:
        if self.lora_registry is None:
            raise LoraError("LoRA is not enabled (set lora_modules or enable_lora_runtime_updates)")
        return self.lora_registry

    def abort(self, request_id: str) -> None:
        """Forget a request; a token of it still in flight is dropped when its step is finished."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            for choice in request.choices:
                self.scheduler.finish(choice.seq)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (token ids are in [0, vocab_size)); the engine-core client has the same fact."""
        return self.model_config.vocab_size

    @property
    def has_unfinished(self) -> bool:
        """Whether step() has work: a sequence to schedule, or a step in flight with a live sequence (a step whose
        sequences all finished or were aborted meanwhile is dropped by the next step(), whenever that comes)."""
        return self.scheduler.has_work or (self._in_flight is not None and self._in_flight.has_live_seqs)

    # --- one step ------------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """One step. With async output: finish the step in flight (wait for it, fast postprocess), launch the next one,
        then the slow postprocess of the finished one while the device runs the next. Without: launch, finish, slow.
        A look-ahead step (async_scheduling, _is_look_ahead_step): launch the next one first, then finish, then slow."""
        failed: list[tuple[str, Exception]] = []
        if self._is_look_ahead_step():
            return self._look_ahead_step(failed)
        finished = self._finish_in_flight(failed)  # step N-1: everything step N's schedule and sampler read
        self._launch(failed)  # step N: queued on the device, not waited for
        if not self.is_async_output:
            later = self._finish_in_flight(failed)
            finished.accepted += later.accepted
            finished.prompt_scores += later.prompt_scores
        return StepResult(self._emit(finished, failed), failed)

    def _look_ahead_step(self, failed: list[tuple[str, Exception]]) -> StepResult:
        """Advance step N as if done, launch step N+1 on N's tokens still on the device, then finish and emit N."""
        launched, self._in_flight = self._in_flight, None
        assert launched is not None
        self.num_look_ahead_steps += 1
        self._advance(launched)
        self._launch(failed, ahead_of=launched)
        finished = self._finish(launched, failed)
        return StepResult(self._emit(finished, failed), failed)

    def _is_look_ahead_step(self) -> bool:
        """Whether this step may launch the next one before the step in flight is finished: look-ahead is on, a step
        is in flight, and no live request needs its tokens on the host first."""
        if not self.can_look_ahead or self._in_flight is None:
            return False
        blockers = self._look_ahead_blockers
        for request_id in [r for r, request in blockers.items() if not self._is_live(request)]:
            del blockers[request_id]
        return not blockers

    def _advance(self, launched: Launched) -> None:
        """Count a step in flight as done for the next schedule: its computed tokens, and a placeholder for each token
        it samples, unless that token ends the choice by length (then nothing more is scheduled for it)."""
        batch = launched.batch
        launched.is_advanced = True
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if not seq.is_finished:
                seq.num_computed_tokens += num_new
        for i in launched.sampling:
            seq = batch.seqs[i]
            if seq.is_finished:
                continue
            if not self._ends_by_length(self.requests[seq.request_id], seq, num_more=1):
                seq.token_ids.append(PENDING_TOKEN_ID)
                seq.has_pending_token = True

    def _launch(self, failed: list[tuple[str, Exception]], ahead_of: Launched | None = None) -> None:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = now
        if self.step_threads is not None:
            self.step_threads.fit(sum(batch.num_new_tokens))
        sampling = [i for i in range(len(batch)) if batch.samples(i)]
        rows = [self._sample_row(batch.seqs[i]) for i in sampling]
        ks = [self.requests[seq.request_id].params.prompt_logprobs if seq.is_scoring_prompt else None for seq in batch.seqs]
        try:
            token_mask = self.structured.fill_bitmask([self._choice(row.seq).matcher for row in rows])
            # Blocks freed while this step is in flight (a stop string, an abort) may be given to the next step's
            # sequences: safe, because the device runs steps in stream order (and on CPU this call ran the forward).
            pending = None if ahead_of is None else _pending_inputs(batch, ahead_of)
            handle = self.runner.launch(batch, rows, ks, token_mask, pending)
        except RankFailedError:
            raise  # tensor-parallel ranks out of step: the engine cannot go on
        except Exception as exc:  # a failed forward pass fails the requests in it, not the engine
            logger.exception("step failed")
            failed.extend(self._fail({seq.request_id for seq in batch.seqs}, exc))
            return
        self._in_flight = Launched(batch, sampling, handle)

    def _finish_in_flight(self, failed: list[tuple[str, Exception]]) -> StepWork:
        """Wait for the step in flight, if any, and run its fast postprocess. A sequence finished meanwhile (a stop
        string in the previous step's text, an abort, a failure) is skipped: its result in this step is dropped."""
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            return StepWork()
        return self._finish(launched, failed)

    def _finish(self, launched: Launched, failed: list[tuple[str, Exception]]) -> StepWork:
        """Wait for a launched step and run its fast postprocess (see _finish_in_flight)."""
        finished = StepWork()
        batch = launched.batch
        try:
            out = launched.handle.result()
        except RankFailedError:
            raise
        except Exception as exc:
            logger.exception("step failed")
            failed.extend(self._fail({seq.request_id for seq in batch.seqs if not seq.is_finished}, exc))
            return finished
        for i, scores in out.prompt_scores.items():
            if not batch.seqs[i].is_finished:
                finished.prompt_scores.append((self.requests[batch.seqs[i].request_id], scores))
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.is_finished:
                continue
            if not launched.is_advanced:
                seq.num_computed_tokens += num_new
            seq.is_scoring_prompt = seq.is_scoring_prompt and seq.num_computed_tokens < seq.num_prompt_tokens
            self.block_manager.cache_full_blocks(seq)
        sampled = out.sampled
        for j, i in enumerate(launched.sampling):
            seq = batch.seqs[i]
            if seq.is_finished:  # also every choice of a request failed earlier in this loop
                continue
            request = self.requests[seq.request_id]
            try:
                token_id, logprobs = sampled.token_ids[j], sampled.logprobs[j]
                finished.accepted.append(self._accept_token(request, request.choices[seq.index], token_id, logprobs))
            except Exception as exc:  # e.g. a token outside the grammar: this request only
                logger.exception("postprocess failed for request %s", seq.request_id)
                failed.extend(self._fail({seq.request_id}, exc))
        return finished

    def _emit(self, finished: StepWork, failed: list[tuple[str, Exception]]) -> list[RequestOutput]:
        """The slow postprocess of a finished step -> the outputs of the requests it touched."""
        for request, scores in finished.prompt_scores:
            if self._is_live(request):
                assert request.prompt_logprobs is not None
                request.prompt_logprobs.record(scores, request.prompt_token_ids, self.tokenizer.token_text)
        touched: dict[str, Request] = {}
        for accepted in finished.accepted:
            request = accepted.request
            if not self._is_live(request):  # failed since its token was accepted
                continue
            try:
                self._emit_token(accepted)
            except Exception as exc:  # e.g. a tokenizer failure: this request only
                logger.exception("postprocess failed for request %s", request.request_id)
                failed.extend(self._fail({request.request_id}, exc))
                continue
            touched[request.request_id] = request
        return [self._collect(r) for r in touched.values() if self._is_live(r)]

    def _is_live(self, request: Request) -> bool:
        return self.requests.get(request.request_id) is request

    def _sample_row(self, seq: Sequence) -> SampleRow:
        request = self.requests[seq.request_id]
        choice = request.choices[seq.index]
        return SampleRow(request.params, choice.generator, seq, request.stop_ids)

    def _choice(self, seq: Sequence) -> Choice:
        return self.requests[seq.request_id].choices[seq.index]

    def _accept_token(self, request: Request, choice: Choice, token_id: int, logprobs: tuple | None) -> Accepted:
        """The fast postprocess of one sampled token: the token, the grammar, and finishing by stop token or length."""
        if request.max_tokens == 0:  # scoring only: the prompt is done, nothing is generated
            self._finish_choice(choice, "length")
            return Accepted(request, choice, None, None, False)
        seq = choice.seq
        if seq.has_pending_token:  # look-ahead: the next step already read it on the device
            seq.token_ids[-1], seq.has_pending_token = token_id, False
        else:
            seq.token_ids.append(token_id)
        self.num_generation_tokens += 1
        # The grammar saw every earlier output token; preemption recomputes KV but keeps them, so no rollback is needed.
        if choice.matcher is not None and not choice.matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} does not fit the request's structured_outputs grammar (min_tokens?)")
        # A stop token, or the one that completes the grammar, ends the choice and is not part of its text.
        is_stop_token = token_id in request.stop_ids or (choice.matcher is not None and choice.matcher.is_terminated())
        if is_stop_token:
            is_eos = token_id in self.tokenizer.eos_token_ids and not request.params.stop_token_ids
            choice.stop_reason = None if is_eos else token_id
            self._finish_choice(choice, "stop")
        elif self._ends_by_length(request, seq):
            self._finish_choice(choice, "length")
        return Accepted(request, choice, token_id, logprobs, is_stop_token)

    def _ends_by_length(self, request: Request, seq: Sequence, num_more: int = 0) -> bool:
        """Whether the sequence, `num_more` tokens from now, is at its max_tokens or at the context length."""
        return seq.num_output_tokens + num_more >= request.max_tokens or len(seq) + num_more >= self.max_model_len

    def _emit_token(self, accepted: Accepted) -> None:
        """The slow postprocess of one accepted token: its text, stop strings, logprobs entries, into the delta."""
        request, choice, token_id = accepted.request, accepted.choice, accepted.token_id
        delta = request.deltas.setdefault(choice.seq.index, CompletionOutput(choice.seq.index))
        if token_id is not None:
            delta.token_ids.append(token_id)
            text = "" if accepted.is_stop_token else choice.detokenizer.add(token_id)
            if choice.finish_reason is not None:
                text += choice.detokenizer.flush()
            if accepted.logprobs is not None and not accepted.is_stop_token:  # a stop token is not part of the text
                choice.held_logprobs.add(self._token_logprobs(token_id, accepted.logprobs), text)
            emitted, matched = choice.stop_matcher.feed(text)
            if matched is not None:  # the choice's next token may be in flight: _finish_in_flight drops it
                choice.stop_reason = matched
                self._finish_choice(choice, "stop")
            elif choice.finish_reason is not None:
                emitted += choice.stop_matcher.flush()
            delta.text += emitted
            if request.params.logprobs is not None:
                released = choice.held_logprobs.release(emitted, choice.finish_reason is not None, matched is not None)
                delta.logprobs = (delta.logprobs or []) + released
        if choice.finish_reason is not None:
            delta.finish_reason, delta.stop_reason = choice.finish_reason, choice.stop_reason

    def _finish_choice(self, choice: Choice, reason: str) -> None:
        """Set the finish reason and free the choice's blocks at once (they may go to the very next step)."""
        choice.finish_reason = reason
        if not choice.seq.is_finished:
            self.scheduler.finish(choice.seq)

    def _token_logprobs(self, token_id: int, logprobs: tuple) -> TokenLogprobs:
        sampled_lp, top_ids, top_lps = logprobs
        text = self.tokenizer.token_text
        top = [Logprob(t, text(t), lp) for t, lp in zip(top_ids, top_lps, strict=True)]
        return TokenLogprobs(Logprob(token_id, text(token_id), sampled_lp), top)

    def _collect(self, request: Request) -> RequestOutput:
        """This step's deltas for one request; the final one carries usage and frees the request."""
        outputs = [request.deltas[i] for i in sorted(request.deltas)]
        request.deltas = {}
        output = RequestOutput(request.request_id, request.prompt_token_ids, outputs)
        scored = request.prompt_logprobs
        if scored is not None and not scored.is_sent and not request.choices[0].seq.is_scoring_prompt:
            output.prompt_logprobs, scored.is_sent = scored.entries, True
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

    def close(self) -> None:
        """Stop the helper processes (tensor-parallel ranks, the grammar compiler). Idempotent; no step afterwards."""
        self.structured.close()
        if self.tp_group is not None:
            self.tp_group.close()

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
            max_loras=self.config.max_loras if self.lora_registry is not None else 0,
            running_lora_adapters=self._lora_names_of(self.scheduler.running),
            waiting_lora_adapters=self._lora_names_of(self.scheduler.waiting),
        )

    def _lora_names_of(self, seqs: Iterable[Sequence]) -> tuple[str, ...]:
        if self.lora_registry is None:
            return ()
        names = {lora_id: name for name, lora_id in self.lora_registry.ids.items()}
        return tuple(sorted({names[s.lora_id] for s in seqs if s.lora_id in names}))


def _blocks_look_ahead(params: SamplingParams) -> bool:
    """Whether a request needs each sampled token on the host before the next step launches: its grammar accepts it
    before the next bitmask, penalties read output tokens, followers (n > 1) wait for choice 0's cached prompt blocks,
    prompt scores are read per chunk."""
    is_penalized = params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)
    return params.structured_outputs is not None or is_penalized or params.n > 1 or params.prompt_logprobs is not None


def _pending_inputs(batch: ScheduledBatch, previous: Launched) -> PendingInputs | None:
    """The rows of a look-ahead step whose last token is a placeholder, and where the previous step sampled it."""
    token_ids = previous.handle.token_ids
    if token_ids is None:
        return None
    src_row = {previous.batch.seqs[i].seq_id: j for j, i in enumerate(previous.sampling)}
    batch_idx = [i for i, seq in enumerate(batch.seqs) if seq.has_pending_token]
    return PendingInputs(token_ids, batch_idx, [src_row[batch.seqs[i].seq_id] for i in batch_idx])
