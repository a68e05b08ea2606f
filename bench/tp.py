"""Tensor parallelism on CPU: per-step time at TP=2 against TP=1, the all-reduce cost, and the lm_head's share of a step.

The model is a random Mistral written at bench time (weights do not change the speed): hidden 1024, intermediate 2816,
8 layers, 16 heads over 4 K/V heads (head_dim 64), SmolLM2's tokenizer and vocabulary (49152). Each engine runs the
same greedy workload (EOS ignored); a prefill step and the decode steps are timed separately. TP=1 uses every core;
at TP=2 each rank gets half of them, so the two ranks share the same cores one process had. Prints JSON lines.

    python -m bench.tp --out bench/results/tp-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from bench.common import emit, num_cores, set_threads, versions
from engine import EngineConfig, SamplingParams
from engine.embedded import embedded_model_dir
from engine.llm_engine import LLMEngine

SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16}
NUM_KV_HEADS, HEAD_DIM, VOCAB = 4, 64, 49152


def write_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A random Mistral checkpoint with Hugging Face tensor names, and SmolLM2's tokenizer files beside it."""
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    q, kv = SHAPE["num_attention_heads"] * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.05

    tensors = {"model.embed_tokens.weight": rand(VOCAB, h), "model.norm.weight": torch.ones(h), "lm_head.weight": rand(VOCAB, h)}
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes = {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
        }
        shapes |= {"mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
        tensors |= {f"{p}{name}.weight": rand(*shape) for name, shape in shapes.items()}
        tensors |= {f"{p}input_layernorm.weight": torch.ones(h), f"{p}post_attention_layernorm.weight": torch.ones(h)}
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = {"model_type": "mistral", "vocab_size": VOCAB, "num_key_value_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM}
    config |= SHAPE | {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None}
    (out_dir / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def run_engine(model_dir: Path, tp: int, num_seqs: int, prompt_len: int, max_tokens: int) -> dict[str, float]:
    """Median prefill-step and decode-step times (ms) of one greedy batch, plus rank 0's logits time for that batch."""
    engine = LLMEngine(
        EngineConfig(model=str(model_dir), tensor_parallel_size=tp, num_kv_blocks=256, enable_prefix_caching=False)
    )
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request("warm-up", list(range(100, 116)), SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished:
            engine.step()
        for n in range(num_seqs):
            engine.add_request(f"r{n}", [(7 * n + t) % 30000 + 100 for t in range(prompt_len)], params)
        prefill_ms, decode_ms = [], []
        while engine.has_unfinished:
            is_prefill = any(
                s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(engine.scheduler.waiting)
            )
            start_s = time.perf_counter()
            assert not engine.step().failed
            (prefill_ms if is_prefill else decode_ms).append(1000 * (time.perf_counter() - start_s))
        hidden = torch.randn(num_seqs, SHAPE["hidden_size"])
        model = engine.runner.model
        logits_ms = statistics.median(_timed(lambda: model.compute_logits(hidden)) for _ in range(20))
        return {
            "prefill_step_ms": statistics.median(prefill_ms),
            "decode_step_ms": statistics.median(decode_ms),
            "logits_ms": logits_ms,
        }
    finally:
        engine.close()


def _timed(fn: Callable[[], object]) -> float:
    start_s = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start_s)


def _all_reduce_rank(rank: int, port: int, rows: list[int], threads: int, results: dict[int, float]) -> None:
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    for n in rows:
        x = torch.randn(n, SHAPE["hidden_size"])  # [rows, hidden]: what o_proj and down_proj sum
        times = []
        for _ in range(200):
            dist.barrier()
            start_s = time.perf_counter()
            dist.all_reduce(x)
            times.append(1000 * (time.perf_counter() - start_s))
        if rank == 0:
            results[n] = statistics.median(times)
    dist.destroy_process_group()


def measure_all_reduce(rows: list[int]) -> dict[int, float]:
    """Median time (ms) of one gloo all-reduce of [rows, hidden] fp32 between two processes on this machine."""
    with mp.Manager() as manager:
        results = manager.dict()
        port = 29000 + os.getpid() % 1000
        mp.spawn(_all_reduce_rank, args=(port, rows, max(1, num_cores() // 2), results), nprocs=2)
        return dict(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--cache-dir", help="Sirocco's cache holding the converted embedded model (for its tokenizer)")
    parser.add_argument("--out")
    args = parser.parse_args()
    cores = set_threads()
    base = {"bench": "tp", "model": {"random_mistral": SHAPE | {"num_kv_heads": NUM_KV_HEADS, "vocab": VOCAB}}}
    base |= {"cores": cores, "num_seqs": args.num_seqs, "prompt_len": args.prompt_len, **versions()}
    runs: dict[tuple[int, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), embedded_model_dir(args.cache_dir))
        # A-B-C-A: the two full TP=1 runs show the machine's drift; TP=1 on half the cores is what one rank of TP=2 gets.
        for tp, threads in ((1, cores), (2, cores), (1, max(1, cores // 2)), (1, cores)):
            torch.set_num_threads(threads)
            result = run_engine(model_dir, tp, args.num_seqs, args.prompt_len, args.max_tokens)
            runs.setdefault((tp, threads), []).append(result)
            emit({**base, "tp": tp, "threads": threads, **{k: round(v, 2) for k, v in result.items()}}, args.out)
        torch.set_num_threads(cores)
    all_reduce = measure_all_reduce([args.num_seqs, args.num_seqs * args.prompt_len])
    per_step = 2 * SHAPE["num_hidden_layers"]  # all-reduces in one forward
    one = {k: statistics.mean(r[k] for r in runs[1, cores]) for k in runs[1, cores][0]}
    two, half = runs[2, cores][0], runs[1, max(1, cores // 2)][0]
    summary = {
        "all_reduce_decode_ms": round(all_reduce[args.num_seqs], 3),
        "all_reduce_prefill_ms": round(all_reduce[args.num_seqs * args.prompt_len], 3),
        "all_reduce_share_decode": round(per_step * all_reduce[args.num_seqs] / two["decode_step_ms"], 3),
        "all_reduce_share_prefill": round(per_step * all_reduce[args.num_seqs * args.prompt_len] / two["prefill_step_ms"], 3),
        "tp2_over_tp1_decode": round(two["decode_step_ms"] / one["decode_step_ms"], 3),
        "tp2_over_tp1_prefill": round(two["prefill_step_ms"] / one["prefill_step_ms"], 3),
        "tp2_over_tp1_half_threads_decode": round(two["decode_step_ms"] / half["decode_step_ms"], 3),
        "tp2_over_tp1_half_threads_prefill": round(two["prefill_step_ms"] / half["prefill_step_ms"], 3),
        "logits_share_decode_tp2": round(two["logits_ms"] / two["decode_step_ms"], 3),
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    emit({**base, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
