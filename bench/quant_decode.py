"""Decode speed of the embedded SmolLM2-135M with float32, int8 and int4 weights (quantized at load from its float32
conversion) and as its Q4_1 GGUF at its own precision (`gguf`), at several concurrencies, in one process.

For each (weights, concurrency): `concurrency` random-token prompts of 16 tokens generate `--tokens` tokens each (greedy,
EOS ignored) through LLM.generate; prefill is timed apart by a 1-token warm-up run of the same prompts, so the line
reports decode tokens per second (wall and per CPU-second of this process, the steadier figure on a shared machine
with one thread; with more, OpenMP threads spinning on a busy machine count as CPU time too).

    python -m bench.quant_decode --out bench/results/quant-decode-cpu.jsonl
"""

from __future__ import annotations

import argparse
import random
import time

from bench.common import emit, set_threads, versions
from engine import LLM, SamplingParams
from engine.embedded import embedded_float32_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = ["float32", "int8", "int4", "gguf"]
    parser.add_argument("--weights", nargs="+", choices=kinds, default=kinds)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: every core")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    threads = set_threads() if args.threads is None else args.threads
    rng = random.Random(0)
    for weights in args.weights:
        quantization = weights if weights in ("int8", "int4") else None
        model = None if weights == "gguf" else str(embedded_float32_dir(args.cache_dir))  # None: the embedded GGUF
        llm = LLM(
            model=model,
            cache_dir=args.cache_dir,
            quantization=quantization,
            quantization_group_size=args.group_size,
            num_threads=threads,
        )
        for concurrency in args.concurrency:
            prompts = [[rng.randrange(100, 40000) for _ in range(16)] for _ in range(concurrency)]
            llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))  # warm-up
            prefill_s, prefill_cpu_s = _timed(llm, prompts, 1)
            total_s, total_cpu_s = _timed(llm, prompts, args.tokens)
            decode_tokens = concurrency * (args.tokens - 1)
            emit(
                {"bench": "quant_decode", "weights": weights, "group_size": args.group_size, "concurrency": concurrency,
                 "decode_tokens": decode_tokens, "tok_per_s": round(decode_tokens / (total_s - prefill_s), 1),
                 "tok_per_cpu_s": round(decode_tokens / (total_cpu_s - prefill_cpu_s), 1),
                 "ms_per_step": round((total_s - prefill_s) / (args.tokens - 1) * 1e3, 2), "torch_threads": threads,
                 **versions()},
                args.out,
            )  # fmt: skip
        del llm


def _timed(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    start_s, start_cpu_s = time.perf_counter(), time.process_time()
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return time.perf_counter() - start_s, time.process_time() - start_cpu_s


if __name__ == "__main__":
    main()
