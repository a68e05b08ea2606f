"""engine_fingerprint: stable for one setup, different when anything that changes outputs changes."""

from __future__ import annotations

import dataclasses
import pathlib

import torch

from engine.config import EngineConfig
from engine.fingerprint import engine_fingerprint

CPU = torch.device("cpu")


def _fingerprint(model_dir: pathlib.Path, config: EngineConfig, dtype: torch.dtype = torch.float32, max_len: int = 512) -> str:
    return engine_fingerprint(config, model_dir, dtype, CPU, max_len)


def test_fingerprint_changes_with_what_changes_outputs(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}')
    config = EngineConfig(model=str(tmp_path))
    base = _fingerprint(tmp_path, config)
    assert base == _fingerprint(tmp_path, EngineConfig(model=str(tmp_path))) and len(base) == 16
    # Speed-only knobs leave it alone.
    assert _fingerprint(tmp_path, dataclasses.replace(config, max_num_seqs=3, enforce_eager=True)) == base
    changed = {
        _fingerprint(tmp_path, config, dtype=torch.bfloat16),
        _fingerprint(tmp_path, config, max_len=256),
        _fingerprint(tmp_path, dataclasses.replace(config, seed=1)),
        _fingerprint(tmp_path, dataclasses.replace(config, revision="v2")),
        _fingerprint(tmp_path, dataclasses.replace(config, model="other")),
        _fingerprint(tmp_path, dataclasses.replace(config, quantization="int4")),
    }
    (tmp_path / "config.json").write_text('{"model_type": "mistral", "num_hidden_layers": 4}')
    changed.add(_fingerprint(tmp_path, config))
    assert len(changed) == 7 and base not in changed
