"""Where a batched decode step of the embedded model goes on CPU, and what torch.compile of the layers would give.

The offline engine (engine.LLM, float32, the embedded SmolLM2-135M-Instruct) gets `batch` chat requests ("Write a long,
detailed story about <topic>", temperature 0.7, seeded, EOS ignored), steps until every one is decoding, then:
  1. times `--steps` decode steps (perf_counter, no profiler): the step's wall time;
  2. profiles as many more under torch.profiler, with record_function labels put around the engine's parts from
     outside (nothing is added to engine/): schedule, input preparation, the model's forward split into linear layers
     (every nn.Linear or QuantLinear: q/k/v, o, gate/up, down), attention (the K/V write and paged attention, the C decode kernel
     included), norms (RMSNorm, the residual add it does), rotary (the q/k/v views too, and with the C layer kernel the
     K/V write, which it does in the same call), and the rest of the forward (embedding, SiLU * up, reshapes); logits
     (lm_head), sampler, and postprocess (finishing the step, detokenizing, building outputs).
     Each label's time is exclusive (its labelled children taken out), so the parts add up to the step;
  3. with --compile: each decoder layer's forward wrapped in torch.compile (inductor, dynamic shapes), attention left
     eager (torch.compiler.disable: the C kernel is a ctypes call), timed again after a warm-up that compiles it; the
     greedy tokens of a short check run are compared with eager ones.
Prints one JSON line per batch size and mode.

    python -m bench.cpu_step_profile --batches 8,32 --compile --out bench/results/cpu-step-profile.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import engine.model.mistral
from bench.common import emit, versions
from bench.cpu_peers import prompts
from engine import LLM, SamplingParams
from engine.model.layers import RMSNorm, RotaryEmbedding
from engine.model.quant_linear import QuantLinear

LABEL = "part::"  # record_function names this bench adds start with it
PARTS = ("schedule", "prepare", "forward_other", "linear", "attention", "norm", "rotary", "logits", "sampler", "postprocess")


def labelled(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(LABEL + part):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def labels(llm: LLM, is_inside_forward: bool) -> Iterator[None]:
    """Label the engine's parts for the profiler (instance attributes and module functions, undone afterwards);
    the parts of the forward only when is_inside_forward (never for compiled layers: new wrappers would recompile them)."""
    engine_, runner, model = llm.engine, llm.engine.runner, llm.engine.runner.model
    instance_patches: list[tuple[Any, str, str]] = [
        (engine_.scheduler, "schedule", "schedule"), (runner.inputs, "prepare", "prepare"),
        (model, "forward", "forward_other"), (model, "compute_logits", "logits"), (runner.sampler, "sample", "sampler"),
        (engine_, "_finish_in_flight", "postprocess"), (engine_, "_emit", "postprocess"),
    ]  # fmt: skip
    class_patches: list[tuple[Any, str, str]] = []
    module_patches: list[tuple[Any, str, str]] = []
    if is_inside_forward:
        # Float and quantized projections alike; not the quantized lm_head, which "logits" already holds
        projections = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear)) and m is not model.quant_lm_head]
        instance_patches += [(m, "forward", "linear") for m in projections]  # a float lm_head is unused (mkldnn copy)
        class_patches += [(RMSNorm, "forward", "norm"), (RMSNorm, "add_and_norm", "norm"), (RotaryEmbedding, "forward", "rotary")]
        class_patches += [(engine.model.mistral.MistralAttention, "_rotate_and_write", "rotary")]  # the C call, q/k/v views
        module_patches += [
            (engine.model.mistral, "paged_attention", "attention"),
            (engine.model.mistral, "write_kv", "attention"),
        ]
    originals = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in instance_patches]
    originals += [(owner, name, getattr(owner, name)) for owner, name, _ in class_patches + module_patches]
    try:
        for owner, name, part in instance_patches + class_patches + module_patches:
            setattr(owner, name, labelled(part, getattr(owner, name)))
        yield
    finally:
        for owner, name, original in reversed(originals):
            if original is None:
                delattr(owner, name)  # it was the class's method: drop the instance's wrapper
            else:
                setattr(owner, name, original)


def exclusive_ms(events: Any) -> dict[str, float]:
    """Each label's time with the time of its nearest labelled descendants taken out, summed over the profile."""
    totals: dict[str, float] = defaultdict(float)

    def labelled_below(event: Any) -> float:
        return sum(c.cpu_time_total if c.name.startswith(LABEL) else labelled_below(c) for c in event.cpu_children)

    for event in events:
        if event.name.startswith(LABEL):
            totals[event.name.removeprefix(LABEL)] += (event.cpu_time_total - labelled_below(event)) / 1e3
    return totals


def start_batch(llm: LLM, batch: int, seed: int, max_tokens: int) -> None:
    """Add `batch` chat requests and step until all of them are decoding (no prompt left to prefill)."""
    for i, prompt in enumerate(prompts(seed, batch)):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed + i, ignore_eos=True)
        llm.engine.add_request(f"b{batch}-s{seed}-{i}", [{"role": "user", "content": prompt}], params)
    deadline = time.monotonic() + 600
    scheduler = llm.engine.scheduler
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in [*scheduler.running, *scheduler.waiting]):
        if time.monotonic() > deadline:
            raise RuntimeError("the batch did not finish its prefill in 600 s")
        llm.engine.step()
    llm.engine.step()  # the first step with every sequence decoding


def finish_batch(llm: LLM) -> None:
    for request_id in list(llm.engine.requests):
        llm.engine.abort(request_id)
    while llm.engine.has_unfinished:
        llm.engine.step()


def timed_steps(llm: LLM, num_steps: int) -> list[float]:
    times = []
    for _ in range(num_steps):
        start_s = time.perf_counter()
        llm.engine.step()
        times.append(time.perf_counter() - start_s)
    return times


def profile_batch(llm: LLM, batch: int, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Timed steps, then profiled steps of one decoding batch."""
    max_tokens = 2 * args.steps + 8
    start_batch(llm, batch, args.seed, max_tokens)
    timed_steps(llm, 2)  # warm-up (a compiled forward compiles here at this batch size)
    step_ms = [s * 1e3 for s in timed_steps(llm, args.steps)]
    with labels(llm, is_inside_forward=mode == "eager"), profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled_ms = [s * 1e3 for s in timed_steps(llm, args.steps)]
    finish_batch(llm)
    parts = exclusive_ms(prof.events())
    labelled_total = sum(parts.values())
    record: dict[str, Any] = {
        "bench": "cpu_step_profile", "mode": mode, "batch": batch, "steps": args.steps,
        "step_ms_median": round(statistics.median(step_ms), 2), "step_ms_min": round(min(step_ms), 2),
        "tok_per_s_at_median": round(batch / statistics.median(step_ms) * 1e3, 1),
        "profiled_step_ms_median": round(statistics.median(profiled_ms), 2),
    }  # fmt: skip
    for part in PARTS:
        record[f"{part}_ms_per_step"] = round(parts.get(part, 0.0) / args.steps, 2)
    record["unlabelled_ms_per_step"] = round((sum(profiled_ms) - labelled_total) / args.steps, 2)
    ops = defaultdict(float)
    for item in prof.key_averages():
        if not item.key.startswith(LABEL):
            ops[item.key] += item.self_cpu_time_total / 1e3
    top = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top_ops]
    record["top_ops_self_ms_per_step"] = {name: round(ms / args.steps, 2) for name, ms in top}
    return record


def compile_layers(llm: LLM) -> float:
    """Wrap each decoder layer's forward in torch.compile (attention stays eager); returns the seconds it took to wrap."""
    start_s = time.perf_counter()
    torch._dynamo.config.cache_size_limit = 64  # 30 layers share one code object: let each keep its compiled graph
    engine.model.mistral.paged_attention = torch.compiler.disable(engine.model.mistral.paged_attention)
    engine.model.mistral.write_kv = torch.compiler.disable(engine.model.mistral.write_kv)
    for layer in llm.engine.runner.model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    return time.perf_counter() - start_s


def greedy_tokens(llm: LLM, num_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts(0, 4)], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,32", help="comma-separated batch sizes (sequences decoding at once)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed, and as many profiled, per batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: the engine's default")
    parser.add_argument("--compile", action="store_true", help="then torch.compile the layers and time again")
    parser.add_argument("--top-ops", type=int, default=12, help="aten ops listed by self time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/sirocco")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    llm = LLM(cache_dir=args.cache_dir, max_num_seqs=max(batches), num_threads=args.threads, kv_cache_gib=0.5)
    base = {"threads": torch.get_num_threads(), **versions()}
    eager_tokens = greedy_tokens(llm, 8) if args.compile else []
    for batch in batches:
        emit(profile_batch(llm, batch, args, "eager") | base | {"load_avg_1m": round(os.getloadavg()[0], 2)}, args.out)
    if not args.compile:
        return
    wrap_s = compile_layers(llm)
    start_s = time.perf_counter()
    compiled_tokens = greedy_tokens(llm, 8)  # compiles at prefill and decode shapes
    first_run_s = time.perf_counter() - start_s
    for batch in batches:
        record = profile_batch(llm, batch, args, "compiled-layers")
        record |= base | {"load_avg_1m": round(os.getloadavg()[0], 2)}
        record |= {"first_compiled_run_s": round(first_run_s, 1), "wrap_s": round(wrap_s, 2)}
        record["greedy_tokens_match_eager"] = compiled_tokens == eager_tokens
        emit(record, args.out)


if __name__ == "__main__":
    main()
