"""Offline throughput: Sirocco's engine against transformers on one seeded workload, in one process.

Workload: random-token prompts of 32..384 tokens (uniform over the tokenizer's normal, non-special vocab), 16..128
output tokens each, EOS ignored, greedy. Engines:
  sirocco  LLM.generate with token-id prompts and one SamplingParams per request
  hf       transformers generate() on left-padded batches of 16; every row runs to the batch's longest output
  hf-cb    transformers' continuous batching manager (the one generate_batch wraps), max_new_tokens per request
Only useful tokens count: each request's own output length, whatever an engine computed beyond it.
Then one line with Sirocco's fraction of the compute roofline (workload FLOPs / measured matmul FLOP/s) and the ratios.

    python -m bench.offline --out bench/results/offline-cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import describe_device, emit, measure_matmul_flops, set_threads, synchronize, versions
from engine import LLM, EngineConfig, SamplingParams
from engine.embedded import embedded_float32_dir
from engine.loader import read_model_config, resolve_model_dir
from engine.model.config import ModelConfig

MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 32, 384
MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS = 16, 128
HF_BATCH_SIZE = 16
ENGINES = ("sirocco", "hf", "hf-cb")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int  # generated exactly: EOS is ignored


def make_workload(tokenizer: Any, num_requests: int, seed: int) -> list[BenchRequest]:
    """Seeded random-token requests. `tokenizer`: Sirocco's Tokenizer or a transformers tokenizer."""
    vocab_size = tokenizer.vocab_size if hasattr(tokenizer, "special_token_ids") else len(tokenizer)
    special = set(getattr(tokenizer, "special_token_ids", ())) or _hf_special_ids(tokenizer)
    normal_ids = [t for t in range(vocab_size) if t not in special]
    rng = random.Random(seed)
    workload = []
    for _ in range(num_requests):
        prompt_len = rng.randint(MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS)
        prompt = [rng.choice(normal_ids) for _ in range(prompt_len)]
        workload.append(BenchRequest(prompt, rng.randint(MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)))
    return workload


def _hf_special_ids(tokenizer: Any) -> set[int]:
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return set(tokenizer.all_special_ids) | added


def useful_tokens(workload: list[BenchRequest]) -> int:
    return sum(r.max_tokens for r in workload)


def _record(engine: str, workload: list[BenchRequest], seconds: float, device: torch.device, **extra: Any) -> dict[str, Any]:
    useful = useful_tokens(workload)
    return {
        "engine": engine,
        "requests": len(workload),
        "useful_output_tokens": useful,
        "seconds": round(seconds, 3),
        "useful_tok_per_s": round(useful / seconds, 2),
        "device": describe_device(device),
        **versions(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # above the core count: others' work shared the CPU, numbers suffer
        **extra,
    }


# --- Sirocco ---------------------------------------------------------------------------------------------------


def sirocco_params(request: BenchRequest) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=request.max_tokens)


def run_sirocco(llm: LLM, workload: list[BenchRequest]) -> dict[str, Any]:
    """Time llm.generate over the whole workload (call warm_up_sirocco first). Checks every output length."""
    prompts = [r.prompt_token_ids for r in workload]
    params = [sirocco_params(r) for r in workload]
    device = llm.engine.device
    synchronize(device)
    start_s = time.perf_counter()
    outputs = llm.generate(prompts, params)
    synchronize(device)
    seconds = time.perf_counter() - start_s
    for request, output in zip(workload, outputs, strict=True):
        got = len(output.outputs[0].token_ids)
        if got != request.max_tokens:
            raise RuntimeError(f"sirocco generated {got} tokens for a request of {request.max_tokens}")
    return _record("sirocco", workload, seconds, device)


def warm_up_sirocco(llm: LLM) -> None:
    llm.generate([[1, 2, 3, 4, 5, 6, 7, 8]], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4))


# --- transformers generate() on padded batches -----------------------------------------------------------------


def _hf_generate(model: Any, batch: list[BenchRequest], pad_id: int) -> None:
    from transformers import GenerationConfig

    longest_prompt = max(len(r.prompt_token_ids) for r in batch)
    new_tokens = max(r.max_tokens for r in batch)
    rows = [[pad_id] * (longest_prompt - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch]
    masks = [[0] * (longest_prompt - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids) for r in batch]
    input_ids = torch.tensor(rows, device=model.device)  # [batch, longest_prompt], left padded
    attention_mask = torch.tensor(masks, device=model.device)  # [batch, longest_prompt]
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=pad_id
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    if out.shape[1] - longest_prompt != new_tokens:
        raise RuntimeError(f"transformers generated {out.shape[1] - longest_prompt} tokens, expected {new_tokens}")


def run_hf_padded(model: Any, workload: list[BenchRequest], pad_id: int) -> dict[str, Any]:
    """Batches of HF_BATCH_SIZE in workload order; each runs to its longest output, only useful tokens count."""
    computed = 0
    synchronize(model.device)
    start_s = time.perf_counter()
    for i in range(0, len(workload), HF_BATCH_SIZE):
        batch = workload[i : i + HF_BATCH_SIZE]
        _hf_generate(model, batch, pad_id)
        computed += len(batch) * max(r.max_tokens for r in batch)
    synchronize(model.device)
    seconds = time.perf_counter() - start_s
    note = (
        f"generate() on left-padded batches of {HF_BATCH_SIZE}, greedy, min_new_tokens=max_new_tokens=the batch's "
        f"longest; {computed} tokens generated, only each request's own output length counted"
    )
    return _record("hf", workload, seconds, model.device, generated_tokens=computed, note=note)


def warm_up_hf(model: Any, pad_id: int) -> None:
    _hf_generate(model, [BenchRequest([5, 6, 7, 8, 9, 10, 11, 12], 4)], pad_id)


# --- transformers continuous batching ---------------------------------------------------------------------------


def _hf_cb_generate(model: Any, workload: list[BenchRequest]) -> tuple[float, dict[str, Any]]:
    """Run the workload through one continuous batching manager; the timer excludes the manager's set-up and teardown."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    longest = max(r.max_tokens for r in workload)
    config = GenerationConfig(do_sample=False, max_new_tokens=longest, eos_token_id=-1)  # -1: EOS disabled
    hints = WorkloadHints(
        max_prompt_length=max(len(r.prompt_token_ids) for r in workload),
        max_generated_length=longest,
        num_requests=len(workload),
    )
    with model.continuous_batching_context_manager(generation_config=config, workload_hints=hints, timeout=5) as manager:
        synchronize(model.device)
        start_s = time.perf_counter()
        for i, request in enumerate(workload):
            manager.add_request(request.prompt_token_ids, request_id=f"r{i}", max_new_tokens=request.max_tokens, eos_token_id=-1)
        results: dict[str, Any] = {}
        while len(results) < len(workload):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped")
                continue
            if result.is_finished():
                results[result.request_id] = result
        synchronize(model.device)
        seconds = time.perf_counter() - start_s
    for i, request in enumerate(workload):
        result = results[f"r{i}"]
        if result.error is not None or len(result.generated_tokens) != request.max_tokens:
            raise RuntimeError(f"transformers CB request r{i}: error {result.error}, {len(result.generated_tokens)} tokens")
    return seconds, results


def run_hf_cb(model: Any, workload: list[BenchRequest]) -> dict[str, Any]:
    seconds, _ = _hf_cb_generate(model, workload)
    note = (
        "continuous_batching_context_manager + add_request(max_new_tokens=each request's own, eos_token_id=-1): the "
        "manager generate_batch wraps, with per-request lengths"
    )
    return _record("hf-cb", workload, seconds, model.device, note=note)


def warm_up_hf_cb(model: Any) -> None:
    _hf_cb_generate(model, [BenchRequest([5, 6, 7, 8, 9, 10, 11, 12], 4)])


def load_hf_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    return model.eval()


# --- roofline --------------------------------------------------------------------------------------------------


def workload_flops(workload: list[BenchRequest], config: ModelConfig) -> int:
    """FLOPs an ideal engine spends on the workload.

    Every token fed to the model (the prompt plus each generated token but the last) costs 2 * the linear-layer
    parameters (q, k, v, o, gate, up, down; embedding lookup is free); every sampled token costs 2 * hidden * vocab
    for the logits; attention costs 4 * layers * heads * head_dim * context per token (QK^T and PV), with context
    the keys the token sees (itself included, capped by the sliding window).
    """
    h, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * d, config.num_key_value_heads * d
    linear_params = config.num_hidden_layers * (h * (q_size + 2 * kv_size) + q_size * h + 3 * h * inter)
    attn_per_key = 4 * config.num_hidden_layers * config.num_attention_heads * d
    window = config.sliding_window
    total = 0
    for r in workload:
        fed = len(r.prompt_token_ids) + r.max_tokens - 1
        contexts = sum(min(p + 1, window) if window else p + 1 for p in range(fed))
        total += 2 * linear_params * fed + 2 * h * config.vocab_size * r.max_tokens + attn_per_key * contexts
    return total


def roofline_record(
    workload: list[BenchRequest], config: ModelConfig, results: dict[str, dict[str, Any]], peak: float, device: torch.device
) -> dict[str, Any]:
    """peak: the best matmul FLOP/s seen in this run (measured before and after the engines: others share the box)."""
    flops = workload_flops(workload, config)
    roofline_s = flops / peak
    record: dict[str, Any] = {
        "engine": "sirocco-roofline",
        "workload_gflop": round(flops / 1e9, 2),
        "matmul_gflop_per_s": round(peak / 1e9, 2),
        "roofline_seconds": round(roofline_s, 3),
        "roofline_useful_tok_per_s": round(useful_tokens(workload) / roofline_s, 2),
    }
    sirocco = results.get("sirocco")
    if sirocco:
        record["sirocco_fraction_of_roofline"] = round(roofline_s / sirocco["seconds"], 3)
        for name, key in (("hf", "sirocco_over_hf_padded"), ("hf-cb", "sirocco_over_hf_continuous")):
            if name in results:
                record[key] = round(sirocco["useful_tok_per_s"] / results[name]["useful_tok_per_s"], 2)
    record.update(device=describe_device(device), **versions())
    return record


# --- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--model", default=None, help="local directory or Hub id; default: the embedded SmolLM2")
    parser.add_argument("--cache-dir", default=None, help="Sirocco's cache (the converted embedded model)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="Sirocco's token budget per step")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    threads = set_threads()

    # The same torch threads for every engine (Sirocco's own default leaves a CPU free for a server's HTTP work).
    engine_kwargs: dict[str, Any] = {"cache_dir": args.cache_dir, "num_threads": threads}
    if args.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm = LLM(model=args.model, **engine_kwargs)  # also the tokenizer and device for the other engines
    device, dtype = llm.engine.device, llm.engine.dtype
    # transformers reads safetensors: for the embedded model (which Sirocco serves from its Q4_1 GGUF file, with
    # quantized layers) it gets the float32 conversion, so the two sides do not run the same arithmetic there.
    if args.model is None:
        model_dir = embedded_float32_dir(args.cache_dir)
    else:
        model_dir = resolve_model_dir(EngineConfig(model=args.model, cache_dir=args.cache_dir))
    workload = make_workload(llm.tokenizer, args.requests, args.seed)
    pad_id = min(llm.tokenizer.eos_token_ids)  # transformers pads with EOS; padded positions are masked out

    peak_before = measure_matmul_flops(device, dtype)
    results: dict[str, dict[str, Any]] = {}
    if "sirocco" in engines:
        warm_up_sirocco(llm)
        results["sirocco"] = run_sirocco(llm, workload)
        emit(results["sirocco"], args.out)
    del llm  # frees the KV cache before transformers allocates its own
    if "hf" in engines:
        model = load_hf_model(model_dir, device, dtype)
        warm_up_hf(model, pad_id)
        results["hf"] = run_hf_padded(model, workload, pad_id)
        emit(results["hf"], args.out)
        del model
    if "hf-cb" in engines:
        model = load_hf_model(model_dir, device, dtype)
        warm_up_hf_cb(model)
        results["hf-cb"] = run_hf_cb(model, workload)
        emit(results["hf-cb"], args.out)
        del model
    peak = max(peak_before, measure_matmul_flops(device, dtype))
    emit(roofline_record(workload, read_model_config(model_dir), results, peak, device), args.out)


if __name__ == "__main__":
    main()
