"""LoRA over quantized base weights (QLoRA-style serving): the projections stay int8/int4 (--quantization) or the GGUF
file's own formats, the adapters' A/B stay float, and the output equals the same adapter over the dequantized weights.

Only float32 summation order may differ between the two sides (the kernel against F.linear on the weights it unpacks;
see test_quant.py and test_gguf.py), so greedy tokens must be equal and logprobs within SAME_WEIGHTS_TOLERANCE.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine import LLM, SamplingParams
from engine.gguf_checkpoint import gguf_model_dir
from engine.gguf_file import read_gguf
from engine.gguf_weights import gguf_model_config, gguf_weights
from engine.model.lora import LoraLinear
from engine.model.quant import dequantize
from engine.model.quant_linear import QuantLinear
from engine.outputs import RequestOutput
from tests.conftest import REPO_ROOT
from tests.engine.gguf_helpers import TOKENIZER_FILES, write_tiny_gguf
from tests.engine.lora_helpers import peft_greedy, write_adapter

# PEFT reads a transformers attribute that transformers 5 deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every kind of LoraLinear
KERNEL_DIR = REPO_ROOT / ".cache" / "sirocco"
SAME_WEIGHTS_TOLERANCE = 1e-4  # as test_gguf.py: float32 summation order only
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
PROMPT = list(range(100, 140))


def with_lora(name: str | None) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0, lora=name)


def tokens_and_logprobs(output: RequestOutput) -> tuple[list[int], torch.Tensor]:
    choice = output.outputs[0]
    assert choice.logprobs is not None
    return choice.token_ids, torch.tensor([t.sampled.logprob for t in choice.logprobs])


def assert_same_output(got: RequestOutput, expected: RequestOutput) -> None:
    got_ids, got_logprobs = tokens_and_logprobs(got)
    expected_ids, expected_logprobs = tokens_and_logprobs(expected)
    assert got_ids == expected_ids
    assert (got_logprobs - expected_logprobs).abs().max().item() <= SAME_WEIGHTS_TOLERANCE


def as_float_linear(layer: QuantLinear) -> nn.Linear:
    """An nn.Linear holding the float weight a QuantLinear computes with (the kernel's unpacked form, or the canonical
    one dequantized)."""
    if layer.packed is not None and layer.kernel is not None:
        weight = layer.kernel.dequantize(layer.packed)  # [N, K]: scales as the kernel stores them
    else:
        assert layer.weight is not None
        weight = dequantize(layer.weight).float()  # [N, K]
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
    return linear


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_mistral_dir: pathlib.Path) -> pathlib.Path:
    return write_adapter(tiny_mistral_dir, tmp_path_factory.mktemp("quant_adapter") / "all16", 16, 16, ALL, False, 5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_adapter_over_quantized_weights_equals_it_over_the_dequantized_weights(
    tiny_mistral_dir: pathlib.Path, adapter: pathlib.Path, method: str
) -> None:
    def serve() -> LLM:
        return LLM(model=str(tiny_mistral_dir), quantization=method, lora_modules=f"a={adapter}", cache_dir=str(KERNEL_DIR))

    quantized = serve()
    model = quantized.engine.runner.model
    wrapped = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 4 * 2 and all(isinstance(m.base, QuantLinear) for m in wrapped)  # the base stays quantized
    assert all(m.lora_a.dtype == torch.float32 for m in wrapped)  # the adapter does not
    got = {name: quantized.generate(PROMPT, with_lora(name))[0] for name in (None, "a")}
    mixed = quantized.generate([PROMPT, PROMPT], [with_lora(None), with_lora("a")])
    assert got[None].outputs[0].token_ids != got["a"].outputs[0].token_ids  # the adapter is applied
    # The reference: the same engine with each quantized layer (the lm_head too) swapped for its float weights.
    reference = serve()
    model = reference.engine.runner.model
    for module in model.modules():
        if isinstance(module, LoraLinear):
            assert isinstance(module.base, QuantLinear)
            module.base = as_float_linear(module.base)
    assert isinstance(model.quant_lm_head, QuantLinear)
    model.quant_lm_head = as_float_linear(model.quant_lm_head)
    for name in (None, "a"):
        expected = reference.generate(PROMPT, with_lora(name))[0]
        assert_same_output(got[name], expected)
    assert_same_output(mixed[0], got[None])
    assert_same_output(mixed[1], got["a"])


@pytest.fixture(scope="module")
def tiny_gguf_and_float(
    tmp_path_factory: pytest.TempPathFactory, embedded_gguf_dir: pathlib.Path
) -> tuple[pathlib.Path, pathlib.Path]:
    """(a tiny Llama GGUF's model directory, the same weights dequantized into a float32 safetensors checkpoint)."""
    root = tmp_path_factory.mktemp("lora_gguf")
    (root / "gguf").mkdir()
    gguf_path = write_tiny_gguf(root / "gguf" / "tiny.gguf", 256, embedded_gguf_dir)
    gguf_dir = gguf_model_dir(gguf_path, str(root / "cache"))
    float_dir = root / "float"
    float_dir.mkdir()
    gguf = read_gguf(gguf_path)
    floats = {}
    for name, weight in gguf_weights(gguf, gguf_model_config(gguf)):
        floats[name] = (weight if isinstance(weight, torch.Tensor) else dequantize(weight)).float().contiguous()
    save_file(floats, float_dir / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", *TOKENIZER_FILES):
        if (gguf_dir / name).is_file():
            shutil.copy(gguf_dir / name, float_dir / name)
    return gguf_dir, float_dir


def test_adapter_over_a_gguf_model_equals_peft_over_its_dequantized_weights(
    tiny_gguf_and_float: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    gguf_dir, float_dir = tiny_gguf_and_float
    adapter = write_adapter(float_dir, tmp_path / "adapter", 8, 16, ALL, True, 6)
    prompt = list(range(10, 50))
    served = LLM(model=str(gguf_dir), lora_modules=f"a={adapter}")
    wrapped = [m for m in served.engine.runner.model.modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(isinstance(m.base, QuantLinear) for m in wrapped)  # the file's int4/int8 weights
    got = served.generate([prompt, prompt], [with_lora("a"), with_lora(None)])
    assert got[0].outputs[0].token_ids == peft_greedy(float_dir, adapter, prompt, 12)
    assert got[1].outputs[0].token_ids == peft_greedy(float_dir, None, prompt, 12)
    assert got[0].outputs[0].token_ids != got[1].outputs[0].token_ids
    reference = LLM(model=str(float_dir), lora_modules=f"a={adapter}").generate(prompt, with_lora("a"))[0]
    assert_same_output(got[0], reference)
