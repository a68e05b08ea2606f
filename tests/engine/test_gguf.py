"""Serving GGUF files: the header parser, exact decoding into canonical weights, the config, logits against the same
weights in float32 and against transformers' own GGUF reader, clear errors for damaged files, and the embedded model."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import save_file

from engine import LLM, SamplingParams, gguf_layers
from engine.config import ConfigError, EngineConfig
from engine.gguf_checkpoint import find_gguf_file, gguf_model_dir, hf_config
from engine.gguf_file import GGUFError, read_gguf
from engine.gguf_weights import decode_tensor, gguf_model_config, gguf_weights, hf_name
from engine.loader import ModelLoadError, load_model, read_model_config, resolve_model_dir
from engine.model.parallel import Partition
from engine.model.quant import Int4Weight, dequantize, weight_shape
from engine.model.quant_linear import QuantLinear
from engine.preflight import check_config
from tests.engine.gguf_helpers import NUM_HEADS, NUM_KV_HEADS, hf_rows, write_tiny_gguf
from tests.engine.model_helpers import load, paged_logits

VOCAB = 256
# Logits of the GGUF-served model against the same weights dequantized to float32 and served as safetensors.
# Both the C kernel (engine/model/quant_kernels.py, float32 activations against the weights unpacked to float) and the
# PyTorch path (QuantLinear dequantizes, then a float matmul) compute with the same numbers (the decoding is exact), so
# only float32 accumulation order may differ: measured on logits of std 0.8, PyTorch path max 5e-7, kernel mean 5e-7 and
# max 4e-6; 1e-4 leaves room for that and nothing else (a wrong nibble, scale or row moves logits by 1e-2 or more).
SAME_WEIGHTS_TOLERANCE = 1e-4
# Against transformers' Llama reading the same GGUF (its own dequantize and row un-permutation), as test_model.py.
TRANSFORMERS_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf", VOCAB)


@pytest.fixture(scope="module")
def tiny_gguf_dir(
    tiny_gguf: pathlib.Path, tmp_path_factory: pytest.TempPathFactory, embedded_gguf_dir: pathlib.Path
) -> pathlib.Path:
    """The model directory serving tiny.gguf (tokenizer files beside the GGUF: the embedded model's, vocab cut to fit)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(embedded_gguf_dir / name, tiny_gguf.parent / name)
    return gguf_model_dir(tiny_gguf, str(tmp_path_factory.mktemp("cache")))


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_header_matches_gguf_reader(tiny_gguf: pathlib.Path) -> None:
    ours = read_gguf(tiny_gguf)
    reader = GGUFReader(tiny_gguf)
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert (info.tensor_type, info.offset, info.num_bytes) == (t.tensor_type, t.data_offset, t.n_bytes), t.name
        assert list(info.dims) == t.shape.tolist()
    assert ours.metadata["llama.attention.head_count_kv"] == NUM_KV_HEADS
    assert ours.metadata["general.architecture"] == "llama"


def test_decoded_weights_dequantize_exactly_to_gguf_dequantize(tiny_gguf: pathlib.Path) -> None:
    gguf = read_gguf(tiny_gguf)
    decoded = dict(gguf_weights(gguf, gguf_model_config(gguf)))
    reader = GGUFReader(tiny_gguf)
    kinds = set()
    for t in reader.tensors:
        expected = gguf_dequantize(t.data, t.tensor_type).reshape(t.shape.tolist()[::-1])  # GGUF's rows, float32
        if ".attn_q." in t.name:
            expected = hf_rows(expected, NUM_HEADS)
        elif ".attn_k." in t.name:
            expected = hf_rows(expected, NUM_KV_HEADS)
        weight = decoded[str(hf_name(t.name))]
        kinds.add((t.tensor_type, type(weight).__name__))
        got = weight.float() if isinstance(weight, torch.Tensor) else dequantize(weight)
        assert torch.equal(got, torch.from_numpy(np.array(expected, dtype=np.float32))), t.name
    Q = GGMLQuantizationType
    assert kinds == {
        (Q.Q4_0, "Int4Weight"),
        (Q.Q4_1, "Int4Weight"),
        (Q.Q8_0, "Int8Weight"),
        (Q.F16, "Tensor"),
        (Q.F32, "Tensor"),
    }


def test_int4_codes_are_the_files_nibbles() -> None:
    """One Q4_0 block by hand: byte j holds values j (low nibble) and j + 16 (high); d is the leading fp16."""
    codes = np.arange(32, dtype=np.uint8) % 16  # value i has code i % 16
    block = np.float16(0.5).tobytes() + bytes(int(codes[j]) | int(codes[j + 16]) << 4 for j in range(16))
    info = read_info(GGMLQuantizationType.Q4_0, (32, 1), len(block))
    weight = decode_tensor(info, np.frombuffer(block, dtype=np.uint8).reshape(1, -1))
    assert isinstance(weight, Int4Weight) and weight.group_size == 32
    assert weight.packed[0, 0].item() == 0x10 and weight.packed[0, 8].item() == 0x10  # codes 0, 1 then 16 % 16, 17 % 16
    assert weight.scales.tolist() == [[0.5]] and weight.zeros.tolist() == [[-4.0]]
    assert dequantize(weight)[0, :3].tolist() == [-4.0, -3.5, -3.0]


def read_info(kind: GGMLQuantizationType, dims: tuple[int, ...], num_bytes: int):  # type: ignore[no-untyped-def]
    from engine.gguf_file import TensorInfo

    return TensorInfo("t", dims, kind, 0, num_bytes)


def test_k_quants_are_dequantized_like_gguf(caplog: pytest.LogCaptureFixture) -> None:
    """Types without an exact canonical form (here Q6_K) become float32 equal to gguf.quants.dequantize's."""
    raw = np.random.default_rng(0).integers(0, 256, size=(3, 210), dtype=np.uint8)  # 3 rows of one Q6_K block (256)
    raw[:, 208:210] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # a finite d for each block
    weight = decode_tensor(read_info(GGMLQuantizationType.Q6_K, (256, 3), raw.size), raw)
    assert isinstance(weight, torch.Tensor) and weight.shape == (3, 256)
    assert torch.equal(weight, torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType.Q6_K)))


def test_config_from_metadata_round_trips_through_config_json(tiny_gguf_dir: pathlib.Path, tiny_gguf: pathlib.Path) -> None:
    config = gguf_model_config(read_gguf(tiny_gguf))
    assert read_model_config(tiny_gguf_dir) == config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert not config.tie_word_embeddings and config.vocab_size == VOCAB
    assert find_gguf_file(tiny_gguf_dir) == tiny_gguf.resolve()
    assert json.loads((tiny_gguf_dir / "config.json").read_text()) == hf_config(read_gguf(tiny_gguf), config)


def test_logits_equal_the_same_weights_in_float32(
    tiny_gguf_dir: pathlib.Path, tiny_gguf: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = read_gguf(tiny_gguf)
    floats = {}
    for name, weight in gguf_weights(gguf, gguf_model_config(gguf)):
        floats[name] = (weight if isinstance(weight, torch.Tensor) else dequantize(weight)).float().contiguous()
    save_file(floats, tmp_path / "model.safetensors")
    shutil.copy(tiny_gguf_dir / "config.json", tmp_path / "config.json")
    ids = _ids(40, seed=1)
    expected = paged_logits(load(tmp_path), ids, prefill_len=30, chunk=16)
    assert expected.std().item() > 0.1  # far from flat: a wrong weight would show
    kernel_model = load(tiny_gguf_dir)
    # Every projection and the lm_head run on the file's own int4/int8 weights (the fused parts share a format).
    assert sum(isinstance(m, QuantLinear) for m in kernel_model.modules()) == 2 * 4 + 1
    # The C kernel where it builds (gcc, AVX2), else the PyTorch path, which is checked on its own below either way.
    assert (paged_logits(kernel_model, ids, prefill_len=30, chunk=16) - expected).abs().max().item() <= SAME_WEIGHTS_TOLERANCE
    monkeypatch.setattr(gguf_layers, "load_quant_kernel", lambda kernel_dir: None)  # QuantLinear's PyTorch path
    got = paged_logits(load(tiny_gguf_dir), ids, prefill_len=30, chunk=16)
    assert (got - expected).abs().max().item() <= SAME_WEIGHTS_TOLERANCE


def test_projections_whose_parts_differ_in_format_stay_float(
    tiny_gguf_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v in Q8_0 beside q/k in int4: qkv_proj cannot be one quantized layer, so it runs on the dequantized floats."""
    mixed = write_tiny_gguf(tmp_path / "mixed.gguf", VOCAB, tiny_gguf_dir, layer_types={"attn_v": GGMLQuantizationType.Q8_0})
    model_dir = gguf_model_dir(mixed, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_layers, "load_quant_kernel", lambda kernel_dir: None)
    model = load(model_dir)
    for layer in model.model.layers:
        assert not isinstance(layer.self_attn.qkv_proj, QuantLinear) and isinstance(layer.self_attn.o_proj, QuantLinear)
    gguf = read_gguf(mixed)
    q = dict(gguf_weights(gguf, gguf_model_config(gguf)))["model.layers.0.self_attn.q_proj.weight"]
    assert not isinstance(q, torch.Tensor)
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight[: weight_shape(q)[0]], dequantize(q))
    ids = _ids(12, seed=4)
    assert torch.isfinite(paged_logits(model, ids, prefill_len=12, chunk=12)).all()


def test_logits_match_transformers_reading_the_same_gguf(
    tiny_gguf_dir: pathlib.Path, tiny_gguf: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' GGUF reader is an independent decoder, name map and q/k un-permutation. Our side runs QuantLinear's
    PyTorch path, which rounds no activations (the C kernel's own error is measured above)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(gguf_layers, "load_quant_kernel", lambda kernel_dir: None)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32).eval()
    ids = _ids(40, seed=2)
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0].float()
    got = paged_logits(load(tiny_gguf_dir), ids, prefill_len=25, chunk=10)
    assert (got - expected).abs().max().item() <= TRANSFORMERS_TOLERANCE


def test_tensor_parallel_ranks_take_their_slices(tiny_gguf_dir: pathlib.Path, tiny_gguf: pathlib.Path) -> None:
    """Under tensor parallelism a GGUF model runs on float weights (quantized layers are one-rank only for now)."""
    gguf = read_gguf(tiny_gguf)
    floats = {n: w if isinstance(w, torch.Tensor) else dequantize(w) for n, w in gguf_weights(gguf, gguf_model_config(gguf))}
    rank1 = load_model(tiny_gguf_dir, read_model_config(tiny_gguf_dir), torch.device("cpu"), torch.float32, Partition(1, 2))
    assert not any(isinstance(m, QuantLinear) for m in rank1.modules())
    for i, layer in enumerate(rank1.model.layers):
        down, o = layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight  # the second half of the input columns
        assert torch.equal(down, floats[f"model.layers.{i}.mlp.down_proj.weight"][:, down.shape[1] :])
        assert torch.equal(o, floats[f"model.layers.{i}.self_attn.o_proj.weight"][:, o.shape[1] :])
        q_rows = layer.self_attn.q_size  # rank 1's heads 2 and 3
        q = floats[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert torch.equal(layer.self_attn.qkv_proj.weight[:q_rows], q[q_rows:])


# --- damaged files ------------------------------------------------------------------------------------------------


def _table_entry(data: bytes, name: str) -> int:
    """Offset of the n_dims field that follows `name` in the tensor table."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def _damaged(tiny_gguf: pathlib.Path, tmp_path: pathlib.Path, name: str, field: str, value: int) -> pathlib.Path:
    """A copy of tiny.gguf with one field of `name`'s tensor-table entry overwritten (the entry is n_dims u32,
    dims u64 x n_dims, type u32, offset u64)."""
    data = bytearray(tiny_gguf.read_bytes())
    at = _table_entry(bytes(data), name)
    num_dims = struct.unpack_from("<I", data, at)[0]
    offsets = {"dim0": at + 4, "type": at + 4 + 8 * num_dims, "offset": at + 8 + 8 * num_dims}
    struct.pack_into("<I" if field == "type" else "<Q", data, offsets[field], value)
    out = tmp_path / f"{field}.gguf"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("type", 999, "blk.0.attn_k.weight has unknown GGML type 999"),
        ("offset", 1 << 40, "blk.0.attn_k.weight: its .* bytes at offset .* run past the end of the file"),
        ("offset", 3, "blk.0.attn_k.weight: data offset 3 is not a multiple of the alignment 32"),
        ("dim0", 33, r"blk.0.attn_k.weight: shape \(33, 32\) does not fit Q4_1 blocks of 32 values"),
    ],
)
def test_a_damaged_tensor_entry_names_the_tensor(
    tiny_gguf: pathlib.Path, tmp_path: pathlib.Path, field: str, value: int, message: str
) -> None:
    with pytest.raises(GGUFError, match=message):
        read_gguf(_damaged(tiny_gguf, tmp_path, "blk.0.attn_k.weight", field, value))


def test_a_truncated_file_names_the_tensor_and_the_loader_says_so(tiny_gguf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    gguf = read_gguf(tiny_gguf)
    last = max(gguf.tensors.values(), key=lambda info: info.offset)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: last.offset + 10])
    with pytest.raises(GGUFError, match=f"tensor {last.name}: .* run past the end of the file"):
        read_gguf(cut)
    with pytest.raises(ModelLoadError, match=f"tensor {last.name}"):
        resolve_model_dir(EngineConfig(model=str(cut), cache_dir=str(tmp_path / "cache")))
    header = tmp_path / "header.gguf"
    header.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(GGUFError, match="truncated GGUF header: "):
        read_gguf(header)


def test_not_a_gguf_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(path)


def test_a_gguf_without_tokenizer_says_what_to_add(tiny_gguf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    shutil.copy(tiny_gguf, tmp_path / "only.gguf")
    with pytest.raises(ModelLoadError, match=r"only\.gguf carries no tokenizer .* put the model's tokenizer files beside it"):
        resolve_model_dir(EngineConfig(model=str(tmp_path), cache_dir=str(tmp_path / "cache")))


def test_a_folder_with_several_gguf_files_needs_a_choice(tiny_gguf_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    tiny_gguf = find_gguf_file(tiny_gguf_dir)
    assert tiny_gguf is not None
    for name in ("a.gguf", "b.gguf", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_gguf.parent / (name if name.startswith("tok") else tiny_gguf.name), tmp_path / name)
    with pytest.raises(ModelLoadError, match=r"several GGUF files .* SIROCCO_GGUF_FILE"):
        resolve_model_dir(EngineConfig(model=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    with pytest.raises(ModelLoadError, match=r"no GGUF file 'c\.gguf'; it has: a\.gguf, b\.gguf"):
        resolve_model_dir(EngineConfig(model=str(tmp_path), gguf_file="c.gguf", cache_dir=str(tmp_path / "cache")))
    chosen = resolve_model_dir(EngineConfig(model=str(tmp_path), gguf_file="b.gguf", cache_dir=str(tmp_path / "cache")))
    assert find_gguf_file(chosen) == (tmp_path / "b.gguf").resolve()


# --- the embedded model -------------------------------------------------------------------------------------------

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one short sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "List three prime numbers."}],
]
# Where the two paths may part: only at a near-tie, each path's pick the other's runner-up, within this many logits.
# The GGUF's Q4_1/Q8_0 weights move this model's logits against float32's by tenths at most. With a kernel that also
# rounded activations to int8, over 8 chat prompts x 32 tokens (LLM.chat, greedy, logprobs=2) 5 parted, at margins of
# up to 0.25; with float activations these 4 prompts x 16 tokens all match.
MAX_PARTING_MARGIN = 0.5


def test_embedded_model_serves_from_its_gguf(embedded_gguf_dir: pathlib.Path, embedded_model_dir: pathlib.Path) -> None:
    from engine.embedded import GGUF_FILE, find_gguf_dir

    assert find_gguf_file(embedded_gguf_dir) == (find_gguf_dir() / GGUF_FILE).resolve()
    names = {p.name for p in embedded_gguf_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not [n for n in names if n.endswith((".safetensors", ".gguf"))]  # no copy of the weights in the cache
    assert read_model_config(embedded_gguf_dir) == read_model_config(embedded_model_dir)


def test_embedded_greedy_output_equals_the_float32_conversion(
    embedded_gguf_dir: pathlib.Path, embedded_model_dir: pathlib.Path
) -> None:
    """Same tokens, or the paths part at a near-tie: each picks the other's runner-up, by a margin the GGUF's weight
    quantization can flip."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)
    small = {"kv_cache_gib": 0.05, "max_model_len": 256}
    own = LLM(model=str(embedded_gguf_dir), **small).chat(PROMPTS, params)
    float32 = LLM(model=str(embedded_model_dir), **small).chat(PROMPTS, params)
    for prompt, mine, ref in zip(PROMPTS, own, float32, strict=True):
        got, expected = mine.outputs[0], ref.outputs[0]
        assert len(got.token_ids) == len(expected.token_ids) == 16
        if got.token_ids == expected.token_ids:
            continue
        at = next(i for i, (a, b) in enumerate(zip(got.token_ids, expected.token_ids, strict=True)) if a != b)
        assert got.logprobs is not None and expected.logprobs is not None
        ours, theirs = got.token_ids[at], expected.token_ids[at]
        top_float32 = {lp.token_id: lp.logprob for lp in expected.logprobs[at].top}
        top_gguf = {lp.token_id: lp.logprob for lp in got.logprobs[at].top}
        assert ours in top_float32 and theirs in top_gguf, f"{prompt}: parted at token {at} away from the top 2"
        margins = (top_float32[theirs] - top_float32[ours], top_gguf[ours] - top_gguf[theirs])
        assert max(margins) <= MAX_PARTING_MARGIN, f"{prompt}: parted at token {at} with margins {margins}"


def test_preflight_reads_the_gguf_header(tiny_gguf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """check_config fails in a second on a context the GGUF's metadata cannot hold, or an ambiguous folder."""
    check_config(EngineConfig(model=str(tiny_gguf), max_model_len=512))
    with pytest.raises(ConfigError, match="above the model's max_position_embeddings") as raised:
        check_config(EngineConfig(model=str(tiny_gguf), max_model_len=513))
    assert raised.value.field == "max_model_len"
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf, tmp_path / name)
    with pytest.raises(ConfigError, match="several GGUF files") as raised:
        check_config(EngineConfig(model=str(tmp_path)))
    assert raised.value.field == "gguf_file"
    check_config(EngineConfig(model=str(tmp_path), gguf_file="a.gguf"))
