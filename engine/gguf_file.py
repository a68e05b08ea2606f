"""Read a GGUF file: its header (metadata and tensor table), checked whole before any tensor is decoded.

Our own parser of the header, with the `gguf` package's type constants: `gguf.GGUFReader` builds a numpy view per
array element, which takes 10+ s for a 49k-token vocabulary on a busy 2-CPU machine, at every start. Every size,
offset and type is checked against the file first, so a truncated or damaged file is a GGUFError naming the field
or tensor, never a numpy error from inside a memory map.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# Scalar value types -> struct format (little endian).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """A GGUF file we cannot read, with the field or tensor at fault in the message."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One entry of the tensor table. dims are GGUF's order (fastest first): a [N, K] matrix is dims (K, N)."""

    name: str
    dims: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    offset: int  # from the start of the file (the table's offset plus the data section's start)
    num_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch's order: [N, K] for a matrix."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True, slots=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]  # key -> int, float, bool, str or list (numeric arrays as numpy arrays)
    tensors: dict[str, TensorInfo]
    header_sha256: str  # of every byte before the tensor data: names the file's metadata and layout


def tensor_bytes(data: mmap.mmap, info: TensorInfo) -> np.ndarray:
    """The tensor's raw bytes, uint8 [num_rows, row_bytes], copied out of the mapped file (offsets were checked at open)."""
    if info.offset + info.num_bytes > len(data):  # the file shrank since read_gguf checked it
        raise GGUFError(f"tensor {info.name}: the file ends before its data ({len(data)} bytes); it was truncated")
    raw = np.frombuffer(data, dtype=np.uint8, count=info.num_bytes, offset=info.offset).copy()
    num_rows = math.prod(info.dims[1:])
    return raw.reshape(num_rows, info.num_bytes // num_rows)  # [num_rows, row_bytes]


class _Cursor:
    """Reads little-endian values from the header, raising GGUFError naming the field on a short file."""

    def __init__(self, data: mmap.mmap, file_size: int) -> None:
        self.data = data
        self.pos = 0
        self.file_size = file_size

    def take(self, num_bytes: int, field: str) -> bytes:
        if num_bytes < 0 or self.pos + num_bytes > self.file_size:
            raise GGUFError(
                f"truncated GGUF header: {field} needs {num_bytes} bytes at offset {self.pos}, the file has {self.file_size}"
            )
        out = self.data[self.pos : self.pos + num_bytes]
        self.pos += num_bytes
        return out

    def scalar(self, value_type: GGUFValueType, field: str) -> Any:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), field))[0]

    def string(self, field: str) -> str:
        length = self.scalar(GGUFValueType.UINT64, field)
        try:
            return self.take(length, field).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"GGUF header field {field} is not UTF-8") from exc

    def value(self, value_type: int, field: str) -> Any:
        kind = _value_type(value_type, field)
        if kind == GGUFValueType.STRING:
            return self.string(field)
        if kind != GGUFValueType.ARRAY:
            return self.scalar(kind, field)
        item_type = _value_type(self.scalar(GGUFValueType.UINT32, field), field)
        count = self.scalar(GGUFValueType.UINT64, field)
        if item_type in _SCALAR_FORMATS:  # one numpy read for numeric arrays (token types, scores)
            dtype = np.dtype(_SCALAR_FORMATS[item_type])
            return np.frombuffer(self.take(count * dtype.itemsize, field), dtype=dtype)
        if item_type == GGUFValueType.STRING:
            return self.strings(count, field)
        return [self.value(item_type, field) for _ in range(count)]

    def strings(self, count: int, field: str) -> list[str]:
        """An array of strings (a vocabulary, merges: 100k entries), in one tight loop."""
        out = []
        pos, data, size, length_at = self.pos, self.data, self.file_size, _U64.unpack_from
        try:
            for _ in range(count):
                if pos + 8 > size:
                    raise GGUFError(f"truncated GGUF header: string {len(out)} of {field} at offset {pos}")
                end = pos + 8 + length_at(data, pos)[0]
                if end > size:
                    raise GGUFError(f"truncated GGUF header: string {len(out)} of {field} at offset {pos}")
                out.append(data[pos + 8 : end].decode("utf-8"))
                pos = end
        except UnicodeDecodeError as exc:
            raise GGUFError(f"GGUF header field {field}: string {len(out)} is not UTF-8") from exc
        self.pos = pos
        return out


def _value_type(raw: int, field: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise GGUFError(f"GGUF header field {field} has unknown value type {raw}") from None


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and check the header of a GGUF file (no tensor data is read)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            file_size = path.stat().st_size
            if file_size < 24:
                raise GGUFError(f"{path} is not a GGUF file: only {file_size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, data, file_size)
    except OSError as exc:
        raise GGUFError(f"cannot read GGUF file {path}: {exc}") from exc


def _parse(path: Path, data: mmap.mmap, file_size: int) -> GGUFFile:
    cursor = _Cursor(data, file_size)
    if cursor.take(4, "magic") != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
    version = cursor.scalar(GGUFValueType.UINT32, "version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (supported: 2, 3, little-endian)")
    num_tensors = cursor.scalar(GGUFValueType.UINT64, "tensor_count")
    num_fields = cursor.scalar(GGUFValueType.UINT64, "kv_count")
    metadata: dict[str, Any] = {}
    for i in range(num_fields):
        key = cursor.string(f"key #{i}")
        metadata[key] = cursor.value(cursor.scalar(GGUFValueType.UINT32, key), key)
    table = [_tensor_entry(cursor, i) for i in range(num_tensors)]
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment {alignment} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, raw_type, offset in table:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name} appears twice")
        tensors[name] = _check_tensor(name, dims, raw_type, offset, alignment, data_start, file_size)
    header_sha256 = hashlib.sha256(data[:data_start]).hexdigest()
    return GGUFFile(path, metadata, tensors, header_sha256)


def _tensor_entry(cursor: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string(f"tensor #{index} name")
    num_dims = cursor.scalar(GGUFValueType.UINT32, f"tensor {name} n_dims")
    if not 1 <= num_dims <= MAX_DIMS:
        raise GGUFError(f"tensor {name}: {num_dims} dimensions (1 to {MAX_DIMS} expected)")
    dims = tuple(cursor.scalar(GGUFValueType.UINT64, f"tensor {name} dims") for _ in range(num_dims))
    raw_type = cursor.scalar(GGUFValueType.UINT32, f"tensor {name} type")
    offset = cursor.scalar(GGUFValueType.UINT64, f"tensor {name} offset")
    return name, dims, raw_type, offset


def _check_tensor(
    name: str, dims: tuple[int, ...], raw_type: int, offset: int, alignment: int, data_start: int, file_size: int
) -> TensorInfo:
    try:
        tensor_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFError(f"tensor {name} has unknown GGML type {raw_type}") from None
    if tensor_type not in GGML_QUANT_SIZES:
        raise GGUFError(f"tensor {name} has GGML type {tensor_type.name}, which has no known block size")
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    if any(d <= 0 for d in dims) or dims[0] % block_size:
        raise GGUFError(f"tensor {name}: shape {dims} does not fit {tensor_type.name} blocks of {block_size} values")
    if offset % alignment:
        raise GGUFError(f"tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}")
    num_bytes = math.prod(dims) // block_size * type_size
    begin = data_start + offset
    if begin + num_bytes > file_size:
        raise GGUFError(
            f"tensor {name}: its {num_bytes} bytes at offset {begin} run past the end of the file ({file_size} bytes); "
            "the file is truncated or its tensor table is damaged"
        )
    return TensorInfo(name, dims, tensor_type, begin, num_bytes)
