"""Structured outputs' cost: bench.offline's seeded workload with half the requests constrained to a JSON schema against
the same workload unconstrained, on one engine in one run (unconstrained, constrained, unconstrained again: the ratio is
against the mean of the two unconstrained runs). The schema asks for a string longer than any output, so every request
still generates exactly its max_tokens and both runs do the same model work; only the grammar work differs.

Also: what a new schema adds to its request's first token (compile in the child process: cache miss vs hit), and
xgrammar's CPU cost per constrained row and step (fill_next_token_bitmask, accept_token, and the bitmask apply).

    python -m bench.structured --requests 16 --out bench/results/structured-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from bench.common import describe_device, emit, set_threads, versions
from bench.offline import BenchRequest, make_workload, run_sirocco, warm_up_sirocco
from engine import LLM, SamplingParams, StructuredOutputs
from engine.structured import TokenBitmask

# A document no request can finish within 128 tokens: constrained requests run to max_tokens, like unconstrained ones.
LONG_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "text": {"type": "string", "minLength": 4000}},
    "required": ["id", "text"],
}


def run_mixed(llm: LLM, workload: list[BenchRequest], structured: StructuredOutputs) -> dict[str, Any]:
    """Every second request constrained (greedy, EOS ignored, max_tokens each); checks every output length."""
    params = [
        SamplingParams(
            temperature=0.0, ignore_eos=True, max_tokens=r.max_tokens, structured_outputs=structured if i % 2 else None
        )
        for i, r in enumerate(workload)
    ]
    start_s = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in workload], params)
    seconds = time.perf_counter() - start_s
    for request, output in zip(workload, outputs, strict=True):
        if len(output.outputs[0].token_ids) != request.max_tokens:
            raise RuntimeError(f"generated {len(output.outputs[0].token_ids)} tokens for a request of {request.max_tokens}")
    for output in outputs[1::2]:
        if not output.outputs[0].text.startswith('{"id": '):
            raise RuntimeError(f"a constrained output does not follow the schema: {output.outputs[0].text[:60]!r}")
    useful = sum(r.max_tokens for r in workload)
    return {
        "engine": "sirocco-half-json-schema",
        "requests": len(workload),
        "constrained_requests": len(workload) // 2,
        "useful_output_tokens": useful,
        "seconds": round(seconds, 3),
        "useful_tok_per_s": round(useful / seconds, 2),
        "constrained_token_ids": [o.outputs[0].token_ids for o in outputs[1::2]],
    }


def time_to_first_token(llm: LLM, structured: StructuredOutputs | None, request_id: str) -> float:
    """Seconds from add_request (prepare, so the compile, included) to the first sampled token, on an idle engine."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=1, structured_outputs=structured)
    start_s = time.perf_counter()
    engine.add_request(request_id, [1, 2, 3, 4, 5, 6, 7, 8], params)
    while engine.has_unfinished:
        engine.step()
    return time.perf_counter() - start_s


def first_token_record(llm: LLM) -> dict[str, Any]:
    """A new schema's compile runs in prepare(), before the request is queued: it adds exactly its compile time to TTFT."""
    manager = llm.engine.structured
    start_s = time.perf_counter()
    manager.compile(StructuredOutputs(regex="[ab]+"))  # starts the compiler child; not part of any schema's cost
    child_start_s = time.perf_counter() - start_s
    schemas = [{**LONG_SCHEMA, "properties": {**LONG_SCHEMA["properties"], f"field_{i}": {"type": "boolean"}}} for i in range(3)]
    miss_s, hit_s = [], []
    for schema in schemas:
        structured = StructuredOutputs(json=json.dumps(schema))
        for times in (miss_s, hit_s):
            start_s = time.perf_counter()
            manager.compile(structured)
            times.append(time.perf_counter() - start_s)
    plain = statistics.median(time_to_first_token(llm, None, f"plain-{i}") for i in range(3))
    new = StructuredOutputs(json=json.dumps({**LONG_SCHEMA, "title": "never compiled before"}))
    return {
        "engine": "sirocco-schema-first-token",
        "compiler_child_start_s": round(child_start_s, 3),
        "compile_miss_s": [round(t, 4) for t in miss_s],  # compile in the child + send back + deserialize
        "compile_hit_s": [round(t, 5) for t in hit_s],  # cache lookup
        "ttft_unconstrained_s": round(plain, 4),  # 8-token prompt, one step; noisy on a shared CPU
        "ttft_new_schema_s": round(time_to_first_token(llm, new, "miss"), 4),
        "ttft_cached_schema_s": round(statistics.median(time_to_first_token(llm, new, f"hit-{i}") for i in range(3)), 4),
    }


def grammar_step_record(
    llm: LLM, structured: StructuredOutputs, outputs_token_ids: list[list[int]], num_rows: int
) -> dict[str, Any]:
    """Replays the constrained outputs through fresh matchers, timing xgrammar's per-row work per step."""
    manager = llm.engine.structured
    eos = sorted(llm.tokenizer.eos_token_ids)
    fill_s = accept_s = 0.0
    num_steps = 0
    for token_ids in outputs_token_ids:
        matcher = manager.matcher(structured, eos)
        for token_id in token_ids:
            start_s = time.perf_counter()
            manager.fill_bitmask([matcher])
            fill_s += time.perf_counter() - start_s
            start_s = time.perf_counter()
            matcher.accept_token(token_id)
            accept_s += time.perf_counter() - start_s
            num_steps += 1
    vocab = llm.engine.model_config.vocab_size
    mask = manager.fill_bitmask([manager.matcher(structured, eos) if i % 2 else None for i in range(num_rows)])
    assert isinstance(mask, TokenBitmask)
    logits = torch.randn(num_rows, vocab)  # [num_rows, vocab]
    start_s = time.perf_counter()
    for _ in range(100):
        mask.apply(logits)
    apply_s = (time.perf_counter() - start_s) / 100
    return {
        "engine": "sirocco-grammar-step-cost",
        "fill_ms_per_row_step": round(1000 * fill_s / num_steps, 4),  # allocate + fill_next_token_bitmask, one row
        "accept_ms_per_row_step": round(1000 * accept_s / num_steps, 4),
        "apply_ms_per_step": round(1000 * apply_s, 4),
        "apply_rows": f"{len(mask.row_ids)} constrained of {num_rows}",
        "replayed_row_steps": num_steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="local directory or Hub id; default: the embedded SmolLM2")
    parser.add_argument("--cache-dir", default=None, help="Sirocco's cache (the converted embedded model)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    set_threads()
    llm = LLM(model=args.model, cache_dir=args.cache_dir)
    workload = make_workload(llm.tokenizer, args.requests, args.seed)
    structured = StructuredOutputs(json=json.dumps(LONG_SCHEMA))
    common = {"device": describe_device(llm.engine.device), **versions()}

    warm_up_sirocco(llm)
    emit({**first_token_record(llm), **common, "load_avg_1m": round(os.getloadavg()[0], 2)}, args.out)
    before = run_sirocco(llm, workload)
    mixed = run_mixed(llm, workload, structured)
    after = run_sirocco(llm, workload)
    constrained_token_ids = mixed.pop("constrained_token_ids")
    plain_tok_per_s = (before["useful_tok_per_s"] + after["useful_tok_per_s"]) / 2
    for record in (before, after):
        emit({**record, "engine": "sirocco-unconstrained"}, args.out)
    emit({**mixed, **common, "load_avg_1m": round(os.getloadavg()[0], 2)}, args.out)
    emit(
        {
            "engine": "sirocco-structured-ratio",
            "half_json_schema_over_unconstrained": round(mixed["useful_tok_per_s"] / plain_tok_per_s, 3),
            "target": 0.8,
            **common,
        },
        args.out,
    )
    emit({**grammar_step_record(llm, structured, constrained_token_ids, num_rows=len(workload)), **common}, args.out)


if __name__ == "__main__":
    main()
