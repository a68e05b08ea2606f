"""The CUDA path against the CPU reference: Triton kernels compiled on the GPU (attention, and the fused layer kernels
the CUDA model runs), and the engine's greedy outputs on CUDA (eager and with CUDA graphs) equal to the CPU engine's on
the tiny fixture models, the embedded model and a model with Mistral-7B layer shapes; async output equal to sync output.
Skipped without CUDA.
"""

from __future__ import annotations

import gc
import logging
import pathlib
import random
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.input_batch import InputBatch
from engine.kv_cache import block_bytes
from engine.loader import load_model, read_model_config
from engine.memory_profile import profile_cuda_memory
from engine.outputs import RequestOutput
from tests.engine.test_input_batch import run_checked
from tests.engine.test_scheduler import BLOCK_SIZE, Sim
from tests.engine.test_triton_attention import CASES, Case, case_errors
from tests.engine.test_triton_layers import CASES as LAYER_CASES
from tests.engine.test_triton_layers import DTYPES, TOLERANCE, LayerCase, case_error

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
# Small budgets so that steps mix decodes with chunked prefills, and graphs are padded (5 prompts, sizes 1, 2, 4, 8).
ENGINE_KWARGS = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "kv_cache_gib": 0.25}
TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 4,  # > 64 tokens: chunked
    "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 4 + "never",  # cached prefix
    "1, 2, 3, 4,",
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compiled_kernels_match_reference_fp32(case: Case) -> None:
    errors = case_errors(case, CUDA, torch.float32)
    assert errors["write"] == 0.0
    assert errors["attention"] < 1e-4, errors
    assert errors["padded_row"] == 0.0


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compiled_kernels_match_reference_bf16(case: Case) -> None:
    errors = case_errors(case, CUDA, torch.bfloat16)
    assert errors["write"] == 0.0
    assert errors["attention"] < 3e-2, errors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.name for c in LAYER_CASES])
def test_compiled_layer_kernels_match_reference(case: LayerCase, dtype: str) -> None:
    error = case_error(case, CUDA, DTYPES[dtype])
    assert error < TOLERANCE[dtype], f"{case.name} {dtype}: relative error {error}"


def _generate(model_dir: pathlib.Path, prompts: list, max_tokens: int = 24, **kwargs: object) -> tuple[list[RequestOutput], int]:
    """Greedy outputs with top-5 logprobs, and how many decode steps replayed a CUDA graph."""
    llm = LLM(model=str(model_dir), **ENGINE_KWARGS, **kwargs)  # type: ignore[arg-type]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=5))
    graphs = llm.engine.runner.decode_graphs
    num_replays = graphs.num_replays if graphs is not None else 0
    del llm, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return outputs, num_replays


def assert_same_greedy(reference: list[RequestOutput], candidate: list[RequestOutput], max_gap: float) -> None:
    """Token ids equal; a divergence is allowed only at a near-tie of the reference (top logprob gap < max_gap),
    after which the two continuations no longer share a prefix and are not compared."""
    for ref, cand in zip(reference, candidate, strict=True):
        ref_ids, cand_ids = ref.outputs[0].token_ids, cand.outputs[0].token_ids
        assert len(cand_ids) == len(ref_ids)
        for step, (a, b) in enumerate(zip(ref_ids, cand_ids, strict=True)):
            if a == b:
                continue
            position = ref.outputs[0].logprobs[step]  # type: ignore[index]
            alternatives = {lp.token_id: lp.logprob for lp in position.top}
            assert b in alternatives, f"step {step}: {b} is not among the reference's top 5 {alternatives}"
            gap = position.sampled.logprob - alternatives[b]
            assert gap < max_gap, f"step {step}: {ref_ids} vs {cand_ids} diverge where the reference is sure ({gap:.4f})"
            break


@pytest.mark.parametrize("model", ["tiny_mistral_dir", "tiny_mistral_sliding_dir", "embedded_model_dir"])
def test_cuda_fp32_greedy_equals_cpu(model: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(model)
    cpu, _ = _generate(model_dir, TEXT_PROMPTS, device="cpu")
    eager, eager_replays = _generate(model_dir, TEXT_PROMPTS, device="cuda", dtype="float32", enforce_eager=True)
    graphs, replays = _generate(model_dir, TEXT_PROMPTS, device="cuda", dtype="float32")
    assert eager_replays == 0 and replays > 0
    assert_same_greedy(cpu, eager, max_gap=1e-3)
    assert_same_greedy(cpu, graphs, max_gap=1e-3)
    assert [r.outputs[0].token_ids for r in graphs] == [r.outputs[0].token_ids for r in eager]


def test_cuda_greedy_survives_preemption(tiny_mistral_sliding_dir: pathlib.Path) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(3, 90))] for _ in range(16)]
    cpu, _ = _generate(tiny_mistral_sliding_dir, prompts, device="cpu")
    llm_kwargs = {**ENGINE_KWARGS, "kv_cache_gib": None, "num_kv_blocks": 24}  # 16 sequences of <= 114 tokens do not fit
    llm = LLM(model=str(tiny_mistral_sliding_dir), device="cuda", dtype="float32", **llm_kwargs)  # type: ignore[arg-type]
    squeezed = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=5))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == 24
    assert_same_greedy(cpu, squeezed, max_gap=1e-3)


def test_cuda_bf16_follows_cpu_fp32(embedded_model_dir: pathlib.Path) -> None:
    """bf16 on the GPU (the production dtype) tracks fp32 on the CPU until a near-tie."""
    cpu, _ = _generate(embedded_model_dir, TEXT_PROMPTS, device="cpu")
    bf16, replays = _generate(embedded_model_dir, TEXT_PROMPTS, device="cuda")
    assert replays > 0
    assert_same_greedy(cpu, bf16, max_gap=0.5)


def test_cuda_async_output_equals_sync_output(embedded_model_dir: pathlib.Path, tiny_mistral_dir: pathlib.Path) -> None:
    """On CUDA the slow postprocess of step N-1 overlaps step N by default; with the same batches (no stop strings, so
    no choice ends with a token in flight) the outputs equal those with async output off, bit for bit, in bf16."""
    assert LLM(model=str(tiny_mistral_dir), device="cuda", **ENGINE_KWARGS).engine.is_async_output  # type: ignore[arg-type]
    sync, sync_replays = _generate(embedded_model_dir, TEXT_PROMPTS, device="cuda", async_output=False)
    overlapped, replays = _generate(embedded_model_dir, TEXT_PROMPTS, device="cuda")
    assert replays == sync_replays > 0
    for ref, got in zip(sync, overlapped, strict=True):
        assert (got.outputs[0].token_ids, got.outputs[0].text) == (ref.outputs[0].token_ids, ref.outputs[0].text)
        ref_logprobs = [(e.sampled.token_id, e.sampled.logprob) for e in ref.outputs[0].logprobs or []]
        assert [(e.sampled.token_id, e.sampled.logprob) for e in got.outputs[0].logprobs or []] == ref_logprobs


@pytest.fixture(scope="module")
def mistral_7b_layers_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> pathlib.Path:
    """Two layers with Mistral-7B's shapes (hidden 4096, 32 heads, 8 KV heads, intermediate 14336, vocab 32768)."""
    from transformers import MistralConfig, MistralForCausalLM

    out_dir = tmp_path_factory.mktemp("mistral_7b_layers")
    config = MistralConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        initializer_range=0.05, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir / name, out_dir / name)
    return out_dir


def test_cuda_7b_layer_shapes_greedy_equals_cpu(mistral_7b_layers_dir: pathlib.Path) -> None:
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 32768) for _ in range(n)] for n in (5, 40, 130)]
    cpu, _ = _generate(mistral_7b_layers_dir, prompts, max_tokens=8, device="cpu")
    gpu, replays = _generate(mistral_7b_layers_dir, prompts, max_tokens=8, device="cuda", dtype="float32")
    assert replays > 0
    assert_same_greedy(cpu, gpu, max_gap=1e-3)


def test_input_batch_on_cuda_equals_the_list_construction() -> None:
    """Pinned host buffers, non-blocking copies and the copy event: every step's device inputs are right."""
    rng = random.Random(0)
    sim = Sim(num_blocks=24, max_num_batched_tokens=40, max_num_seqs=8)
    for _ in range(16):
        sim.add(prompt=[rng.randrange(1000) for _ in range(rng.randint(1, 40))], max_tokens=rng.randint(1, 20))
    inputs = InputBatch(CUDA, BLOCK_SIZE, 64, 8, 16)
    assert inputs.host["input_ids"].is_pinned() and inputs.device_buffers["input_ids"].is_cuda
    assert run_checked(sim, inputs, rng) > 10


def test_cuda_kv_cache_sized_by_the_memory_profile(mistral_7b_layers_dir: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """The profiling pass: weights and the worst-case step's peak in a sane range; an engine sized by it starts, fills
    gpu_memory_utilization with KV blocks and never lets torch hold more than that share of the GPU."""
    gc.collect()
    torch.cuda.empty_cache()
    model_config = read_model_config(mistral_7b_layers_dir)
    model = load_model(mistral_7b_layers_dir, model_config, CUDA, torch.bfloat16)
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    profile = profile_cuda_memory(model, 2048, 256, 16, None, has_cuda_graphs=True)
    assert params_bytes <= profile.weights_bytes < params_bytes + (256 << 20), profile
    scored_logits_bytes = 1024 * model_config.vocab_size * 4  # prompt-logprob chunk: fp32 logits and their log-softmax
    assert 2 * scored_logits_bytes <= profile.activation_peak_bytes < 2 << 30, profile
    assert 0 < profile.cuda_graph_bytes < profile.activation_peak_bytes, profile
    assert 0 < profile.non_torch_bytes < 8 << 30, profile
    del model
    gc.collect()
    torch.cuda.empty_cache()

    utilization = 0.2
    torch.cuda.reset_peak_memory_stats()
    caplog.set_level(logging.INFO, logger="engine.memory_profile")
    llm = LLM(model=str(mistral_7b_layers_dir), gpu_memory_utilization=utilization)
    assert any("memory profile:" in r.getMessage() for r in caplog.records)
    prompts = [[3 + i] * (100 + 300 * i) for i in range(8)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [16] * 8
    engine = llm.engine
    kv_bytes = engine.block_manager.num_blocks * block_bytes(model_config, 16, torch.bfloat16)
    total = torch.cuda.mem_get_info()[1]
    budget = utilization * total
    assert budget - params_bytes - (8 << 30) < kv_bytes < budget - params_bytes, (kv_bytes, budget)
    assert torch.cuda.max_memory_reserved() <= budget, (torch.cuda.max_memory_reserved(), budget)
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_async_scheduling_equals_it_off(
    tiny_mistral_sliding_dir: pathlib.Path, embedded_model_dir: pathlib.Path, dtype: str
) -> None:
    """Look-ahead scheduling with CUDA graphs: step N+1's pending tokens come from step N's sampled tokens on the device.
    Greedy outputs equal those with it off (batches may differ in size, so a near-tie may break the other way)."""
    for model_dir in (tiny_mistral_sliding_dir, embedded_model_dir):
        off, off_replays = _generate(model_dir, TEXT_PROMPTS, device="cuda", dtype=dtype)
        llm = LLM(model=str(model_dir), device="cuda", dtype=dtype, async_scheduling=True, **ENGINE_KWARGS)  # type: ignore[arg-type]
        on = llm.generate(TEXT_PROMPTS, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=5))
        graphs = llm.engine.runner.decode_graphs
        assert graphs is not None and graphs.num_replays > 0 and off_replays > 0
        assert llm.engine.num_look_ahead_steps > 0
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        assert_same_greedy(off, on, max_gap=1e-3 if dtype == "float32" else 0.5)
        del llm, graphs
        gc.collect()
        torch.cuda.empty_cache()
