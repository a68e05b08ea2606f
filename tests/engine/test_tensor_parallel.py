"""Tensor parallelism on CPU (gloo, 2 ranks): same tokens and logits as one rank (with LoRA adapters too), rank-slice
loading, failures end cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import engine.loader
from engine import LLM, AsyncEngine, EngineConfig, EngineDeadError, SamplingParams
from engine.core_client import ThreadCoreClient
from engine.errors import RankFailedError
from engine.llm_engine import LLMEngine
from engine.loader import load_model, read_model_config
from engine.model.parallel import Partition
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from tests.conditions import async_wait_until, wait_until
from tests.conftest import REPO_ROOT, write_tiny_mistral
from tests.engine.lora_helpers import ATTENTION, write_adapter

BOUND_S = 120.0  # turns a hang into a failure; never reached on a healthy run
MAX_STEPS = 500
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
PROMPTS = [[100, 200, 300, 400, 500], list(range(1000, 1037)), [7, 7, 7, 42]]  # 37 tokens: several blocks, chunked


@pytest.fixture(scope="module")
def one_kv_head_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> pathlib.Path:
    """4 query heads over 1 K/V head (fewer K/V heads than ranks: replicated), with a sliding window of 8."""
    return write_tiny_mistral(tmp_path_factory.mktemp("tiny_one_kv"), embedded_model_dir, sliding_window=8, num_key_value_heads=1)


def _config(model_dir: pathlib.Path, tp: int, **kwargs: Any) -> EngineConfig:
    return EngineConfig(model=str(model_dir), tensor_parallel_size=tp, num_kv_blocks=64, max_num_batched_tokens=32, **kwargs)


def _generate(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Run the requests together to the end; the token ids each one got."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in requests}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished:
            return tokens
        result = engine.step()
        assert not result.failed, result.failed
        for output in result.outputs:
            tokens[output.request_id].extend(t for c in output.outputs for t in c.token_ids)
    raise AssertionError(f"requests not finished after {MAX_STEPS} steps")


@torch.inference_mode()
def _logits(engine: LLMEngine, token_ids: list[int], prefill_len: int, chunk: int) -> torch.Tensor:
    """Logits at every position [len(token_ids), vocab] through the engine's runner (prefill in chunks, then decodes)."""
    runner, bs = engine.runner, engine.config.block_size
    table = list(range(5, 5 + -(-len(token_ids) // bs)))  # blocks not at 0, so a wrong offset cannot pass
    seq = Sequence("logits", 0, list(token_ids), len(token_ids), 0.0, block_table=table)
    out, start = [], 0
    while start < len(token_ids):
        n = min(chunk, prefill_len - start) if start < prefill_len else 1
        seq.num_computed_tokens = start
        hidden = runner._run_eager(runner.inputs.prepare(ScheduledBatch([seq], [n])))
        out.append(runner.model.compute_logits(hidden))
        start += n
    return torch.cat(out)


def _is_gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


class TestSameAsOneRank:
    @pytest.fixture(scope="class", params=["tiny_mistral_dir", "one_kv_head_dir"])
    def engines(self, request: pytest.FixtureRequest) -> Iterator[tuple[LLMEngine, LLMEngine]]:
        """(one rank, two ranks) on the same checkpoint: 4 heads over 2 K/V heads, then over 1."""
        model_dir: pathlib.Path = request.getfixturevalue(request.param)
        single = LLMEngine(_config(model_dir, 1))
        double = LLMEngine(_config(model_dir, 2))
        yield single, double
        double.close()
        assert double.tp_group is not None and all(_is_gone(pid) for pid in double.tp_group.pids)

    def test_logits_match(self, engines: tuple[LLMEngine, LLMEngine]) -> None:
        single, double = engines
        ids = torch.randint(0, single.model_config.vocab_size, (45,), generator=torch.Generator().manual_seed(3)).tolist()
        expected = _logits(single, ids, prefill_len=30, chunk=13)
        got = _logits(double, ids, prefill_len=30, chunk=13)
        assert (got - expected).abs().max().item() <= 1e-4
        assert expected.std().item() > 0.1  # far from flat: the comparison means something

    @pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
    def test_tokens_match(self, engines: tuple[LLMEngine, LLMEngine], params: SamplingParams) -> None:
        single, double = engines
        for i, prompt in enumerate(PROMPTS):
            expected = _generate(single, {f"a{i}": (prompt, params)})
            assert _generate(double, {f"b{i}": (prompt, params)}) == {f"b{i}": expected[f"a{i}"]}
            assert len(expected[f"a{i}"]) == 10

    def test_mixed_batch_gives_each_request_its_own_output(self, engines: tuple[LLMEngine, LLMEngine]) -> None:
        _, double = engines
        requests = {f"r{i}": (prompt, GREEDY if i % 2 else SEEDED) for i, prompt in enumerate(PROMPTS)}
        alone = {rid: _generate(double, {rid: request})[rid] for rid, request in requests.items()}
        assert _generate(double, requests) == alone


def test_async_output_forced_on_across_ranks(tiny_mistral_dir: pathlib.Path) -> None:
    """Off by default with ranks; forced on, two ranks still give one rank's tokens (rank 0 launches, then waits)."""
    single = LLMEngine(_config(tiny_mistral_dir, 1))
    double = LLMEngine(_config(tiny_mistral_dir, 2, async_output=True))
    try:
        assert double.is_async_output
        requests = {f"r{i}": (prompt, GREEDY if i % 2 else SEEDED) for i, prompt in enumerate(PROMPTS)}
        assert _generate(double, requests) == _generate(single, requests)
    finally:
        double.close()


# name -> (rank, alpha, targets, use_rslora, seed): every projection (fused q|k|v and gate|up, row-parallel o and down)
LORA_ADAPTERS = {
    "all16": (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True, 2),
    "mlp8": (8, 32, ["gate_proj", "up_proj", "down_proj", "o_proj"], False, 3),
    "attn8": (8, 16, ATTENTION, False, 1),  # loaded at runtime
}


def _tokens_and_logprobs(llm: LLM, prompts: list[list[int]], names: list[str | None]) -> list[tuple[list[int], list[float]]]:
    """One batch, greedy, each request through its adapter (None: the base model) -> per request (tokens, logprobs)."""
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0, lora=name) for name in names]
    results = []
    for output in llm.generate(prompts, params):
        (choice,) = output.outputs
        assert choice.logprobs is not None
        results.append((choice.token_ids, [entry.sampled.logprob for entry in choice.logprobs]))
    return results


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT on transformers 5
def test_lora_adapters_across_ranks_match_one_rank(tmp_path: pathlib.Path, tiny_mistral_dir: pathlib.Path) -> None:
    """Two adapters and the base model in one batch, then an adapter loaded at runtime into a reused slot: two ranks
    (A and B sliced like the layers they adapt) give one rank's tokens, and its logprobs within float rounding."""
    adapters = {name: write_adapter(tiny_mistral_dir, tmp_path / name, *spec) for name, spec in LORA_ADAPTERS.items()}
    settings = {
        "lora_modules": f"all16={adapters['all16']},mlp8={adapters['mlp8']}",
        "max_loras": 2,  # the runtime adapter takes the slot of one of the first two
        "enable_lora_runtime_updates": True,
    }
    single = LLM(model=str(tiny_mistral_dir), num_kv_blocks=64, max_num_batched_tokens=32, **settings)
    double = LLM(model=str(tiny_mistral_dir), tensor_parallel_size=2, num_kv_blocks=64, max_num_batched_tokens=32, **settings)
    try:
        prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]]  # the 37-token PROMPTS[1] runs in chunks
        names = [None, "all16", "mlp8", "mlp8", None, "all16"]
        expected = _tokens_and_logprobs(single, prompts, names)
        assert len({tuple(tokens) for tokens, _ in expected[:3]}) == 3  # each adapter changes the output: a real check
        batches = [(prompts, names, expected)]
        for llm in (single, double):
            llm.engine.add_lora("late", str(adapters["attn8"]))
        late_names = ["late", None, "all16", "late"]
        late_expected = _tokens_and_logprobs(single, prompts[:4], late_names)
        assert late_expected[0][0] != late_expected[1][0]  # the runtime adapter changes PROMPTS[0]'s output
        batches.append((prompts[:4], late_names, late_expected))
        for batch_prompts, batch_names, batch_expected in batches:
            got = _tokens_and_logprobs(double, batch_prompts, batch_names)
            assert [tokens for tokens, _ in got] == [tokens for tokens, _ in batch_expected], batch_names
            for (_, logprobs), (_, expected_logprobs) in zip(got, batch_expected, strict=True):
                assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs, strict=True)) <= 1e-3
    finally:
        double.engine.close()
    assert double.engine.tp_group is not None and all(_is_gone(pid) for pid in double.engine.tp_group.pids)


def test_rank_loads_only_its_slices(tiny_mistral_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 reads half of every split tensor through get_slice, the rest whole, and no lm_head: bytes counted."""
    bytes_read: dict[str, int] = {}

    class CountingSlice:
        def __init__(self, view: Any, name: str) -> None:
            self.view, self.name = view, name

        def __getitem__(self, index: Any) -> torch.Tensor:
            tensor = self.view[index]
            bytes_read[self.name] = bytes_read.get(self.name, 0) + tensor.numel() * tensor.element_size()
            return tensor

    class CountingFile:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def keys(self) -> list[str]:
            return list(self.handle.keys())

        def get_tensor(self, name: str) -> torch.Tensor:
            return CountingSlice(self.handle.get_slice(name), name)[:]

        def get_slice(self, name: str) -> CountingSlice:
            return CountingSlice(self.handle.get_slice(name), name)

    @contextmanager
    def counting_safe_open(*args: Any, **kwargs: Any) -> Iterator[CountingFile]:
        with safe_open(*args, **kwargs) as handle:
            yield CountingFile(handle)

    monkeypatch.setattr(engine.loader, "safe_open", counting_safe_open)
    config = read_model_config(tiny_mistral_dir)
    partition = Partition(1, 2)
    model = load_model(tiny_mistral_dir, config, torch.device("cpu"), torch.float32, partition)

    full = load_file(tiny_mistral_dir / "model.safetensors")
    split = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj")
    for name, tensor in full.items():
        nbytes = tensor.numel() * tensor.element_size()
        if name == "lm_head.weight":
            assert name not in bytes_read  # only rank 0 computes logits
        elif any(f".{module}." in name for module in split):
            assert bytes_read[name] == nbytes // 2, name
        else:
            assert bytes_read[name] == nbytes, name
    # and the halves are the right ones: rank 1 holds query heads 2-3, K/V head 1, MLP columns 64-127
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, k, v = attn.qkv_proj.weight.split([32, 16, 16])
    assert torch.equal(q, full["model.layers.0.self_attn.q_proj.weight"][32:64])
    assert torch.equal(k, full["model.layers.0.self_attn.k_proj.weight"][16:32])
    assert torch.equal(v, full["model.layers.0.self_attn.v_proj.weight"][16:32])
    assert torch.equal(attn.o_proj.weight, full["model.layers.0.self_attn.o_proj.weight"][:, 32:64])
    assert torch.equal(mlp.down_proj.weight, full["model.layers.0.mlp.down_proj.weight"][:, 64:128])
    assert torch.equal(mlp.gate_up_proj.weight[64:], full["model.layers.0.mlp.up_proj.weight"][64:128])


def test_replicated_kv_head_and_uneven_splits(tiny_mistral_dir: pathlib.Path) -> None:
    config = read_model_config(tiny_mistral_dir)  # 4 heads, 2 K/V heads, head_dim 16
    one_kv = dataclasses.replace(config, num_key_value_heads=1)
    assert [Partition(r, 4).shard("model.layers.0.self_attn.k_proj.weight", config) for r in range(4)] == [
        (0, 0, 16),
        (0, 0, 16),
        (0, 16, 32),
        (0, 16, 32),
    ]
    assert Partition(1, 2).shard("model.layers.0.self_attn.v_proj.weight", one_kv) == (0, 0, 16)
    assert Partition(1, 2).shard("model.norm.weight", config) is None
    with pytest.raises(ValueError, match="tensor_parallel_size 3"):
        Partition(0, 3).check(config)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)


def test_killed_rank_fails_pending_requests_and_the_engine(tiny_mistral_dir: pathlib.Path) -> None:
    engine = AsyncEngine(_config(tiny_mistral_dir, 2))
    engine.start()
    try:
        assert isinstance(engine.client, ThreadCoreClient)
        tp_group = engine.client.core.engine.tp_group
        assert tp_group is not None
        (pid,) = tp_group.pids
        errors = asyncio.run(_kill_mid_generation(engine, pid))
        assert all(isinstance(e, EngineDeadError) for e in errors), errors
        stats = engine.stats()
        assert not stats.is_alive and stats.error is not None and "rank 1 died (killed by SIGKILL)" in stats.error
        wait_until(lambda: _is_gone(pid), "the killed rank to be reaped", BOUND_S)
    finally:
        engine.shutdown()


async def _kill_mid_generation(engine: AsyncEngine, pid: int) -> list[BaseException]:
    """Two long requests; once the first has streamed a token, SIGKILL rank 1. Returns how each request ended."""
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    first_token = asyncio.Event()

    async def consume(request_id: str) -> BaseException:
        try:
            async for _ in engine.generate(request_id, PROMPTS[0], long):
                first_token.set()
        except Exception as exc:
            return exc
        raise AssertionError(f"{request_id} finished although rank 1 was killed")

    tasks = [asyncio.create_task(consume(request_id)) for request_id in ("x", "y")]
    await asyncio.wait_for(first_token.wait(), BOUND_S)
    os.kill(pid, signal.SIGKILL)
    await async_wait_until(lambda: all(t.done() for t in tasks), "both requests to end", BOUND_S)
    return [t.result() for t in tasks]


def test_hung_rank_times_out(tiny_mistral_dir: pathlib.Path) -> None:
    """A stopped rank (alive, never answering) fails the step after distributed_timeout_s instead of hanging."""
    engine = LLMEngine(_config(tiny_mistral_dir, 2, distributed_timeout_s=10.0))
    try:
        assert engine.tp_group is not None
        (pid,) = engine.tp_group.pids
        engine.add_request("a", PROMPTS[0], GREEDY)
        engine.step()  # one healthy step first
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(RankFailedError, match="did not complete within 10 s"):
            for _ in range(MAX_STEPS):
                engine.step()
        assert _is_gone(pid)  # killed and reaped by the failure
    finally:
        engine.close()


def test_ranks_exit_when_the_engine_process_is_killed(tiny_mistral_dir: pathlib.Path) -> None:
    script = textwrap.dedent(
        f"""
        from engine import EngineConfig
        from engine.llm_engine import LLMEngine

        if __name__ == "__main__":
            engine = LLMEngine(EngineConfig(model={str(tiny_mistral_dir)!r}, tensor_parallel_size=2, num_kv_blocks=16))
            print(*engine.tp_group.pids, flush=True)
            input()  # hold until killed
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            pids = [int(p) for p in parent.stdout.readline().split()]
            assert len(pids) == 1 and not _is_gone(pids[0])
            parent.kill()
            parent.wait(timeout=BOUND_S)
            wait_until(lambda: all(_is_gone(p) or _is_zombie(p) for p in pids), "rank 1 to exit after its parent", BOUND_S)
        finally:
            parent.kill()


def _is_zombie(pid: int) -> bool:
    """An exited process nobody has reaped yet (an orphan waits for the container's init to reap it)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
