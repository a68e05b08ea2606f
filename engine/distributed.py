"""Tensor parallelism across processes: rank 0 (the engine) starts ranks 1..N-1, broadcasts each step, watches them.

Rank 0 alone schedules, manages blocks and samples; every rank holds a slice of the weights and of the paged KV cache
(the same block ids everywhere) and runs the same forward, joining the all-reduces of model/parallel.py. With LoRA,
rank 0 also sends each adapter it writes into a slot (every rank writes its slice of it into the same slot) and each
step's adapter slot of every token row. gloo on CPU, NCCL on CUDA (rank r on cuda:r). A rank that fails to start,
dies, or leaves a collective unfinished for distributed_timeout_s becomes one RankFailedError naming it, and every
worker is stopped. A worker also exits by itself when its parent process is gone (its lifeline pipe reads EOF), so no
rank outlives the engine's process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing import connection, get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.errors import RankFailedError
from engine.lora import TARGETS, LoraAdapter, module_shapes
from engine.model.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.lora import AdapterWeights, LoraBatch
from engine.model.mistral import KVCache, MistralForCausalLM
from engine.processes import exit_reason
from engine.rank import Rank, RankSpec, build_rank

logger = logging.getLogger(__name__)

_STOP, _STEP, _LOAD_LORA = 0, 1, 2  # the first field of every header
_HEADER_LEN = 5  # [command, and four fields: see _broadcast_step and load_lora]
_START_TIMEOUT_S = 1800.0  # loading a large slice from a slow disk; a rank that exits fails the start at once
_STOP_TIMEOUT_S = 10.0  # after STOP, how long workers get to exit before they are killed
_WORKER_TIMEOUT = timedelta(days=365)  # workers wait for the next step as long as rank 0 lives, however long it idles


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What rank r needs to build its slice and join the group; pickled into the spawned process."""

    rank: RankSpec
    num_blocks: int  # as many as rank 0 has: the same block ids everywhere
    backend: str
    store_port: int
    num_threads: int


@dataclass(slots=True)
class _Worker:
    rank: int
    process: BaseProcess
    control: Connection  # from the worker: ("ready", "") once loaded, or ("error", why)
    lifeline: Connection  # never written: the worker reads EOF when this process is gone


class TensorParallelGroup:
    """Rank 0's side of the group: starts the workers and forms the process group, then one broadcast per step."""

    def __init__(self, config: EngineConfig, spec: RankSpec, rank: Rank) -> None:
        """`spec` and `rank`: rank 0's, built; each worker builds its own from the same spec (build_rank)."""
        device = torch.device(spec.device)
        self.world_size = config.tensor_parallel_size
        self.timeout_s = config.distributed_timeout_s
        self.device = device
        self.model_config = spec.model_config
        if dist.is_initialized():
            raise ValueError("this process already has a torch.distributed group: one tensor-parallel engine per process")
        if device.type == "cuda" and device.index not in (None, 0):
            raise ValueError("with tensor parallelism rank r runs on cuda:r: set device to cuda, not a numbered GPU")
        if device.type == "cuda" and torch.cuda.device_count() < self.world_size:
            raise ValueError(f"tensor_parallel_size {self.world_size} needs as many GPUs; {torch.cuda.device_count()} visible")
        self._saved_num_threads = torch.get_num_threads()
        # On CPU the ranks share the cores: each gets its part, so N processes do not oversubscribe them.
        num_threads = max(1, self._saved_num_threads // self.world_size) if device.type == "cpu" else self._saved_num_threads
        self._store = dist.TCPStore(
            "127.0.0.1", 0, self.world_size, is_master=True, timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False
        )  # port 0: the system picks a free port, sent to the workers
        self._workers: list[_Worker] = []
        self._is_open = True
        self._is_healthy = False  # True once the process group is formed; False again after a failure
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            kernel_dir = spec.kernel_dir if rank.kernel is not None else None  # rank 0 could not build it: nobody uses it
            for r in range(1, self.world_size):
                worker_device = f"cuda:{r}" if device.type == "cuda" else "cpu"
                worker_rank = replace(spec, rank=r, device=worker_device, kernel_dir=kernel_dir)
                self._workers.append(_spawn(WorkerSpec(worker_rank, rank.num_blocks, backend, self._store.port, num_threads)))
            deadline = time.monotonic() + _START_TIMEOUT_S
            for worker in self._workers:
                self._wait_ready(worker, deadline)
            dist.init_process_group(
                backend, store=self._store, rank=0, world_size=self.world_size, timeout=timedelta(seconds=self.timeout_s)
            )
        except BaseException:
            self.close()
            raise
        self._is_healthy = True
        if device.type == "cpu":
            torch.set_num_threads(num_threads)
        logger.info("tensor parallel: %d ranks over %s (%s), worker pids %s", self.world_size, backend, device, self.pids)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def _wait_ready(self, worker: _Worker, deadline: float) -> None:
        ready = connection.wait([worker.control, worker.process.sentinel], timeout=max(0.0, deadline - time.monotonic()))
        if worker.control in ready:
            with contextlib.suppress(EOFError, OSError):
                kind, detail = worker.control.recv()
                if kind == "ready":
                    return
                raise RankFailedError(f"tensor parallel: rank {worker.rank} failed to start: {detail}")
        why = self._why(worker) or f"did not load within {_START_TIMEOUT_S:.0f} s"
        raise RankFailedError(f"tensor parallel: rank {worker.rank} failed to start: {why}")

    # --- steps ---------------------------------------------------------------------------------------------

    def run_step(
        self,
        model: MistralForCausalLM,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Send the step to ranks 1..N-1 and run rank 0's slice of it -> hidden [num_tokens, hidden]; RankFailedError."""
        try:
            self._broadcast_step(input_ids, positions, meta)
            return model(input_ids, positions, kv_cache, meta)
        except Exception as exc:  # the ranks are now out of step, whichever failed
            raise self._fail(exc) from exc

    def _broadcast_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        num_seqs, max_blocks = meta.block_tables.shape
        header = [_STEP, input_ids.shape[0], num_seqs, max_blocks, int(meta.lora is not None)]
        parts = [
            input_ids,
            positions,
            meta.slot_mapping,
            meta.query_start_loc.long(),
            meta.seq_lens.long(),
            meta.block_tables.long().flatten(),
        ]
        if meta.lora is not None:
            parts.append(meta.lora.slots)  # each token row's adapter slot; the ranks rebuild the mask from it
        payload = torch.cat(parts)  # [3 * num_tokens + 2 * num_seqs + 1 + num_seqs * max_blocks (+ num_tokens)]
        dist.broadcast(torch.tensor(header, dtype=torch.long, device=self.device), src=0)
        dist.broadcast(payload, src=0)

    def load_lora(self, slot: int, adapter: LoraAdapter) -> None:
        """Send a whole adapter to ranks 1..N-1, each writing its slice of it into `slot`; RankFailedError.

        Called when rank 0 gives the adapter a slot (at a step's scheduling), so the ranks have it before that step."""
        try:
            present, flat = _pack_adapter(adapter.weights, self.model_config)
            header = torch.tensor([_LOAD_LORA, slot, adapter.rank, flat.numel(), 0], dtype=torch.long, device=self.device)
            dist.broadcast(header, src=0)
            dist.broadcast(present.to(self.device), src=0)
            dist.broadcast(flat.to(self.device), src=0)
        except Exception as exc:  # the ranks are now out of step
            raise self._fail(exc) from exc

    def _fail(self, exc: BaseException) -> RankFailedError:
        """After a failed step: find which rank failed and why, log it, stop every worker. Returns the error to raise."""
        self._is_healthy = False
        # A rank that just died: its sentinel is ready at once, its exit status a moment later.
        ended = connection.wait([w.process.sentinel for w in self._workers], timeout=1.0)
        for worker in self._workers:
            if worker.process.sentinel in ended:
                worker.process.join(timeout=5.0)
        reasons = [f"rank {w.rank} {why}" for w in self._workers if (why := self._why(w))]
        if not reasons and "timed out" in str(exc).lower():
            ranks = ", ".join(str(w.rank) for w in self._workers)
            reasons = [f"rank(s) {ranks} alive but a step collective did not complete within {self.timeout_s:g} s"]
        elif not reasons:
            reasons = [f"the step failed: {exc!r}"]
        message = "tensor parallel: " + "; ".join(reasons)
        logger.error("%s", message)
        self.close()
        return RankFailedError(message)

    def _why(self, worker: _Worker) -> str | None:
        """What is wrong with one worker (its last error message, how it ended), or None when it looks healthy."""
        message = None
        with contextlib.suppress(EOFError, OSError):
            while worker.control.poll():
                kind, detail = worker.control.recv()
                message = detail if kind == "error" else message
        if worker.process.exitcode is None:
            return f"failed: {message}" if message else None
        ended = f"died ({exit_reason(worker.process, wait_s=0.0)})"
        return f"{ended}: {message}" if message else ended

    # --- shutdown ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (STOP while the group works, else kill), reap them and leave the process group. Idempotent."""
        if not self._is_open:
            return
        self._is_open = False
        is_stopping = False
        if self._is_healthy:
            with contextlib.suppress(Exception):
                dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0], dtype=torch.long, device=self.device), src=0)
                is_stopping = True
        deadline = time.monotonic() + (_STOP_TIMEOUT_S if is_stopping else 0.0)
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
            worker.control.close()
            worker.lifeline.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._saved_num_threads)


# --- ranks 1..N-1 ------------------------------------------------------------------------------------------


def _spawn(spec: WorkerSpec) -> _Worker:
    context = get_context("spawn")  # never fork a process that holds torch threads (and maybe CUDA)
    control, child_control = context.Pipe()
    lifeline, child_lifeline = context.Pipe()
    process = context.Process(
        target=_worker_main, args=(spec, child_control, child_lifeline), name=f"sirocco-rank-{spec.rank.rank}", daemon=True
    )
    process.start()
    child_control.close()  # the child holds its own copies: its ends now close when it exits
    child_lifeline.close()
    return _Worker(spec.rank.rank, process, control, lifeline)


def _worker_main(spec: WorkerSpec, control: Connection, lifeline: Connection) -> None:
    """Entry point of rank r >= 1: load the slice, join the group, run steps until STOP. Reports failures on `control`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides, then stops us
    threading.Thread(target=_exit_with_parent, args=(lifeline,), name="sirocco-lifeline", daemon=True).start()
    try:
        device = torch.device(spec.rank.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(spec.num_threads)
        rank = build_rank(spec.rank, spec.num_blocks)
        control.send(("ready", ""))
        r, world_size = spec.rank.rank, spec.rank.world_size
        store = dist.TCPStore("127.0.0.1", spec.store_port, world_size, is_master=False, timeout=_WORKER_TIMEOUT)
        dist.init_process_group(spec.backend, store=store, rank=r, world_size=world_size, timeout=_WORKER_TIMEOUT)
        _run_steps(rank, spec.rank, device)
        dist.destroy_process_group()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            control.send(("error", f"{type(exc).__name__}: {exc}"))
        os._exit(1)  # not sys.exit: nothing (atexit hooks, a stuck collective) may keep a failed rank alive


def _exit_with_parent(lifeline: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv()  # rank 0 never writes: this returns only once the pipe closes, i.e. rank 0 closed or died
    os._exit(1)


def _adapter_keys(config: ModelConfig) -> list[tuple[int, str]]:
    """Every (layer, module) an adapter may have, in the order _pack_adapter sends them."""
    return [(layer, module) for layer in range(config.num_hidden_layers) for module in TARGETS]


def _pack_adapter(weights: AdapterWeights, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter -> (which (layer, module) pairs it has [num_layers * len(TARGETS)] int64, their A and B flattened
    one after the other in that order, float32). _unpack_adapter reverses it from the config and the adapter's rank."""
    keys = _adapter_keys(config)
    present = torch.tensor([key in weights for key in keys], dtype=torch.long)
    flat = torch.cat([t.flatten() for key in keys if key in weights for t in weights[key]]).float()
    return present, flat


def _unpack_adapter(present: torch.Tensor, flat: torch.Tensor, lora_rank: int, config: ModelConfig) -> AdapterWeights:
    """_pack_adapter's two tensors -> the adapter's weights again: (layer, module) -> (A [r, in], B [out, r])."""
    keys = _adapter_keys(config)
    shapes = module_shapes(config)  # module -> (in_features, out_features)
    weights, offset = {}, 0
    for key, is_present in zip(keys, present.tolist(), strict=True):
        if not is_present:
            continue
        in_features, out_features = shapes[key[1]]
        a = flat[offset : offset + lora_rank * in_features].view(lora_rank, in_features)
        offset += a.numel()
        b = flat[offset : offset + out_features * lora_rank].view(out_features, lora_rank)
        offset += b.numel()
        weights[key] = (a, b)
    return weights


@torch.inference_mode()
def _run_steps(rank: Rank, spec: RankSpec, device: torch.device) -> None:
    """Receive each step (or adapter) from rank 0 and run this rank's forward (its output is only ever used through
    the all-reduces) or write this rank's slice of the adapter into its slot."""
    header = torch.empty(_HEADER_LEN, dtype=torch.long, device=device)
    while True:
        dist.broadcast(header, src=0)
        command, *fields = header.tolist()
        if command == _STOP:
            return
        if command == _LOAD_LORA:
            slot, lora_rank, num_floats, _ = fields
            present = torch.empty(spec.model_config.num_hidden_layers * len(TARGETS), dtype=torch.long, device=device)
            flat = torch.empty(num_floats, dtype=torch.float32, device=device)
            dist.broadcast(present, src=0)
            dist.broadcast(flat, src=0)
            rank.load_lora(slot, _unpack_adapter(present, flat, lora_rank, spec.model_config))
            continue
        num_tokens, num_seqs, max_blocks, has_lora = fields
        _run_step(rank, spec, device, num_tokens, num_seqs, max_blocks, bool(has_lora))


def _run_step(
    rank: Rank, spec: RankSpec, device: torch.device, num_tokens: int, num_seqs: int, max_blocks: int, has_lora: bool
) -> None:
    """Receive one step's inputs (the payload _broadcast_step sends) and run this rank's forward of it."""
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * max_blocks, num_tokens if has_lora else 0]
    payload = torch.empty(sum(sizes), dtype=torch.long, device=device)
    dist.broadcast(payload, src=0)
    input_ids, positions, slots, starts, seq_lens, tables, lora_slots = payload.split(sizes)
    seq_lens_cpu = seq_lens.tolist()
    meta = AttentionMetadata(
        query_start_loc=starts.int(),
        seq_lens=seq_lens.int(),
        block_tables=tables.view(num_seqs, max_blocks).int(),  # [num_seqs, max_blocks]
        slot_mapping=slots,
        query_lens_cpu=starts.diff().tolist(),
        seq_lens_cpu=seq_lens_cpu,
        max_seq_len=max(seq_lens_cpu),
        is_decode_only=num_tokens == num_seqs,
        cpu_decode_kernel=rank.kernel,
        lora=LoraBatch.of(lora_slots, spec.max_loras + 1, spec.dtype) if has_lora else None,
    )
    rank.model(input_ids, positions, rank.kv_cache, meta)
