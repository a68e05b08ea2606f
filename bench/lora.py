"""Multi-LoRA throughput and adapter cold-load time, side by side in one run (issue 20's figures).

    python -m bench.lora --cache-dir .cache/sirocco --out bench/results/lora-cpu.jsonl   # embedded SmolLM2, 32 requests
    python -m bench.lora --requests 16 --max-tokens 32 --rounds 1  # smaller

Four random rank-`--rank` adapters on every projection (q, k, v, o, gate, up, down) are written as PEFT folders in a
temporary directory. Workload: `--requests` concurrent requests (random-token prompts of 32..128 tokens, `--max-tokens`
output tokens each, greedy, EOS ignored), submitted at once. Per round, in alternating order: the base model alone on
an engine without LoRA, and the same workload with the adapters mixed uniformly (request i runs adapter i mod 4) on an
engine with max_loras=4, after one untimed pass of each (2 output tokens). `ratio` is mixed tok/s over base tok/s
for that round; the summary line has the median over rounds. Cold load: the median time to write one
adapter from host memory into a device slot (every LoRA layer), over `--load-repeats` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench.common import describe_device, emit, versions
from engine import LLM, SamplingParams
from engine.embedded import embedded_model_dir
from engine.lora import TARGETS, module_shapes
from engine.model.config import ModelConfig

NUM_ADAPTERS = 4


def write_random_adapter(out_dir: Path, config: ModelConfig, rank: int, seed: int) -> Path:
    """A PEFT-format LoRA folder with random A and B on every supported projection of every layer."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (in_features, out_features) in module_shapes(config).items():
            owner = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{owner}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out_dir


def make_workload(num_requests: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(32, 128))] for _ in range(num_requests)]


def timed_generate(llm: LLM, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> float:
    """Output tokens per second of one llm.generate over the whole workload (every output length checked)."""
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, lora=name) for name in adapters]
    start_s = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start_s
    if any(len(output.outputs[0].token_ids) != max_tokens for output in outputs):
        raise RuntimeError("a request generated the wrong number of tokens")
    return len(prompts) * max_tokens / seconds


def cold_load_ms(llm: LLM, name: str, repeats: int) -> float:
    """Median milliseconds to write one adapter, already in host memory, into a device slot."""
    engine = llm.engine
    assert engine.lora_registry is not None and engine.lora_slots is not None
    adapter = engine.lora_registry.get(engine.lora_registry.lora_id(name))
    times = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        engine.lora_slots.load(NUM_ADAPTERS, adapter)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        times.append((time.perf_counter() - start_s) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local directory or Hub id; default: the embedded SmolLM2-135M")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="Sirocco's cache holding the converted embedded model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = args.model or str(embedded_model_dir(cache_dir=args.cache_dir))
    with tempfile.TemporaryDirectory(prefix="sirocco-lora-bench-") as tmp:
        # The engine's default torch threads (the usable CPUs); no prefix cache, so every round computes its prompts
        base = LLM(model=model, enable_prefix_caching=False)
        config = base.engine.model_config
        names = [f"adapter{i}" for i in range(NUM_ADAPTERS)]
        dirs = [write_random_adapter(Path(tmp) / name, config, args.rank, args.seed + i) for i, name in enumerate(names)]
        modules = ",".join(f"{name}={path}" for name, path in zip(names, dirs, strict=True))
        lora = LLM(
            model=model, enable_prefix_caching=False, lora_modules=modules, max_loras=NUM_ADAPTERS, max_lora_rank=args.rank
        )
        prompts = make_workload(args.requests, config.vocab_size, args.seed)
        mixed = [names[i % NUM_ADAPTERS] for i in range(args.requests)]
        # Warm-up: the whole workload's prompts with 2 output tokens each (the first run of a shape is slow)
        timed_generate(base, prompts, [None] * args.requests, 2)
        timed_generate(lora, prompts, mixed, 2)
        common: dict[str, Any] = {
            "model": model,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "rank": args.rank,
            "device": describe_device(base.engine.device),
            **versions(),
        }
        ratios = []
        for round_index in range(args.rounds):
            runs = {}
            order = ("base", "mixed") if round_index % 2 == 0 else ("mixed", "base")
            for kind in order:
                if kind == "base":
                    runs[kind] = timed_generate(base, prompts, [None] * args.requests, args.max_tokens)
                else:
                    runs[kind] = timed_generate(lora, prompts, mixed, args.max_tokens)
            record = {
                "bench": "lora-throughput",
                "round": round_index,
                "order": "/".join(order),
                "base_tok_per_s": round(runs["base"], 1),
                "mixed_4_adapters_tok_per_s": round(runs["mixed"], 1),
                "ratio": round(runs["mixed"] / runs["base"], 3),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                **common,
            }
            emit(record, args.out)
            ratios.append(record["ratio"])
        summary = {"bench": "lora-throughput-summary", "median_ratio": statistics.median(ratios), "ratios": ratios, **common}
        emit(summary, args.out)
        median_ms = round(cold_load_ms(lora, names[0], args.load_repeats), 2)
        emit({"bench": "lora-cold-load", "median_ms": median_ms, "load_avg_1m": round(os.getloadavg()[0], 2), **common}, args.out)


if __name__ == "__main__":
    main()
