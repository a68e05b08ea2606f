"""A GGUF file served as a model directory: which file a folder holds, and its directory in Sirocco's cache.

That directory is written once per GGUF file (keyed by its path and header) and holds config.json, made from the GGUF
metadata, the tokenizer files (the GGUF's folder's own, else extracted from the GGUF metadata by transformers, the
slow part, done once) and gguf_file.json, naming the GGUF file. Everything downstream (read_model_config, Tokenizer,
tensor-parallel ranks) reads it like any model directory; load_model reads the weights from the GGUF file itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from engine.cache_dir import build_once, cache_root
from engine.gguf_file import GGUFError, GGUFFile, read_gguf
from engine.gguf_weights import gguf_model_config
from engine.model.config import ModelConfig

logger = logging.getLogger(__name__)

GGUF_POINTER = "gguf_file.json"
# Tokenizer files taken from the GGUF's own folder when it has them (a Hub repo shipping both).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class GGUFSelectionError(ValueError):
    """A folder whose GGUF file cannot be chosen (none of that name, or several and none named)."""


def find_gguf_file(model_dir: Path) -> Path | None:
    """The GGUF file a directory made by gguf_model_dir serves, or None for any other model directory."""
    pointer = model_dir / GGUF_POINTER
    if not pointer.is_file():
        return None
    return Path(json.loads(pointer.read_text())["path"])


def gguf_cache_root(model_dir: Path) -> Path:
    """The Sirocco cache a directory made by gguf_model_dir lives in (<cache>/gguf/<name>-<key>): kernels build there."""
    return model_dir.parent.parent


def pick_gguf_file(folder: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file to serve from `folder`: the one named, else the only one when there are no safetensors; else None."""
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise GGUFSelectionError(f"{folder} has no GGUF file {gguf_file!r}; it has: {', '.join(found) or 'none'}")
        return folder / gguf_file
    if not found or any(folder.glob("*.safetensors")):
        return None  # a safetensors checkpoint (served as before) or nothing servable (the loader says so)
    if len(found) > 1:
        raise GGUFSelectionError(f"{folder} holds several GGUF files ({', '.join(found)}); choose one with SIROCCO_GGUF_FILE")
    return folder / found[0]


def gguf_model_dir(gguf_path: Path, cache_dir: str | None) -> Path:
    """The model directory for `gguf_path` in Sirocco's cache, written on first use."""
    gguf_path = gguf_path.expanduser().resolve()
    gguf = read_gguf(gguf_path)
    config = gguf_model_config(gguf)
    key = hashlib.sha256(f"{gguf_path}\n{gguf.header_sha256}".encode()).hexdigest()[:16]
    target = cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{key}"
    return build_once(target, _is_complete, lambda out: _write_model_dir(gguf, config, out))


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in (GGUF_POINTER, "config.json", "tokenizer_config.json"))


def _write_model_dir(gguf: GGUFFile, config: ModelConfig, out: Path) -> None:
    start_s = time.perf_counter()
    own = [gguf.path.parent / name for name in TOKENIZER_FILES if (gguf.path.parent / name).is_file()]
    if any(p.name in ("tokenizer.json", "tokenizer_config.json") for p in own):
        for path in own:
            shutil.copy(path, out / path.name)
    elif "tokenizer.ggml.model" not in gguf.metadata:
        raise GGUFError(
            f"{gguf.path.name} carries no tokenizer (no tokenizer.ggml.model) and its folder has no tokenizer.json or "
            "tokenizer_config.json; put the model's tokenizer files beside it"
        )
    else:
        from transformers import AutoTokenizer

        logger.info("extracting the tokenizer and chat template of %s (once)", gguf.path.name)
        tokenizer: Any = AutoTokenizer.from_pretrained(gguf.path.parent, gguf_file=gguf.path.name, local_files_only=True)
        tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(hf_config(gguf, config), indent=2))
    # The pointer last: it is what _is_complete looks for.
    (out / GGUF_POINTER).write_text(json.dumps({"path": str(gguf.path)}, indent=2))
    logger.info("prepared %s for serving from its GGUF file in %.1f s", gguf.path.name, time.perf_counter() - start_s)


def hf_config(gguf: GGUFFile, config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json for `config` (read back by the loader's read_model_config)."""
    raw: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "gguf_file": gguf.path.name,
    }
    if config.rope_type != "default":
        raw["rope_scaling"] = {"rope_type": config.rope_type, "factor": config.rope_factor}
    for key in ("bos_token_id", "eos_token_id"):
        value = gguf.metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int):
            raw[key] = value
    return raw
