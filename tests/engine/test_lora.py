"""Multi-LoRA serving against PEFT: greedy parity through adapters (tiny random Mistral and Llama, ranks 8 and 16, two
target sets, rsLoRA), a batch mixing the base model and three adapters, seeded sampling, the prefix cache keyed by
adapter, adapter slots under contention and preemption, runtime load/unload, and the refusals at load."""

from __future__ import annotations

import asyncio
import itertools
import json
import pathlib
import re
import shutil

import pytest

from engine import LLM, AsyncEngine, EngineConfig, SamplingParams
from engine.errors import EngineDeadError, InvalidRequestError
from engine.lora import LoraError, parse_lora_modules
from tests.conditions import async_wait_until
from tests.engine.lora_helpers import ATTENTION, peft_greedy, write_adapter, write_tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (rank, alpha, targets, use_rslora, seed)
ADAPTERS = {
    "attn8": (8, 16, ATTENTION, False, 1),
    "all16": (16, 8, ALL, True, 2),
    "mlp8": (8, 32, ["gate_proj", "up_proj", "down_proj", "o_proj"], False, 3),
}
# PEFT reads a transformers attribute that transformers 5 deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = list(range(100, 140))  # 40 tokens: over two full KV blocks, so a shared prefix cache would show
BOUND_S = 120.0  # turns a hang into a failure; never reached on a healthy run


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: pathlib.Path) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), embedded_model_dir)


@pytest.fixture(scope="module")
def mistral_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_mistral_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("mistral_adapters")
    return {name: write_adapter(tiny_mistral_dir, root / name, *spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("llama_adapters")
    return {name: write_adapter(tiny_llama_dir, root / name, *ADAPTERS[name]) for name in ("attn8", "all16")}


def modules(adapters: dict[str, pathlib.Path]) -> str:
    return ",".join(f"{name}={path}" for name, path in adapters.items())


@pytest.fixture(scope="module")
def mistral_llm(tiny_mistral_dir: pathlib.Path, mistral_adapters: dict[str, pathlib.Path]) -> LLM:
    return LLM(model=str(tiny_mistral_dir), lora_modules=modules(mistral_adapters), max_loras=3)


def lora(name: str | None, params: SamplingParams = GREEDY) -> SamplingParams:
    fields = {f: getattr(params, f) for f in ("max_tokens", "temperature", "ignore_eos", "seed", "n")}
    return SamplingParams(**fields, lora=name)


def tokens(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    return llm.generate(prompt, params)[0].outputs[0].token_ids


@pytest.mark.parametrize("name", ["attn8", "all16"])
def test_mistral_greedy_through_an_adapter_equals_peft(
    mistral_llm: LLM, tiny_mistral_dir: pathlib.Path, mistral_adapters: dict[str, pathlib.Path], name: str
) -> None:
    expected = peft_greedy(tiny_mistral_dir, mistral_adapters[name], PROMPT, GREEDY.max_tokens)
    assert tokens(mistral_llm, PROMPT, lora(name)) == expected
    assert expected != peft_greedy(tiny_mistral_dir, None, PROMPT, GREEDY.max_tokens), "the adapter changes nothing"


def test_llama_greedy_through_adapters_equals_peft(tiny_llama_dir: pathlib.Path, llama_adapters: dict[str, pathlib.Path]) -> None:
    llm = LLM(model=str(tiny_llama_dir), lora_modules=modules(llama_adapters), max_loras=1)  # one slot: they take turns
    blocks = llm.engine.block_manager
    for name, adapter_dir in llama_adapters.items():  # the same prompt twice: the second must not reuse the first's K/V
        hits = blocks.prefix_cache_hits
        assert tokens(llm, PROMPT, lora(name)) == peft_greedy(tiny_llama_dir, adapter_dir, PROMPT, GREEDY.max_tokens), name
        assert blocks.prefix_cache_hits == hits, "an adapter reused another adapter's cached blocks"
    assert tokens(llm, PROMPT, GREEDY) == peft_greedy(tiny_llama_dir, None, PROMPT, GREEDY.max_tokens)
    hits = blocks.prefix_cache_hits
    assert tokens(llm, PROMPT, lora("all16")) == tokens(llm, [*PROMPT], lora("all16"))
    assert blocks.prefix_cache_hits > hits  # the same adapter does reuse its own blocks


def test_a_batch_mixing_base_and_three_adapters_gives_each_what_it_gets_alone(
    mistral_llm: LLM, tiny_mistral_dir: pathlib.Path, mistral_adapters: dict[str, pathlib.Path]
) -> None:
    names = [None, "attn8", "all16", "mlp8"] * 3
    prompts = [list(range(200 + 7 * i, 230 + 11 * i)) for i in range(len(names))]
    alone = [tokens(mistral_llm, p, lora(n)) for p, n in zip(prompts, names, strict=True)]
    batched = mistral_llm.generate(prompts, [lora(n) for n in names])
    assert [r.outputs[0].token_ids for r in batched] == alone
    assert len({tuple(t) for t in alone[:4]}) == 4  # the base and each adapter differ on these prompts
    # Fewer slots than adapters and too few KV blocks: adapters wait for a slot and sequences are preempted
    squeezed = LLM(
        model=str(tiny_mistral_dir),
        lora_modules=modules(mistral_adapters),
        max_loras=2,
        num_kv_blocks=12,
        max_num_batched_tokens=64,
    )
    assert [r.outputs[0].token_ids for r in squeezed.generate(prompts, [lora(n) for n in names])] == alone
    assert squeezed.engine.scheduler.num_preemptions > 0


def test_seeded_sampling_and_n_with_adapters_are_batch_independent(mistral_llm: LLM) -> None:
    seeded = lora("all16", SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True, n=2))
    alone = mistral_llm.generate(PROMPT, seeded)[0]
    others = [list(range(300 + i, 330 + i)) for i in range(5)]
    unseeded = [lora(n, SamplingParams(max_tokens=10, temperature=1.0)) for n in ("attn8", None, "mlp8", "all16", None)]
    batch = mistral_llm.generate([*others[:2], PROMPT, *others[2:]], [*unseeded[:2], seeded, *unseeded[2:]])
    assert [c.token_ids for c in batch[2].outputs] == [c.token_ids for c in alone.outputs]
    base = mistral_llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True, n=2))[0]
    assert [c.token_ids for c in base.outputs] != [c.token_ids for c in alone.outputs]


def test_runtime_load_unload_and_reload(tiny_mistral_dir: pathlib.Path, mistral_adapters: dict[str, pathlib.Path]) -> None:
    llm = LLM(model=str(tiny_mistral_dir), enable_lora_runtime_updates=True, max_loras=1)
    with pytest.raises(InvalidRequestError, match="not served"):
        llm.generate(PROMPT, lora("x"))
    llm.engine.add_lora("x", str(mistral_adapters["attn8"]))
    first = tokens(llm, PROMPT, lora("x"))
    llm.engine.remove_lora("x")
    assert llm.engine.lora_names == []
    with pytest.raises(InvalidRequestError, match="not served"):
        llm.generate(PROMPT, lora("x"))
    llm.engine.add_lora("x", str(mistral_adapters["all16"]))  # the same name, other weights: no stale slot or K/V
    assert tokens(llm, PROMPT, lora("x")) == tokens(
        LLM(model=str(tiny_mistral_dir), lora_modules=f"x={mistral_adapters['all16']}"), PROMPT, lora("x")
    )
    assert tokens(llm, PROMPT, lora("x")) != first


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine_thread", "engine_process"])
def test_async_engine_loads_and_unloads_through_its_inbox(
    tiny_mistral_dir: pathlib.Path, mistral_adapters: dict[str, pathlib.Path], engine_process: bool
) -> None:
    """Adapter updates ride the inbox requests take, to the loop thread or across the engine-core process's pipe, and
    come back in a step report: errors keep their type (LoraError), and lora_names follows what the core serves."""
    config = EngineConfig(
        model=str(tiny_mistral_dir), enable_lora_runtime_updates=True, max_loras=1, engine_process=engine_process
    )
    engine = AsyncEngine(config)
    engine.start()
    expected = tokens(LLM(model=str(tiny_mistral_dir), lora_modules=f"x={mistral_adapters['attn8']}"), PROMPT, lora("x"))

    async def run(name: str | None) -> list[int]:
        deltas = [delta async for delta in engine.generate(f"r{next(request_ids)}", PROMPT, lora(name))]
        return [token for delta in deltas for token in delta.outputs[0].token_ids]

    async def scenario() -> None:
        await engine.load_lora_adapter("x", str(mistral_adapters["attn8"]))
        assert engine.lora_names == ["x"]
        assert await run("x") == expected != await run(None)
        with pytest.raises(LoraError, match="already loaded"):
            await engine.load_lora_adapter("x", str(mistral_adapters["all16"]))
        with pytest.raises(LoraError, match="does not exist"):
            await engine.load_lora_adapter("y", "/nonexistent")
        await engine.unload_lora_adapter("x")
        assert engine.lora_names == []
        with pytest.raises(InvalidRequestError, match="not served"):
            await run("x")
        with pytest.raises(LoraError, match="not loaded"):
            await engine.unload_lora_adapter("x")
        # A caller that gives up (an HTTP client gone) does not stop the update, nor break the loop
        loading = asyncio.create_task(engine.load_lora_adapter("x", str(mistral_adapters["attn8"])))
        await asyncio.sleep(0)  # the task runs up to its wait for the outcome: the update is in the inbox
        loading.cancel()
        await async_wait_until(lambda: engine.lora_names == ["x"], "the abandoned load to apply", BOUND_S)
        assert engine.is_alive and await run("x") == expected

    request_ids = itertools.count()
    try:
        asyncio.run(asyncio.wait_for(scenario(), BOUND_S))
    finally:
        engine.shutdown()
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.load_lora_adapter("x", str(mistral_adapters["attn8"])))


def _copy_with_config(src: pathlib.Path, dst: pathlib.Path, **changes: object) -> pathlib.Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_adapters_are_refused_at_load_naming_why(
    tmp_path: pathlib.Path,
    tiny_mistral_dir: pathlib.Path,
    tiny_llama_dir: pathlib.Path,
    mistral_adapters: dict[str, pathlib.Path],
    embedded_model_dir: pathlib.Path,
) -> None:
    base = mistral_adapters["attn8"]
    cases = {
        "rank 16 is above max_lora_rank 8": (mistral_adapters["all16"], {"max_lora_rank": 8}),
        "DoRA": (_copy_with_config(base, tmp_path / "dora", use_dora=True), {}),
        "modules_to_save": (_copy_with_config(base, tmp_path / "mts", modules_to_save=["lm_head"]), {}),
        "target module(s) embed_tokens": (
            _copy_with_config(base, tmp_path / "emb", target_modules=["q_proj", "embed_tokens"]),
            {},
        ),
        "rank_pattern": (_copy_with_config(base, tmp_path / "rp", rank_pattern={"q_proj": 4}), {}),
        "does not exist": (tmp_path / "missing", {}),
    }
    wide_base = write_tiny_llama(tmp_path / "wide_llama", embedded_model_dir, hidden_size=96)
    cases["a different base model"] = (write_adapter(wide_base, tmp_path / "wide", 8, 8, ATTENTION, False, 4), {})
    for message, (adapter_dir, settings) in cases.items():
        with pytest.raises(LoraError, match=re.escape(message)):
            LLM(model=str(tiny_llama_dir), lora_modules=f"a={adapter_dir}", **settings)
    with pytest.raises(LoraError, match="not name=path"):
        parse_lora_modules("a=/x,broken")
    with pytest.raises(InvalidRequestError, match="runs no adapters"):
        LLM(model=str(tiny_mistral_dir)).generate(PROMPT, lora("attn8"))
