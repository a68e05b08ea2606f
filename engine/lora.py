"""LoRA adapters: reading PEFT adapter folders, keeping them in host memory, and giving them device slots.

An adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`, or a Hub repo id holding them). It is
checked whole at load, against what the layers can apply: only LoRA on q/k/v/o and gate/up/down, no DoRA, no
`modules_to_save`, no bias, no per-module rank or alpha, rank at most max_lora_rank, and every tensor of the base
model's shape. Anything else raises LoraError naming it, never a silently different model. Scaling is PEFT's:
lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; it is folded into B at load.

LoraRegistry: served adapter names -> ids, and the weights of at most max_cpu_loras adapters in host memory (least
recently used dropped, re-read from their folder when next needed). LoraSlots: which adapters hold the max_loras device
slots (slot 0 is the base model, no adapter): a sequence holds its adapter's slot while it runs; an adapter nobody runs
gives its slot to the next one that needs it. Pure Python except for the tensors it hands to the model's `load`.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import EngineError
from engine.model.config import ModelConfig
from engine.sequence import Sequence

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_CONFIG_FILE, _WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class LoraError(EngineError, ValueError):
    """An adapter that cannot be served (its folder, its config or its tensors), or an adapter name not served."""


@dataclass(slots=True)
class LoraAdapter:
    """One adapter's weights in host memory: (layer, module) -> (A [r, in], B scaled [out, r])."""

    name: str
    lora_id: int  # unique for each load, so a reloaded adapter never shares cached K/V with its old weights
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) of the whole (unsharded) base layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_size, kv_size = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (hidden, q_size),
        "k_proj": (hidden, kv_size),
        "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def parse_lora_modules(value: str | None) -> dict[str, str]:
    """`name=path,name2=path2` (EngineConfig.lora_modules) -> {name: path}; raises LoraError on a malformed entry."""
    modules: dict[str, str] = {}
    for entry in (value or "").split(","):
        if not entry.strip():
            continue
        name, sep, path = entry.strip().partition("=")
        if not sep or not name.strip() or not path.strip():
            raise LoraError(f"lora_modules entry {entry.strip()!r} is not name=path")
        if name.strip() in modules:
            raise LoraError(f"lora_modules names adapter {name.strip()!r} twice")
        modules[name.strip()] = path.strip()
    return modules


def resolve_adapter_dir(path: str, download_dir: str | None = None, token: str | None = None) -> Path:
    """A local adapter folder, or a Hub repo id downloaded (config and safetensors only) like a model."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or path.startswith(".") or path.count("/") != 1:
        raise LoraError(f"LoRA adapter folder {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(path, allow_patterns=[_CONFIG_FILE, _WEIGHTS_FILE], cache_dir=download_dir, token=token)
    except Exception as exc:  # offline, unknown repo, gated: one clear line
        raise LoraError(f"LoRA adapter {path}: not a local folder and not downloadable ({exc})") from exc
    return Path(folder)


def read_adapter_config(adapter_dir: Path, max_rank: int) -> tuple[int, float]:
    """Check adapter_config.json -> (rank, scaling); raises LoraError naming what is not supported."""
    config_path = adapter_dir / _CONFIG_FILE
    if not config_path.is_file() or not (adapter_dir / _WEIGHTS_FILE).is_file():
        raise LoraError(f"LoRA adapter {adapter_dir} needs {_CONFIG_FILE} and {_WEIGHTS_FILE} (safetensors only)")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise LoraError(f"LoRA adapter {adapter_dir}: {_CONFIG_FILE} is not JSON ({exc})") from exc
    where = f"LoRA adapter {adapter_dir}"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{where}: peft_type {cfg.get('peft_type')} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise LoraError(f"{where}: DoRA (use_dora) is not supported")
    if cfg.get("modules_to_save"):
        raise LoraError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{where}: bias {cfg['bias']!r} is not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise LoraError(f"{where}: {key} (a rank or alpha per module) is not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise LoraError(f"{where}: target module(s) {', '.join(unknown)} not supported (only {', '.join(TARGETS)})")
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LoraError(f"{where}: r must be a positive integer (got {rank!r})")
    if rank > max_rank:
        raise LoraError(f"{where}: rank {rank} is above max_lora_rank {max_rank}")
    alpha = cfg.get("lora_alpha", 8)
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return rank, scaling


def load_adapter(name: str, adapter_dir: Path, config: ModelConfig, max_rank: int, lora_id: int) -> LoraAdapter:
    """Read and check one adapter folder into host memory (float32, B scaled)."""
    rank, scaling = read_adapter_config(adapter_dir, max_rank)
    shapes = module_shapes(config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(adapter_dir / _WEIGHTS_FILE, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            layer, module, half = _parse_key(key, adapter_dir, config.num_hidden_layers)
            tensor = f.get_tensor(key).float()
            in_features, out_features = shapes[module]
            expected = (rank, in_features) if half == "A" else (out_features, rank)
            if tuple(tensor.shape) != expected:
                raise LoraError(
                    f"LoRA adapter {adapter_dir}: {key} has shape {list(tensor.shape)}, the base model needs "
                    f"{list(expected)} (an adapter for a different base model?)"
                )
            halves.setdefault((layer, module), {})[half] = tensor
    weights = {}
    for (layer, module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(f"LoRA adapter {adapter_dir}: layer {layer} {module} has lora_{''.join(pair)} without its pair")
        weights[(layer, module)] = (pair["A"].contiguous(), (pair["B"] * scaling).contiguous())
    if not weights:
        raise LoraError(f"LoRA adapter {adapter_dir}: no LoRA tensors in {_WEIGHTS_FILE}")
    return LoraAdapter(name, lora_id, rank, weights)


def _parse_key(key: str, adapter_dir: Path, num_layers: int) -> tuple[int, str, str]:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> (3, "q_proj", "A")."""
    parts = key.split(".")
    if len(parts) < 4 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        raise LoraError(f"LoRA adapter {adapter_dir}: tensor {key} is not a LoRA A/B weight (not supported)")
    module = parts[-3]
    if module not in TARGETS:
        raise LoraError(f"LoRA adapter {adapter_dir}: target module {module} ({key}) is not supported")
    if "layers" not in parts or not parts[parts.index("layers") + 1].isdigit():
        raise LoraError(f"LoRA adapter {adapter_dir}: tensor {key} names no layer")
    layer = int(parts[parts.index("layers") + 1])
    if layer >= num_layers:
        raise LoraError(f"LoRA adapter {adapter_dir}: {key} is for layer {layer}; the base model has {num_layers} layers")
    return layer, module, parts[-2][-1]


class LoraRegistry:
    """Served adapter names and the weights of the most recently used max_cpu_loras of them, in host memory."""

    def __init__(self, config: ModelConfig, max_rank: int, max_cpu_loras: int) -> None:
        self.config = config
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.dirs: dict[str, Path] = {}  # name -> folder
        self.ids: dict[str, int] = {}  # name -> lora_id (ids start at 1; 0 is the base model)
        self.cached: OrderedDict[int, LoraAdapter] = OrderedDict()  # lora_id -> weights, least recently used first
        self._next_id = 1

    def add(self, name: str, adapter_dir: Path) -> LoraAdapter:
        """Read and check an adapter and serve it under `name`; raises LoraError (the name stays as it was)."""
        if name in self.ids:
            raise LoraError(f"LoRA adapter {name!r} is already loaded")
        adapter = load_adapter(name, adapter_dir, self.config, self.max_rank, self._next_id)
        self._next_id += 1
        self.dirs[name], self.ids[name] = adapter_dir, adapter.lora_id
        self._cache(adapter)
        return adapter

    def remove(self, name: str) -> int:
        """Stop serving `name` -> its lora_id; raises LoraError when it is not served."""
        if name not in self.ids:
            raise LoraError(f"LoRA adapter {name!r} is not loaded (loaded: {', '.join(self.ids) or 'none'})")
        lora_id = self.ids.pop(name)
        del self.dirs[name]  # its weights stay cached (LRU) for its requests still waiting, e.g. preempted
        return lora_id

    def lora_id(self, name: str) -> int:
        if name not in self.ids:
            raise LoraError(f"LoRA adapter {name!r} is not served (served: {', '.join(self.ids) or 'none'})")
        return self.ids[name]

    def get(self, lora_id: int) -> LoraAdapter:
        """The adapter's weights, from host memory or re-read from its folder."""
        adapter = self.cached.get(lora_id)
        if adapter is not None:
            self.cached.move_to_end(lora_id)
            return adapter
        name = next((name for name, id_ in self.ids.items() if id_ == lora_id), None)
        if name is None:
            raise LoraError(f"LoRA adapter {lora_id} was unloaded")
        adapter = load_adapter(name, self.dirs[name], self.config, self.max_rank, lora_id)
        self._cache(adapter)
        return adapter

    def _cache(self, adapter: LoraAdapter) -> None:
        self.cached[adapter.lora_id] = adapter
        while len(self.cached) > self.max_cpu_loras:
            self.cached.popitem(last=False)


class LoraSlots:
    """The model's max_loras adapter slots (1..max_loras; 0 is no adapter), held by the running sequences.

    `load(slot, adapter)` writes an adapter's weights into a slot of every LoRA layer (engine/model/lora.py).
    """

    def __init__(self, max_loras: int, registry: LoraRegistry, load: Callable[[int, LoraAdapter], None]) -> None:
        self.max_loras = max_loras
        self.registry = registry
        self.load = load
        self.slot_of: dict[int, int] = {}  # lora_id -> slot, for the resident adapters
        self.users: dict[int, int] = {}  # lora_id -> running sequences using it
        self.idle: OrderedDict[int, None] = OrderedDict()  # resident lora_ids nobody runs, least recently used first

    def acquire(self, seq: Sequence) -> bool:
        """Give the sequence its adapter's slot (loading it if needed) -> False when every slot is in use."""
        lora_id = seq.lora_id
        if lora_id == 0:
            return True
        if lora_id not in self.slot_of:
            free = set(range(1, self.max_loras + 1)) - set(self.slot_of.values())
            if free:
                slot = min(free)
            elif self.idle:
                evicted, _ = self.idle.popitem(last=False)
                slot = self.slot_of.pop(evicted)
            else:
                return False
            self.load(slot, self.registry.get(lora_id))
            self.slot_of[lora_id] = slot
        self.idle.pop(lora_id, None)
        self.users[lora_id] = self.users.get(lora_id, 0) + 1
        seq.lora_slot = self.slot_of[lora_id]
        return True

    def release(self, seq: Sequence) -> None:
        """The sequence stopped running (preempted, finished, aborted): drop its hold on the slot."""
        lora_id = seq.lora_id
        if lora_id == 0 or seq.lora_slot == 0:
            return
        seq.lora_slot = 0
        self.users[lora_id] -= 1
        if self.users[lora_id] == 0:
            del self.users[lora_id]
            if lora_id in self.slot_of:
                self.idle[lora_id] = None

    def forget(self, lora_id: int) -> None:
        """An unloaded adapter: its slot is free once nobody runs it (its sequences finish with the weights they had)."""
        if lora_id not in self.users and lora_id in self.slot_of:
            del self.slot_of[lora_id]
            self.idle.pop(lora_id, None)

    @property
    def running_ids(self) -> list[int]:
        return list(self.users)
