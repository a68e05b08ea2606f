"""Host-side profile of the GPU throughput run's steps, measurable on CPU: where a step's Python time goes when the model
costs (almost) nothing. The real LLMEngine (and AsyncEngine) runs the throughput run's shape of scheduling (1024-token
prompts chunked by an 8192-token budget, up to 256 running sequences, vocab 32768, the SmolLM2 tokenizer) over a tiny
random Mistral checkpoint (hidden 64, 2 layers: bench/gpu.py's smoke shapes) that stands in for the device work.

The bench wraps the engine's methods from outside (nothing is added to engine/) and times each step's phases with
perf_counter: schedule, input preparation, the stand-in's forward and logits (reported so the reader can subtract them),
the sampler (its Python row grouping and list-to-tensor copies apart from its tensor math), the readback, the fast
postprocess (token append, finish checks) and the slow one (detokenize, stop strings, deltas). Steps are classed by
shape (prefill: prompt chunks with under 3/4 of max_num_seqs decoding; mixed: chunks with at least that many decoding;
decode: no chunk) and one JSON line per (scenario, class) gives the median microseconds of every phase. The async
scenario runs the real AsyncEngine with one asyncio consumer per request and reports the delivery cost per token.

    python -m bench.host_profile --out bench/results/host-profile-cpu.jsonl       # about 2-3 minutes on 2 cores
    python -m bench.host_profile --batch-sizes 32 --decode-steps 8 --scenarios decode,async   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import engine.logits_processors
import engine.sampler
import engine.tokenizer
from bench.common import describe_device, emit, versions
from bench.gpu import REPO_ROOT, SHAPES_SMOKE, random_prompt, write_checkpoint
from engine import AsyncEngine, EngineConfig, SamplingParams
from engine.core_client import ThreadCoreClient
from engine.llm_engine import LLMEngine
from engine.scheduler import ScheduledBatch

SAMPLING = {  # name -> SamplingParams keywords besides max_tokens
    "greedy": {"temperature": 0.0},
    "top_p": {"temperature": 0.8, "top_p": 0.95},
    "penalties": {"temperature": 0.0, "repetition_penalty": 1.1, "frequency_penalty": 0.2},
}
# Phases read off the wrapped methods; every value is the inclusive time of that method within one step.
TIMED = (
    "step", "schedule", "launch", "runner_launch", "prepare", "forward", "logits", "sampler", "sampler_group_rows",
    "sampler_to_device", "sampler_penalties", "readback", "finish_in_flight", "emit", "detokenize",
)  # fmt: skip


class PhaseTimer:
    """Inclusive perf_counter time per phase, summed over the calls within one step; take() returns and resets it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.shape: dict[str, int] = {}  # what the last schedule() made, read when it was made
        self.thread_s = 0.0  # CPU time of the thread that ran the steps

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start_s = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start_s

        return wrapper

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, defaultdict(float)
        return {phase: seconds.get(phase, 0.0) for phase in TIMED}


def instrument(llm: LLMEngine, timer: PhaseTimer) -> None:
    """Wrap one engine's methods (instance attributes: only this engine is timed)."""
    schedule = llm.scheduler.schedule

    def schedule_and_keep() -> ScheduledBatch:
        batch = schedule()
        timer.shape = batch_shape(batch)
        return batch

    step = llm.step

    def step_with_thread_time() -> Any:
        start_s = time.thread_time()
        try:
            return step()
        finally:
            timer.thread_s += time.thread_time() - start_s

    llm.step = timer.timed("step", step_with_thread_time)  # type: ignore[method-assign]
    llm.scheduler.schedule = timer.timed("schedule", schedule_and_keep)  # type: ignore[method-assign]
    llm._launch = timer.timed("launch", llm._launch)  # type: ignore[method-assign]
    llm._finish_in_flight = timer.timed("finish_in_flight", llm._finish_in_flight)  # type: ignore[method-assign]
    llm._emit = timer.timed("emit", llm._emit)  # type: ignore[method-assign]
    runner = llm.runner
    launch_name = "launch" if hasattr(runner, "launch") else "execute"
    setattr(runner, launch_name, timer.timed("runner_launch", getattr(runner, launch_name)))
    inputs = getattr(runner, "inputs", None)  # engine/input_batch.py, where the engine has it
    if inputs is not None:
        inputs.prepare = timer.timed("prepare", inputs.prepare)
    runner.model.forward = timer.timed("forward", runner.model.forward)  # type: ignore[method-assign]
    runner.model.compute_logits = timer.timed("logits", runner.model.compute_logits)  # type: ignore[method-assign]
    runner.sampler.sample = timer.timed("sampler", runner.sampler.sample)  # type: ignore[method-assign]


@contextlib.contextmanager
def module_patches(timer: PhaseTimer) -> Iterator[None]:
    """Time the sampler's Python parts, the readback of its tokens and the incremental detokenizer (module functions and
    class methods, patched for the duration: every engine in this process is timed)."""
    patches = [
        (engine.sampler, "_group_rows", "sampler_group_rows"),
        (engine.sampler, "apply_penalties", "sampler_penalties"),
        (engine.sampler.SampledTokens, "result", "readback"),
        (engine.tokenizer.IncrementalDetokenizer, "add", "detokenize"),
        (engine.tokenizer.IncrementalDetokenizer, "flush", "detokenize"),
    ]
    for module in (engine.sampler, engine.logits_processors):  # list -> tensor copies; the helper's name has changed
        patches += [
            (module, name, "sampler_to_device") for name in ("on_device", "_on_device", "_tensor") if hasattr(module, name)
        ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for (owner, name, phase), (_, _, original) in zip(patches, originals, strict=True):
            setattr(owner, name, timer.timed(phase, original))
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def step_record(seconds: dict[str, float], shape: dict[str, int]) -> dict[str, Any]:
    """One step's phases in microseconds, with the exclusive parts derived, and the shape of what it scheduled."""
    us = {phase: value * 1e6 for phase, value in seconds.items()}
    sampler_host = us["sampler_group_rows"] + us["sampler_to_device"]
    record = {
        "step_us": us["step"],
        "schedule_us": us["schedule"],
        "launch_other_us": us["launch"] - us["schedule"] - us["runner_launch"],  # sample rows, grammar bitmask
        "prepare_us": us["prepare"],
        "runner_other_us": us["runner_launch"] - us["prepare"] - us["forward"] - us["logits"] - us["sampler"],
        "forward_us": us["forward"],
        "logits_us": us["logits"],
        "sampler_us": us["sampler"],
        "sampler_host_us": sampler_host,
        "sampler_penalties_us": us["sampler_penalties"],
        "sampler_math_us": us["sampler"] - sampler_host,
        "readback_us": us["readback"],
        "fast_post_us": us["finish_in_flight"] - us["readback"],
        "slow_post_us": us["emit"],
        "detokenize_us": us["detokenize"],  # part of the slow postprocess
        "step_other_us": us["step"] - us["launch"] - us["finish_in_flight"] - us["emit"],
    }
    # Host: the Python a GPU host would run too. Left out: the stand-in's forward, logits and sampler tensor math, and
    # the rest of runner.launch (on CPU mostly freeing the stand-in's [num_samples, vocab] logits; on a GPU, eager
    # kernel launches, which this bench cannot see).
    record["host_us"] = sum(
        record[key]
        for key in ("schedule_us", "launch_other_us", "prepare_us", "sampler_host_us", "readback_us", "fast_post_us",
                    "slow_post_us", "step_other_us")
    )  # fmt: skip
    # On the GPU's critical path with async output: the slow postprocess overlaps the next step's device work.
    record["critical_host_us"] = record["host_us"] - record["slow_post_us"]
    record.update(shape or batch_shape(ScheduledBatch()))
    return record


def batch_shape(batch: ScheduledBatch) -> dict[str, int]:
    """Sequences and tokens of a batch, and how many of them are prompt chunks (read before the step runs)."""
    seqs = list(zip(batch.seqs, batch.num_new_tokens, strict=True))
    return {
        "num_seqs": len(seqs),
        "num_tokens": sum(n for _, n in seqs),
        "num_prefill_tokens": sum(n for s, n in seqs if s.num_computed_tokens < s.num_prompt_tokens),
        "num_decodes": sum(1 for s, _ in seqs if s.num_computed_tokens >= s.num_prompt_tokens),
    }


def step_class(record: dict[str, Any], max_num_seqs: int) -> str:
    if record["num_prefill_tokens"] == 0:
        return "decode"
    return "mixed" if record["num_decodes"] >= 0.75 * max_num_seqs else "prefill"


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every field over the steps of one class (a shared CPU is noisy: medians, not means), and the count."""
    summary: dict[str, Any] = {"steps": len(records)}
    for key in records[0]:
        values = [r[key] for r in records]
        summary[key] = round(statistics.median(values), 1) if key.endswith("_us") else round(statistics.mean(values), 1)
    # Means too: a pause (garbage collection, another process on the core) is a real cost that a median hides.
    summary["host_us_mean"] = round(statistics.mean(r["host_us"] for r in records), 1)
    summary["step_us_mean"] = round(statistics.mean(r["step_us"] for r in records), 1)
    return summary


def run_sync(
    llm: LLMEngine, timer: PhaseTimer, num_requests: int, max_tokens: Callable[[random.Random], int], sampling: str,
    prompt_len: int, max_steps: int, seed: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Submit every request at once, step until done (or max_steps, then abort the rest) -> one record per step."""
    rng = random.Random(seed)
    vocab = llm.model_config.vocab_size
    for i in range(num_requests):
        params = SamplingParams(max_tokens=max_tokens(rng), ignore_eos=True, **SAMPLING[sampling])
        llm.add_request(f"s{seed}-{i}", random_prompt(rng, prompt_len, vocab), params)
    records = []
    timer.take()
    while llm.has_unfinished and len(records) < max_steps:
        timer.shape = {}
        llm.step()
        records.append(step_record(timer.take(), timer.shape))
    for request_id in list(llm.requests):
        llm.abort(request_id)
    while llm.has_unfinished:  # a step in flight (async output) of aborted requests: dropped by the next step
        llm.step()
    return records


def report_classes(records: list[dict[str, Any]], base: dict[str, Any], out: str | None, max_num_seqs: int) -> None:
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_class[step_class(record, max_num_seqs)].append(record)
    for name in ("prefill", "mixed", "decode"):
        if by_class[name]:
            emit({**base, "step_class": name, **summarize(by_class[name])}, out)


async def consume(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams) -> int:
    num_tokens = 0
    async for output in engine.generate(request_id, prompt, params):
        num_tokens += sum(len(o.token_ids) for o in output.outputs)
    return num_tokens


async def run_async(engine: AsyncEngine, num_requests: int, prompt_len: int, max_tokens: int, seed: int) -> dict[str, Any]:
    """Every request through generate() with one asyncio consumer each; the event loop thread's CPU time per token."""
    rng = random.Random(seed)
    vocab = engine.client.vocab_size
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    prompts = [random_prompt(rng, prompt_len, vocab) for _ in range(num_requests)]
    loop_cpu_s, start_s = time.thread_time(), time.perf_counter()
    counts = await asyncio.gather(*(consume(engine, f"a{seed}-{i}", p, params) for i, p in enumerate(prompts)))
    return {
        "seconds": time.perf_counter() - start_s, "loop_cpu_s": time.thread_time() - loop_cpu_s,
        "output_tokens": sum(counts),
    }  # fmt: skip


def async_scenario(config: EngineConfig, args: argparse.Namespace, base: dict[str, Any]) -> None:
    """The real AsyncEngine: its loop thread's steps timed as in the sync runs, plus the delivery to asyncio consumers."""
    engine = AsyncEngine(config)
    timer = PhaseTimer()
    assert isinstance(engine.client, ThreadCoreClient)
    llm = engine.client.core.engine
    instrument(llm, timer)
    records: list[dict[str, Any]] = []
    step = llm.step

    def step_and_record() -> Any:
        timer.shape = {}
        try:
            return step()
        finally:
            records.append(step_record(timer.take(), timer.shape))

    llm.step = step_and_record  # type: ignore[method-assign]
    outside = PhaseTimer()  # the loop thread's work outside step(): delivery to asyncio, the stats read after each step
    engine._deliver_all = outside.timed("deliver", engine._deliver_all)  # type: ignore[method-assign]
    llm.stats = outside.timed("stats", llm.stats)  # type: ignore[method-assign]
    engine.start()
    try:
        with module_patches(timer):
            asyncio.run(run_async(engine, 8, 16, 2, args.seed + 100))  # warm-up
            records.clear()
            outside.take()
            timer.thread_s = 0.0
            num = args.async_requests
            result = asyncio.run(run_async(engine, num, args.prompt_len, args.async_max_tokens, args.seed + 101))
    finally:
        engine.shutdown()
    deliver_s, stats_s = outside.seconds["deliver"], outside.seconds["stats"]
    tokens, num_steps = result["output_tokens"], max(1, len(records))
    sum_step_s = sum(r["step_us"] for r in records) / 1e6
    decode = [r for r in records if step_class(r, args.max_num_seqs) == "decode" and r["num_decodes"] >= 0.75 * num]
    emit(
        {
            **base, "scenario": f"async-{num}", "sampling": "greedy", "requests": num, "output_tokens": tokens,
            "seconds": round(result["seconds"], 3), "steps": len(records),
            "engine_thread_cpu_s": round(timer.thread_s, 3), "event_loop_cpu_s": round(result["loop_cpu_s"], 3),
            "sum_step_s": round(sum_step_s, 3),
            "deliver_us_per_token": round(deliver_s / tokens * 1e6, 2),
            "deliver_us_per_step": round(deliver_s / num_steps * 1e6, 1),
            "stats_us_per_step": round(stats_s / num_steps * 1e6, 1),
            "event_loop_us_per_token": round(result["loop_cpu_s"] / tokens * 1e6, 2),
            "loop_overhead_us_per_step": round((result["seconds"] - sum_step_s) / num_steps * 1e6, 1),
            "decode_steps": summarize(decode) if decode else None,
        },
        args.out,
    )  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="decode,steady,sampling,async")
    p.add_argument("--batch-sizes", default="32,128,256", help="decode scenario: running sequences")
    p.add_argument("--decode-steps", type=int, default=32, help="decode scenario: decode steps after the prefill ramp")
    p.add_argument("--sampling-steps", type=int, default=6, help="sampling scenario: decode steps per sampling mode")
    p.add_argument("--steady-steps", type=int, default=100, help="steady scenario: steps measured")
    p.add_argument("--async-requests", type=int, default=256)
    p.add_argument("--async-max-tokens", type=int, default=64, help="past the prefill ramp, so all requests decode together")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--async-output", action="store_true", help="the engine's async output (the CUDA default); off: a step is one step's work"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of the stand-in's forward (1: steadier on a shared box)")
    p.add_argument("--work-dir", default=None, help="where the tiny checkpoint is written (kept and reused)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer files to copy beside it; default: the embedded SmolLM2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append JSON lines here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    scenarios = set(args.scenarios.split(","))
    torch.set_num_threads(args.threads)
    if args.tokenizer_dir:
        tokenizer_dir = Path(args.tokenizer_dir)
    else:
        from engine.embedded import embedded_model_dir

        tokenizer_dir = embedded_model_dir(str(REPO_ROOT / ".cache" / "sirocco"))
    work_dir = Path(args.work_dir) if args.work_dir else Path("/tmp") / "sirocco-bench-host-profile"
    model_dir = write_checkpoint(work_dir, SHAPES_SMOKE, torch.float32, torch.device("cpu"), args.seed, tokenizer_dir)
    max_decode = max(args.decode_steps, args.sampling_steps, args.async_max_tokens, 112) + 64  # + the longest ramp
    config = EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", max_model_len=args.prompt_len + max_decode,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting_requests=4096, kv_cache_gib=0.5, seed=args.seed, async_output=args.async_output,
        num_threads=args.threads,
    )  # fmt: skip
    base = {
        "bench": "host_profile", "device": describe_device(torch.device("cpu")), **versions(),
        "shapes": "smoke (hidden 64, 2 layers, vocab 32768)", "prompt_len": args.prompt_len,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "async_output": args.async_output, "threads": args.threads, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    start_s = time.perf_counter()
    if scenarios - {"async"}:
        llm = LLMEngine(config)
        timer = PhaseTimer()
        instrument(llm, timer)
        with module_patches(timer):
            run_sync(llm, timer, 4, lambda rng: 4, "greedy", 64, 100, args.seed + 99)  # warm-up
            sync_scenarios(llm, timer, scenarios, args, base)
        llm.close()
        del llm
    if "async" in scenarios:
        async_scenario(config, args, base)
    total_s = round(time.perf_counter() - start_s, 1)
    emit(
        {**base, "scenario": "total", "seconds": total_s, "python_ref_ms": python_reference_ms(), "load_avg_1m": _load_avg()},
        args.out,
    )


def python_reference_ms() -> float:
    """Best of 5 of a fixed pure-Python loop (lists, dicts, attribute-free arithmetic): compares one machine's Python
    speed with another's, so these host figures can be scaled to a GPU host's CPU by running this bench there."""
    best_s = float("inf")
    for _ in range(5):
        start_s = time.perf_counter()
        table: dict[int, int] = {}
        items: list[int] = []
        for x in range(200_000):
            table[x & 1023] = table.get(x & 1023, 0) + x
            items.append(x * 3 % 7)
        best_s = min(best_s, time.perf_counter() - start_s)
    return round(best_s * 1e3, 2)


def sync_scenarios(
    llm: LLMEngine, timer: PhaseTimer, scenarios: set[str], args: argparse.Namespace, base: dict[str, Any]
) -> None:
    prompt_len, seed, max_num_seqs = args.prompt_len, args.seed, args.max_num_seqs

    def window(num: int, sampling: str, num_decode_steps: int, seed: int) -> list[dict[str, Any]]:
        """num requests prefilled (the ramp), then num_decode_steps decode steps with all of them running: no request
        finishes within the window (max_tokens is past it); the rest are aborted."""
        ramp = -(-num * prompt_len // args.max_num_batched_tokens) + 1
        max_tokens = ramp + num_decode_steps + 2
        return run_sync(llm, timer, num, lambda rng: max_tokens, sampling, prompt_len, ramp + num_decode_steps, seed)

    if "decode" in scenarios:
        for num in (int(b) for b in args.batch_sizes.split(",")):
            records = window(num, "greedy", args.decode_steps, seed + num)
            report_classes(records, {**base, "scenario": f"decode-{num}", "sampling": "greedy"}, args.out, max_num_seqs)
    if "steady" in scenarios:  # finished requests make room for waiting ones: chunks ride along ~256 decodes
        num = max_num_seqs
        records = run_sync(
            llm, timer, 2 * num, lambda rng: rng.randint(16, 112), "greedy", prompt_len, args.steady_steps, seed + 7
        )  # fmt: skip
        report_classes(records, {**base, "scenario": f"steady-{num}", "sampling": "greedy"}, args.out, max_num_seqs)
    if "sampling" in scenarios:
        num = max_num_seqs
        for name in ("top_p", "penalties"):
            records = window(num, name, args.sampling_steps, seed + 11 + len(name))  # own prompts: no prefix-cache hits
            decode = [r for r in records if step_class(r, max_num_seqs) == "decode"]
            emit({**base, "scenario": f"decode-{num}", "sampling": name, "step_class": "decode", **summarize(decode)}, args.out)


def _load_avg() -> float | None:
    try:
        return round(float(Path("/proc/loadavg").read_text().split()[0]), 2)
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    main()
