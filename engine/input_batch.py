"""InputBatch: one step's model inputs, built with array operations in persistent host buffers, one copy per buffer.

Buffers are sized once (tokens per step, sequences per step, blocks per sequence); each step fills the used prefix of
the host buffers with numpy and copies that prefix to the device buffers, whose views it returns. On CPU the host
buffers are the device buffers. Block tables are kept per running sequence in BlockTableRows, grown by the blocks each
step adds; changed rows are copied to a device copy, from which each step's tables are gathered on the device.
Unlike vLLM's InputBatch, no per-request sampling state lives here (the sampler owns it) and rows are not kept in
batch order (the scheduler's order is the batch's; a gather by row index costs less than moving rows).
With LoRA adapters each token row carries its sequence's adapter slot; a step with any adapter row gets a one-hot slot
mask in its metadata (engine/model/lora.py), a step without gets none and runs the base layers alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.model.attention import AttentionMetadata
from engine.model.cpu_attention import DecodeKernel
from engine.model.lora import LoraBatch
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class StepInputs:
    """What the forward pass and the logits need for one step. Tensors are views of InputBatch's device buffers,
    valid until the next prepare()."""

    input_ids: torch.Tensor  # [num_tokens] int64 (num_padded_seqs tokens on a padded decode step)
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    sample_idx: torch.Tensor  # [num_samples] int64, flat index of each sampling sequence's last token
    query_start_loc_cpu: list[int]  # [num_seqs + 1], host copy for prompt scoring


@dataclass(slots=True)
class _Filled:
    """How much of the host buffers one step filled, and the host-side values its metadata needs."""

    num_tokens: int
    num_samples: int
    num_dirty: int  # block-table rows changed
    max_num_blocks: int  # the widest block table of the step
    seq_lens_cpu: list[int]
    has_lora: bool = False  # some sequence of the step runs an adapter (its rows' slots are in "lora_slots")


class BlockTableRows:
    """A persistent [max_num_seqs, max_blocks_per_seq] host copy of the running sequences' block tables, one row each.

    A sequence keeps its row while it runs; each update appends only the block ids added since the last one. A table
    freed by the block manager (preemption, finish, abort) bumps the sequence's block_table_version, and the row is
    rebuilt from scratch on its next update. Rows of sequences no longer running are reclaimed when no row is free:
    at most max_num_seqs sequences run, so reclaiming always finds one. Rows changed since the last take_dirty() are
    listed there, for the device copy of the table.
    """

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)  # [max_num_seqs, max_blocks_per_seq]
        self.num_blocks = [0] * max_num_seqs  # block ids copied into each row
        self.versions = [0] * max_num_seqs  # the owner's block_table_version those ids belong to
        self.owners: list[Sequence | None] = [None] * max_num_seqs
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))  # popped from the end: row 0 first
        self.dirty: list[int] = []  # rows changed since the last take_dirty()

    def update(self, seq: Sequence) -> int:
        """Bring the sequence's row up to date with its block table -> the row."""
        row = self.row_of.get(seq.seq_id)
        is_changed = False
        if row is None:
            row, is_changed = self._assign(seq), True
        elif self.versions[row] != seq.block_table_version:  # freed and reallocated since: rebuild
            self._clear(row)
            self.versions[row] = seq.block_table_version
            is_changed = True
        copied, table = self.num_blocks[row], seq.block_table
        if len(table) > copied:
            if len(table) > self.table.shape[1]:
                raise ValueError(f"sequence {seq.seq_id} has {len(table)} blocks, more than max_blocks_per_seq")
            self.table[row, copied : len(table)] = table[copied:]
            self.num_blocks[row] = len(table)
            is_changed = True
        if is_changed:
            self.dirty.append(row)
        return row

    def take_dirty(self) -> list[int]:
        """The rows changed since the last call (each once), and forget them."""
        dirty, self.dirty = list(dict.fromkeys(self.dirty)), []
        return dirty

    def _assign(self, seq: Sequence) -> int:
        if not self.free_rows:
            self.reclaim()
        row = self.free_rows.pop()  # IndexError here: more running sequences than rows, a scheduler bug
        self.row_of[seq.seq_id] = row
        self.owners[row] = seq
        self._clear(row)
        self.versions[row] = seq.block_table_version
        return row

    def _clear(self, row: int) -> None:
        """Zero the row's ids: past a sequence's blocks a row always holds 0, as the padding of a step's tables."""
        self.table[row, : self.num_blocks[row]] = 0
        self.num_blocks[row] = 0

    def reclaim(self) -> None:
        """Free the rows of sequences that are no longer running (finished, aborted, or preempted and waiting)."""
        for row, owner in enumerate(self.owners):
            if owner is not None and owner.status is not SequenceStatus.RUNNING:
                del self.row_of[owner.seq_id]
                self.owners[row] = None
                self.free_rows.append(row)


class InputBatch:
    """Persistent input buffers for the model runner; prepare() fills them for one step.

    The block tables live twice: BlockTableRows' host array (the truth, which slot mapping reads) and a device copy of
    it that receives only the rows changed this step; a step's block_tables are then gathered on the device by row,
    so no host work or copy grows with the rows' width. On CPU the device copy is a second CPU tensor.
    """

    def __init__(
        self,
        device: torch.device,
        block_size: int,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        cpu_decode_kernel: DecodeKernel | None = None,
        num_lora_slots: int = 0,  # adapter slots of the model, slot 0 included; 0: no LoRA
        lora_dtype: torch.dtype = torch.float32,  # the model's dtype, for the slot mask
    ) -> None:
        assert max_num_tokens >= max_num_seqs >= 1 and max_blocks_per_seq >= 1
        self.num_lora_slots = num_lora_slots
        self.lora_dtype = lora_dtype
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.cpu_decode_kernel = cpu_decode_kernel
        self.rows = BlockTableRows(max_num_seqs, max_blocks_per_seq)
        self.is_cuda = device.type == "cuda"
        uploaded = {  # filled on the host, copied to the device
            "input_ids": ((max_num_tokens,), torch.long),
            "positions": ((max_num_tokens,), torch.long),
            "slot_mapping": ((max_num_tokens,), torch.long),
            "query_start_loc": ((max_num_seqs + 1,), torch.int32),
            "seq_lens": ((max_num_seqs,), torch.int32),
            "sample_idx": ((max_num_seqs,), torch.long),
            "row_idx": ((max_num_seqs,), torch.long),  # the block-table row of each sequence of the step
            "dirty_idx": ((max_num_seqs,), torch.long),  # rows changed this step ...
            "dirty_rows": ((max_num_seqs, max_blocks_per_seq), torch.int32),  # ... and their new contents
            "lora_slots": ((max_num_tokens if num_lora_slots else 0,), torch.long),  # each token row's adapter slot
        }
        # Initial values are those of padded decode rows (token 0, no slot, no keys), which CUDA-graph capture runs on.
        self.host: dict[str, torch.Tensor] = {}
        self.device_buffers: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in uploaded.items():
            self.host[name] = torch.zeros(shape, dtype=dtype, pin_memory=self.is_cuda)
            self.device_buffers[name] = torch.zeros(shape, dtype=dtype, device=device) if self.is_cuda else self.host[name]
        self.host["slot_mapping"].fill_(-1)
        self.host["query_start_loc"].copy_(torch.arange(max_num_seqs + 1, dtype=torch.int32))
        for name in ("slot_mapping", "query_start_loc"):
            self.device_buffers[name].copy_(self.host[name])
        self.np = {name: host.numpy() for name, host in self.host.items()}
        self.device_table = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        # A step's block tables, gathered from device_table: flat, so each step picks its row width.
        self.block_tables = torch.zeros(max_num_seqs * max_blocks_per_seq, dtype=torch.int32, device=device)
        # Pinned host buffers are read by non-blocking copies: the next fill waits for the last step's copies to finish
        # (an event, cheap: they were queued a whole step ago). Chosen over double buffering for one set of buffers.
        self.copied = torch.cuda.Event() if self.is_cuda else None
        self.has_pending_copies = False

    def prepare(self, batch: ScheduledBatch, num_padded_seqs: int | None = None) -> StepInputs:
        """Fill and upload one step's inputs. `num_padded_seqs` (pure-decode steps replayed by a CUDA graph): pad the
        batch to that many rows that write no slot and read no key, with block tables at the full row width."""
        if self.copied is not None and self.has_pending_copies:
            self.copied.synchronize()
        filled = self._fill(batch)
        num_seqs, num_tokens = len(batch), filled.num_tokens
        padded = num_padded_seqs if num_padded_seqs is not None else num_seqs
        assert num_padded_seqs is None or num_tokens == num_seqs <= num_padded_seqs, "only decode steps are padded"
        if padded > num_seqs:
            self._pad_decode(num_seqs, padded)
        num_padded_tokens = num_tokens + padded - num_seqs
        sizes = {
            "input_ids": num_padded_tokens,
            "positions": num_padded_tokens,
            "slot_mapping": num_padded_tokens,
            "query_start_loc": padded + 1,
            "seq_lens": padded,
            "sample_idx": filled.num_samples,
            "row_idx": num_seqs,
            "dirty_idx": filled.num_dirty,
            "dirty_rows": filled.num_dirty,
            "lora_slots": num_tokens if filled.has_lora else 0,
        }
        views = self._upload(sizes)
        # The device copy of the rows takes this step's changed rows, then the step's tables are gathered from it.
        self.device_table.index_copy_(0, views["dirty_idx"], views["dirty_rows"])
        width = self.max_blocks_per_seq if num_padded_seqs is not None else filled.max_num_blocks
        block_tables = self.block_tables[: padded * width].view(padded, width)  # [padded, width]
        torch.index_select(self.device_table[:, :width], 0, views["row_idx"], out=block_tables[:num_seqs])
        meta = AttentionMetadata(
            query_start_loc=views["query_start_loc"],
            seq_lens=views["seq_lens"],
            block_tables=block_tables,
            slot_mapping=views["slot_mapping"],
            query_lens_cpu=list(batch.num_new_tokens),
            seq_lens_cpu=filled.seq_lens_cpu,
            max_seq_len=max(filled.seq_lens_cpu),
            is_decode_only=num_tokens == num_seqs,
            cpu_decode_kernel=self.cpu_decode_kernel,
            lora=self._lora_batch(views["lora_slots"]) if filled.has_lora else None,
        )
        query_start_loc_cpu = self.np["query_start_loc"][: num_seqs + 1].tolist()
        return StepInputs(views["input_ids"], views["positions"], meta, views["sample_idx"], query_start_loc_cpu)

    def _fill(self, batch: ScheduledBatch) -> _Filled:
        """Write the step's values into the host buffers (unpadded), bringing its sequences' rows up to date."""
        input_ids: list[int] = []
        starts: list[int] = []
        rows: list[int] = []
        samples: list[bool] = []  # whether each sequence reaches its last token, so a token is sampled for it
        lora_slots: list[int] = []
        for i, (seq, num) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):  # the only Python per sequence
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + num]
            starts.append(start)
            rows.append(self.rows.update(seq))
            samples.append(batch.samples(i))
            lora_slots.append(seq.lora_slot)
        num_seqs, num_tokens = len(rows), len(input_ids)
        query_lens = np.array(batch.num_new_tokens, dtype=np.int64)  # [num_seqs]
        seq_lens = np.array(starts, dtype=np.int64) + query_lens  # [num_seqs]
        ends = np.cumsum(query_lens)  # [num_seqs]
        row_idx = np.array(rows, dtype=np.int64)  # [num_seqs]
        self.np["input_ids"][:num_tokens] = input_ids
        positions = np.arange(num_tokens) + np.repeat(seq_lens - ends, query_lens)  # [num_tokens]
        self.np["positions"][:num_tokens] = positions
        blocks = self.rows.table[np.repeat(row_idx, query_lens), positions // self.block_size]  # [num_tokens]
        self.np["slot_mapping"][:num_tokens] = blocks.astype(np.int64) * self.block_size + positions % self.block_size
        self.np["query_start_loc"][1 : num_seqs + 1] = ends
        self.np["seq_lens"][:num_seqs] = seq_lens
        self.np["row_idx"][:num_seqs] = row_idx
        sample_idx = ends[np.array(samples, dtype=bool)] - 1  # [num_samples]
        self.np["sample_idx"][: len(sample_idx)] = sample_idx
        dirty = self.rows.take_dirty()
        self.np["dirty_idx"][: len(dirty)] = dirty
        self.np["dirty_rows"][: len(dirty)] = self.rows.table[dirty]  # [num_dirty, max_blocks_per_seq]
        max_num_blocks = max(map(self.rows.num_blocks.__getitem__, rows))
        has_lora = self.num_lora_slots > 0 and any(lora_slots)
        if has_lora:
            self.np["lora_slots"][:num_tokens] = np.repeat(np.array(lora_slots, dtype=np.int64), query_lens)
        return _Filled(num_tokens, len(sample_idx), len(dirty), max_num_blocks, seq_lens.tolist(), has_lora)

    def _lora_batch(self, slots: torch.Tensor) -> LoraBatch:
        """slots [num_tokens] -> the step's one-hot mask of slots 1.. [num_tokens, num_lora_slots - 1], once for all layers."""
        return LoraBatch.of(slots, self.num_lora_slots, self.lora_dtype)

    def _pad_decode(self, num_seqs: int, padded: int) -> None:
        """Rows num_seqs..padded of a decode step: one token each that writes nowhere (slot -1) and sees no key."""
        self.np["input_ids"][num_seqs:padded] = 0
        self.np["positions"][num_seqs:padded] = 0
        self.np["slot_mapping"][num_seqs:padded] = -1
        self.np["seq_lens"][num_seqs:padded] = 0
        self.np["query_start_loc"][num_seqs + 1 : padded + 1] = np.arange(num_seqs + 1, padded + 1)

    def _upload(self, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        """One copy per buffer of its used prefix (on CUDA, non-blocking from pinned memory) -> the device views."""
        views = {}
        for name, size in sizes.items():
            device_view = self.device_buffers[name][:size]
            if self.is_cuda:
                device_view.copy_(self.host[name][:size], non_blocking=True)
            views[name] = device_view
        if self.copied is not None:
            self.copied.record()
            self.has_pending_copies = True
        return views

    def decode_graph_inputs(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The device views a CUDA graph of `batch_size` decode rows is captured on: the same addresses and row width
        as a padded prepare() of that many rows fills."""
        buffers, width = self.device_buffers, self.max_blocks_per_seq
        meta = AttentionMetadata(
            query_start_loc=buffers["query_start_loc"][: batch_size + 1],
            seq_lens=buffers["seq_lens"][:batch_size],
            block_tables=self.block_tables[: batch_size * width].view(batch_size, width),  # [batch_size, width]
            slot_mapping=buffers["slot_mapping"][:batch_size],
            # The host-side fields are for the reference path only, which never runs on CUDA; the kernels read tensors.
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=[0] * batch_size,
            max_seq_len=0,
            is_decode_only=True,
        )
        return buffers["input_ids"][:batch_size], buffers["positions"][:batch_size], meta
