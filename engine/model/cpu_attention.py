"""Decode attention for fp32 CPU caches in C (csrc/decode_attention.c): build, load, call.

Why C: on CPU the reference path (attention.py) copies every decode's K/V blocks into a padded batch, then runs SDPA on
it; that copy triples the memory traffic of a memory-bound step, and decode attention was about a fifth of the offline
benchmark's time. The kernel reads each sequence's blocks where they lie, one OpenMP task per sequence, on the OpenMP
runtime torch has already loaded (no second thread pool). 30 layers x 32 sequences x 256 cached tokens from DRAM:
gather + SDPA 46-85 ms, this kernel 29 ms.

Built once per source, flags and compiler into <cache_dir>/kernels with gcc (an atomic rename makes concurrent builds
safe), loaded with ctypes. Without gcc, off Linux, without torch's libgomp, or when the build fails, load_decode_kernel
returns None and the engine keeps the reference path (and says so in the log). On CPU the engine thus runs compiled C
rather than the plain PyTorch reference, which stays as the fallback; tests/engine/test_cpu_attention.py checks one
against the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import time

import torch

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("csrc") / "decode_attention.c"
# Vectorised reductions need reassociation; no -ffast-math, which may also flip the process's denormal mode.
FLAGS = ("-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
FLAGS += ("-fopenmp", "-shared", "-fPIC")
_C_ARGS = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int64]


class DecodeKernel:
    """The loaded C function, called with tensors; see the C source for the layouts."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = c_function(library, "decode_attention", ctypes.c_int, _C_ARGS)

    def __call__(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim] fp32
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] fp32
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
        seq_lens: torch.Tensor,  # [num_seqs] int32
        q_rows: torch.Tensor,  # [num_seqs] int64: the row of q holding each sequence's query
        out: torch.Tensor,  # like q; only the q_rows rows are written
        scale: float,
        sliding_window: int | None,
    ) -> None:
        """Check every index against the tensors, then run (`check_indices`, then `run`)."""
        self.check_indices(block_tables, seq_lens, q_rows, k_cache.shape[0], k_cache.shape[1], q.shape[0])
        self.run(q, k_cache, v_cache, block_tables, seq_lens, q_rows, out, scale, sliding_window)

    @staticmethod
    def check_indices(
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        q_rows: torch.Tensor,
        num_cache_blocks: int,
        block_size: int,
        num_tokens: int,
    ) -> None:
        """C trusts every index it is given: refuse those that could reach outside the tensors. One step's indices are
        the same in every layer, so the model checks them once per step (attention.py) and then calls `run`."""
        if (block_tables.dtype, seq_lens.dtype, q_rows.dtype) != (torch.int32, torch.int32, torch.int64):
            raise ValueError("decode attention kernel: int32 block tables and lengths, int64 rows")
        num_seqs = seq_lens.shape[0]
        if block_tables.shape[0] != num_seqs or q_rows.shape[0] != num_seqs:
            raise ValueError("decode attention kernel: one block table and one query row per sequence")
        if num_seqs and (
            int(block_tables.min()) < 0
            or int(block_tables.max()) >= num_cache_blocks
            or int(seq_lens.min()) < 1
            or int(seq_lens.max()) > block_tables.shape[1] * block_size
            or int(q_rows.min()) < 0
            or int(q_rows.max()) >= num_tokens
        ):
            raise ValueError("decode attention kernel: a block id, length or query row out of range")

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        q_rows: torch.Tensor,
        out: torch.Tensor,
        scale: float,
        sliding_window: int | None,
    ) -> None:
        """The kernel on indices already checked by `check_indices` against tensors of these shapes."""
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        group = q.shape[1] // num_kv_heads
        tensors = (q, k_cache, v_cache, block_tables, seq_lens, q_rows, out)
        if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
            raise ValueError("decode attention kernel: CPU tensors, contiguous")
        if {q.dtype, k_cache.dtype, v_cache.dtype, out.dtype} != {torch.float32} or out.shape != q.shape:
            raise ValueError("decode attention kernel: fp32 q, caches and out of q's shape")
        if v_cache.shape != k_cache.shape or q.shape[2] != head_dim or group < 1 or q.shape[1] % num_kv_heads:
            raise ValueError("decode attention kernel: mismatched heads or head_dim")
        status = self._fn(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
            q_rows.data_ptr(), out.data_ptr(), seq_lens.shape[0], block_tables.shape[1], block_size, num_kv_heads, group,
            head_dim, scale, sliding_window or 0,
        )  # fmt: skip
        if status != 0:
            raise MemoryError("decode attention kernel: out of memory for its score buffers")


def load_decode_kernel(cache_dir: pathlib.Path) -> DecodeKernel | None:
    """The kernel, built into cache_dir/kernels on first use; None (reference path) where it cannot be had."""
    library = load_c_library(SOURCE, cache_dir, "CPU decode attention")
    return None if library is None else DecodeKernel(library)


def load_c_library(source: pathlib.Path, cache_dir: pathlib.Path, what: str) -> ctypes.CDLL | None:
    """A C source of csrc/ built with FLAGS into cache_dir/kernels on first use and loaded; None (the caller keeps its
    PyTorch path, and the log says why) off Linux, without torch's libgomp or gcc, or when the build fails."""
    if platform.system() != "Linux":
        return None
    if not _torch_uses_libgomp():
        logger.info("%s: torch's OpenMP is not libgomp; using the PyTorch path", what)
        return None
    compiler = shutil.which("gcc")
    if compiler is None:
        logger.warning("%s: no gcc on PATH; using the slower PyTorch path", what)
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, source, cache_dir, what)))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("%s: building the C kernel failed (%s); using the PyTorch path", what, exc)
        return None


def c_function(library: ctypes.CDLL, name: str, restype: type | None, argtypes: list[type]) -> ctypes._CFuncPtr:
    """A function of a library load_c_library loaded, with its C signature declared (ctypes assumes int otherwise)."""
    fn = getattr(library, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def _torch_uses_libgomp() -> bool:
    """Whether the libgomp that torch loaded is in this process: the kernel then shares its OpenMP threads."""
    torch.get_num_threads()  # torch's CPU library, and its OpenMP runtime, are loaded by now
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return any("libgomp" in line for line in maps)


def _build(compiler: str, source_path: pathlib.Path, cache_dir: pathlib.Path, what: str) -> pathlib.Path:
    source = source_path.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version, platform.machine().encode()])).hexdigest()
    target = cache_dir / "kernels" / f"{source_path.stem}-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start_s = time.monotonic()
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        command = [compiler, *FLAGS, "-o", tmp, str(source_path), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise subprocess.SubprocessError(f"{' '.join(command)}: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    logger.info("%s: built %s in %.1f s", what, target, time.monotonic() - start_s)
    return target
