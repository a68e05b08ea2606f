"""The engine's per-request and per-step records: a request's choices and their decoding state, the tokens one step's
fast postprocess accepted for the slow one, and the step in flight on the device (llm_engine.py drives them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import xgrammar as xgr

from engine.logprobs import HeldLogprobs, PromptLogprobs, PromptScore
from engine.model_runner import InFlight
from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.tokenizer import IncrementalDetokenizer, StopStringMatcher


@dataclass(slots=True)
class Choice:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    generator: torch.Generator | None  # a seeded request's own; unseeded choices share the sampler's
    matcher: xgr.GrammarMatcher | None = None  # structured outputs: the grammar state, advanced with every output token
    held_logprobs: HeldLogprobs = field(default_factory=HeldLogprobs)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[Choice]
    stop_ids: frozenset[int]
    max_tokens: int
    prompt_logprobs: PromptLogprobs | None  # when asked; scored by choice 0 while it prefills
    deltas: dict[int, CompletionOutput] = field(default_factory=dict)  # this step's news, by choice index

    @property
    def is_finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


@dataclass(slots=True)
class Accepted:
    """A token the fast postprocess took, waiting for the slow one (text, stop strings, logprobs entries, delta)."""

    request: Request
    choice: Choice
    token_id: int | None  # None: a scoring-only request (max_tokens 0) whose prompt is done, nothing generated
    logprobs: tuple | None
    is_stop_token: bool


@dataclass(slots=True)
class StepWork:
    """What the fast postprocess of one step leaves to the slow one."""

    accepted: list[Accepted] = field(default_factory=list)
    prompt_scores: list[tuple[Request, list[PromptScore]]] = field(default_factory=list)


@dataclass(slots=True)
class Launched:
    """The step in flight: what was scheduled, the batch indices that sample (in row order), the runner's handle."""

    batch: ScheduledBatch
    sampling: list[int]
    handle: InFlight
    is_advanced: bool = False  # look-ahead: its sequences' computed tokens and placeholders are already counted

    @property
    def has_live_seqs(self) -> bool:
        return any(not seq.is_finished for seq in self.batch.seqs)
