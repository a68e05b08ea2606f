"""Loader: single-file and sharded safetensors, config reading, and the errors a user can act on."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from engine.config import EngineConfig
from engine.loader import ModelLoadError, read_model_config, resolve_model_dir
from tests.engine.model_helpers import load, paged_logits


def test_sharded_checkpoint_gives_the_same_logits(tiny_mistral_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_mistral_dir).save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = list(range(100, 140))
    single = paged_logits(load(tiny_mistral_dir), ids, prefill_len=40, chunk=40)
    sharded = paged_logits(load(tmp_path), ids, prefill_len=40, chunk=40)
    assert torch.equal(single, sharded)


def test_config_fields(tiny_mistral_sliding_dir: pathlib.Path, embedded_model_dir: pathlib.Path) -> None:
    mistral = read_model_config(tiny_mistral_sliding_dir)
    assert (mistral.model_type, mistral.sliding_window, mistral.head_dim, mistral.num_key_value_heads) == ("mistral", 8, 16, 2)
    llama = read_model_config(embedded_model_dir)
    assert (llama.model_type, llama.rope_theta, llama.tie_word_embeddings, llama.sliding_window) == (
        "llama",
        100000.0,
        True,
        None,
    )


def _copy_config(src: pathlib.Path, dst: pathlib.Path, **changes: object) -> pathlib.Path:
    dst.mkdir(exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_pickle_only_folder_is_refused(tiny_mistral_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = _copy_config(tiny_mistral_dir, tmp_path / "pickled")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(ModelLoadError, match=r"pickle weights \(pytorch_model.bin\).*safetensors only"):
        load(folder)


def test_unknown_architecture_names_the_supported_ones(tiny_mistral_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = _copy_config(tiny_mistral_dir, tmp_path / "gpt2", model_type="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'; supported: mistral, llama"):
        read_model_config(folder)


def test_missing_and_unexpected_tensors_are_listed(tiny_mistral_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_mistral_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as info:
        load(folder)
    assert "missing tensors: ['model.layers.1.mlp.up_proj.weight']" in str(info.value)
    assert "model.layers.0.extra.weight" in str(info.value)


def test_local_directory_is_used_as_is(tiny_mistral_dir: pathlib.Path) -> None:
    assert resolve_model_dir(EngineConfig(model=str(tiny_mistral_dir))) == tiny_mistral_dir


def test_missing_local_path_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match=r"is neither a directory nor a \.gguf file"):
        resolve_model_dir(EngineConfig(model=str(tmp_path / "nope")))


def test_hub_repo_offline_without_cache_fails_cleanly(tmp_path: pathlib.Path) -> None:
    """Repo ids go through huggingface_hub; offline with an empty cache it must raise, not hang or unpickle."""
    with pytest.raises(Exception, match=r"(?i)offline|cache|connect|not found|LocalEntryNotFound"):
        resolve_model_dir(EngineConfig(model="mistralai/Mistral-7B-Instruct-v0.3", download_dir=str(tmp_path)))


def test_a_consolidated_mistral_file_beside_the_hf_weights_is_never_read(
    tiny_mistral_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Mistral's repos hold consolidated.safetensors (other tensor names) beside the Hugging Face file: only the latter loads."""
    for path in tiny_mistral_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "consolidated.safetensors").write_bytes(b"not a safetensors file: reading it would fail")
    ids = list(range(100, 120))
    assert torch.equal(
        paged_logits(load(tmp_path), ids, prefill_len=20, chunk=20), paged_logits(load(tiny_mistral_dir), ids, 20, 20)
    )


def test_hub_downloads_skip_the_consolidated_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    import huggingface_hub

    asked: dict[str, object] = {}

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        asked.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model_dir(EngineConfig(model="mistralai/Mistral-7B-Instruct-v0.3")) == tmp_path
    assert asked["ignore_patterns"] == ["consolidated*.safetensors"]
    assert "*.safetensors" in asked["allow_patterns"]  # type: ignore[operator]
