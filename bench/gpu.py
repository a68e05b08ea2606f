"""GPU benchmark on Mistral-7B shapes with random bf16 weights; speed does not depend on the weight values.

Writes a random checkpoint (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 32768) as
safetensors, with the embedded SmolLM2 tokenizer files beside it (prompts are token ids below 32768), then measures:
  bandwidth   device-to-device copy bandwidth (bytes read + written), the roofline's denominator
  decode      single-stream decode tok/s against the roofline: copy bandwidth / weight bytes (every parameter, once)
  throughput  N requests (default 1000) of 1024 random prompt tokens and 128..1024 output tokens, EOS ignored, greedy
  slice       the first --hf-requests of that workload through Sirocco, transformers' continuous batching and padded
              generate() (bench/offline.py's runners), same process, so the ratios compare like with like
  ttft        time to first token at low load: one 1024-token request at a time, engine otherwise idle
One JSON line per result with the device and library versions, printed and appended to --out.

    python -m bench.gpu --out bench/results/gpu.jsonl       # CUDA, 7B shapes
    python -m bench.gpu --smoke                             # CPU, tiny shapes, a few seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO_ROOT, describe_device, emit, free_memory, set_threads, synchronize, versions
from bench.offline import BenchRequest, load_hf_model, run_hf_cb, run_hf_padded, warm_up_hf, warm_up_hf_cb
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine

SHAPES_7B = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 14336, "vocab_size": 32768,
}  # fmt: skip
SHAPES_SMOKE = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "vocab_size": 32768,
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FIRST_PROMPT_ID = 100  # prompt ids in [100, vocab): clear of SmolLM2's special tokens


# --- checkpoint -------------------------------------------------------------------------------------------------


def write_checkpoint(
    out_dir: Path, shapes: dict[str, int], dtype: torch.dtype, device: torch.device, seed: int, tokenizer_dir: Path
) -> Path:
    """A random Mistral checkpoint in Hugging Face layout (config.json + one safetensors shard per 4 layers)."""
    from safetensors.torch import save_file

    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", **shapes, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    marker = out_dir / "config.json"
    if marker.is_file() and json.loads(marker.read_text()) == config and (out_dir / "model.safetensors.index.json").is_file():
        return out_dir  # written by an earlier run with the same shapes
    out_dir.mkdir(parents=True, exist_ok=True)
    h, inter, d = shapes["hidden_size"], shapes["intermediate_size"], shapes["head_dim"]
    q_size, kv_size = shapes["num_attention_heads"] * d, shapes["num_key_value_heads"] * d
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(shapes["vocab_size"], h)}]
    for layer in range(shapes["num_hidden_layers"]):
        if layer % 4 == 0:
            shards.append({})
        p = f"model.layers.{layer}."
        shards[-1].update({
            p + "self_attn.q_proj.weight": rand(q_size, h), p + "self_attn.k_proj.weight": rand(kv_size, h),
            p + "self_attn.v_proj.weight": rand(kv_size, h), p + "self_attn.o_proj.weight": rand(h, q_size),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        })  # fmt: skip
    shards.append({"model.norm.weight": torch.ones(h, dtype=dtype), "lm_head.weight": rand(shapes["vocab_size"], h)})
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out_dir / name)
    marker.write_text(json.dumps(config))  # last: a complete directory is one with this config.json
    return out_dir


def default_work_dir(smoke: bool) -> Path:
    """Where the checkpoint is written when --work-dir is not given (bench.gpu_serve reads it from there too)."""
    return Path(tempfile.gettempdir()) / f"sirocco-bench-{'smoke' if smoke else '7b'}"


# --- measurements -----------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = 20) -> float:
    """Best bytes/s of dst.copy_(src), counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best_s = float("inf")
    for _ in range(repeats):
        start_s = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best_s = min(best_s, time.perf_counter() - start_s)
    return 2 * num_bytes / best_s


def weight_bytes(engine: LLMEngine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(length)]


def make_workload(num_requests: int, prompt_len: int, min_out: int, max_out: int, vocab: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(random_prompt(rng, prompt_len, vocab), rng.randint(min_out, max_out)) for _ in range(num_requests)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)


def single_stream_decode(engine: LLMEngine, prompt_len: int, num_tokens: int, seed: int) -> dict[str, Any]:
    """One request alone; decode rate between its first and last token (prefill excluded)."""
    prompt = random_prompt(random.Random(seed), prompt_len, engine.model_config.vocab_size)
    engine.add_request("decode", prompt, greedy(num_tokens))
    token_times: list[float] = []
    while engine.has_unfinished:
        for output in engine.step().outputs:
            token_times.extend(time.perf_counter() for _ in output.outputs[0].token_ids)
    decode_s = token_times[-1] - token_times[0]
    rate = (len(token_times) - 1) / decode_s
    return {"prompt_tokens": prompt_len, "output_tokens": len(token_times), "decode_tok_per_s": round(rate, 2)}


def run_workload(engine: LLMEngine, workload: list[BenchRequest], deadline_s: float) -> dict[str, Any]:
    """All requests at once; stops (and says so) at the deadline, counting only the tokens generated by then."""
    synchronize(engine.device)
    start_s = time.perf_counter()
    for i, request in enumerate(workload):
        engine.add_request(f"w{i}", request.prompt_token_ids, greedy(request.max_tokens))
    num_output_tokens = num_finished = num_steps = 0
    is_truncated = False
    while engine.has_unfinished:
        if time.perf_counter() - start_s > deadline_s:
            is_truncated = True
            for request_id in list(engine.requests):
                engine.abort(request_id)
            break
        result = engine.step()
        num_steps += 1
        for output in result.outputs:
            num_output_tokens += sum(len(o.token_ids) for o in output.outputs)
            num_finished += output.finished
    synchronize(engine.device)
    seconds = time.perf_counter() - start_s
    return {
        "requests": len(workload), "finished_requests": num_finished, "is_truncated": is_truncated,
        "output_tokens": num_output_tokens, "steps": num_steps, "seconds": round(seconds, 3),
        "output_tok_per_s": round(num_output_tokens / seconds, 2),
        "prompt_tok_per_s_upper": round(sum(len(r.prompt_token_ids) for r in workload[:num_finished]) / seconds, 2),
    }  # fmt: skip


def time_to_first_token(engine: LLMEngine, num_requests: int, prompt_len: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ttfts = []
    for i in range(num_requests):
        prompt = random_prompt(rng, prompt_len, engine.model_config.vocab_size)  # fresh tokens: no prefix-cache hit
        start_s = time.perf_counter()
        engine.add_request(f"ttft{i}", prompt, greedy(1))
        while engine.has_unfinished:
            engine.step()
        ttfts.append(time.perf_counter() - start_s)
    ttfts.sort()
    return {
        "requests": num_requests, "prompt_tokens": prompt_len, "ttft_p50_s": round(ttfts[len(ttfts) // 2], 4),
        "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 4), "ttft_mean_s": round(sum(ttfts) / len(ttfts), 4),
    }  # fmt: skip


# --- main -------------------------------------------------------------------------------------------------------


def add_engine_size_args(p: argparse.ArgumentParser) -> None:
    """The engine's batch and memory flags, as this benchmark and bench.gpu_serve both size it."""
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, small workload: checks the script end to end")
    p.add_argument("--sections", default="decode,throughput,slice,ttft")
    p.add_argument("--work-dir", default=None, help="where the random checkpoint is written (kept and reused)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer files to copy beside it; default: the embedded SmolLM2")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--min-output", type=int, default=128)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--deadline-s", type=float, default=300.0, help="throughput run stops here and reports a truncated run")
    p.add_argument("--hf-requests", type=int, default=32, help="slice of the workload run by all three engines")
    p.add_argument("--hf-engines", default="hf-cb,hf")
    p.add_argument("--decode-prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--ttft-requests", type=int, default=10)
    add_engine_size_args(p)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", action="store_true", help="look-ahead scheduling (EngineConfig.async_scheduling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append JSON lines here (default bench/results/gpu.jsonl; none with --smoke)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.prompt_len, args.min_output, args.max_output = 8, 32, 4, 16
        args.hf_requests, args.decode_prompt_len, args.decode_tokens, args.ttft_requests = 4, 8, 16, 3
    elif args.out is None:
        args.out = str(REPO_ROOT / "bench" / "results" / "gpu.jsonl")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sections = set(args.sections.split(","))
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if device.type == "cpu":
        set_threads()
    shapes = SHAPES_SMOKE if args.smoke else SHAPES_7B
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.smoke)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    start_s = time.perf_counter()
    if args.tokenizer_dir:
        tokenizer_dir = Path(args.tokenizer_dir)
    else:
        from engine.embedded import embedded_model_dir

        tokenizer_dir = embedded_model_dir(str(REPO_ROOT / ".cache" / "sirocco"))
    model_dir = write_checkpoint(work_dir, shapes, dtype, device, args.seed, tokenizer_dir)
    base = {
        "bench": "gpu", "device": describe_device(device), **versions(), "triton": _triton_version(),
        "is_smoke": args.smoke, "shapes": "smoke" if args.smoke else "mistral-7b", "dtype": str(dtype).removeprefix("torch."),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip

    def report(section: str, **fields: Any) -> dict[str, Any]:
        record = {**base, "section": section, **fields}
        emit(record, args.out)
        return record

    report("checkpoint", seconds=round(time.perf_counter() - start_s, 1), path=str(model_dir))
    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    report("bandwidth", copy_bytes_per_s=round(bandwidth), copy_tb_per_s=round(bandwidth / 1e12, 3))

    max_model_len = args.prompt_len + args.max_output + 16
    config = EngineConfig(
        model=str(model_dir), device=device.type, dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting_requests=max(1024, args.num_requests), gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_gib=0.25 if args.smoke else None, enforce_eager=args.enforce_eager, seed=args.seed,
        async_scheduling=args.async_scheduling,
    )  # fmt: skip
    load_s = time.perf_counter()
    engine = LLMEngine(config)
    engine_info = {
        "load_seconds": round(time.perf_counter() - load_s, 1), "num_kv_blocks": engine.block_manager.num_blocks,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "cuda_graphs": engine.runner.decode_graphs is not None, "async_scheduling": args.async_scheduling,
    }  # fmt: skip
    report("engine", **engine_info)
    vocab = engine.model_config.vocab_size
    single_stream_decode(engine, 8, 4, args.seed)  # warm-up
    workload = make_workload(args.num_requests, args.prompt_len, args.min_output, args.max_output, vocab, args.seed)

    if "decode" in sections:
        decode = single_stream_decode(engine, args.decode_prompt_len, args.decode_tokens, args.seed + 1)
        num_bytes = weight_bytes(engine)
        roofline = bandwidth / num_bytes
        report(
            "decode", **decode, weight_bytes=num_bytes, roofline_tok_per_s=round(roofline, 2),
            fraction_of_roofline=round(decode["decode_tok_per_s"] / roofline, 3),
        )  # fmt: skip
    if "throughput" in sections:
        report("throughput", **run_workload(engine, workload, args.deadline_s), **engine_info)
    if "ttft" in sections:
        report("ttft", **time_to_first_token(engine, args.ttft_requests, args.prompt_len, args.seed + 2))
    if "slice" in sections:  # fresh prompts (another seed), so that Sirocco's prefix cache holds none of them
        slice_ = make_workload(args.hf_requests, args.prompt_len, args.min_output, args.max_output, vocab, args.seed + 3)
        ours = run_workload(engine, slice_, float("inf"))
        sirocco_rate = sum(r.max_tokens for r in slice_) / ours["seconds"]
        report("slice", engine="sirocco", useful_tok_per_s=round(sirocco_rate, 2), **ours)
    # Free the engine (its KV cache holds most of the GPU) before transformers loads: this frame holds the last reference.
    engine.runner.decode_graphs = None
    del engine
    free_memory(device)
    if "slice" in sections:
        compare_hf(sirocco_rate, model_dir, slice_, device, dtype, args, report)


def compare_hf(sirocco_rate: float, model_dir: Path, slice_: list[BenchRequest], device: torch.device,
               dtype: torch.dtype, args: argparse.Namespace, report: Any) -> None:  # fmt: skip
    """The slice through transformers' engines (Sirocco's engine already freed); ratios in the last record."""
    useful = sum(r.max_tokens for r in slice_)
    pad_id = 0  # masked out; every prompt has the same length, so nothing is padded
    ratios = {}
    for name in args.hf_engines.split(","):
        model = load_hf_model(model_dir, device, dtype)
        if name == "hf":
            warm_up_hf(model, pad_id)
            record = run_hf_padded(model, slice_, pad_id)
        else:
            warm_up_hf_cb(model)
            record = run_hf_cb(model, slice_)
        ratios[f"sirocco_over_{name.replace('-', '_')}"] = round(sirocco_rate / record["useful_tok_per_s"], 2)
        report("slice", **record)
        del model
        free_memory(device)
    report("slice_ratios", requests=len(slice_), useful_output_tokens=useful, **ratios)


def _triton_version() -> str | None:
    try:
        import triton  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(triton.__version__)


if __name__ == "__main__":
    main()
