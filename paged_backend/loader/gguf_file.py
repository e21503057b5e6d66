"""A fast reader of the GGUF container: metadata, tensor table, raw tensor bytes.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array; for the
tokenizer arrays of a 262k-token vocabulary that takes 5-25 s. Here the header is parsed with
``struct`` over a memory map, and string arrays (token lists, merges) are only walked past; they are
decoded on demand. Tensor bytes stay memory-mapped and are handed to ``gguf.quants.dequantize``.
Type codes and block sizes come from the ``gguf`` package so they stay in step with llama.cpp.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

from .errors import CorruptWeightsError

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
# Real files nest arrays at most once or twice; a corrupt count could recurse until the stack breaks.
_MAX_ARRAY_NESTING = 8
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}


@dataclass(frozen=True)
class _LazyStrings:
    """A string array left undecoded: its element count and where its first element starts."""

    count: int
    offset: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. GGUF's dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute offset of the first byte in the file
    nbytes: int


@dataclass
class GGUFFile:
    """Header of one GGUF file. ``metadata`` holds plain Python values (numeric arrays as numpy)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    _map: mmap.mmap = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; string arrays are decoded here, on first use."""
        value = self.metadata.get(key, default)
        if isinstance(value, _LazyStrings):
            value = _read_string_array(self._map, value)
            self.metadata[key] = value
        return value

    def find_string(self, key: str, text: str, limit: int = 1024) -> int | None:
        """Index of ``text`` among the first ``limit`` entries of a string array, decoding only those."""
        value = self.metadata.get(key)
        if isinstance(value, list):
            return value.index(text) if text in value[:limit] else None
        if not isinstance(value, _LazyStrings):
            return None
        pos = value.offset
        for i in range(min(limit, value.count)):
            s, pos = _read_str(self._map, pos)
            if s == text:
                return i
        return None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (quantized types) or values (F32/F16/...), memory-mapped."""
        info = self.tensors[name]
        buf = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = info.shape[-1] // block_size * type_size
        return buf.reshape(*info.shape[:-1], row_bytes)


def read_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
        raise CorruptWeightsError(f"cannot read GGUF file {path}: {exc}") from exc
    try:
        return _parse(path, data)
    # Overflow/Key/Memory errors: corrupt sizes and type codes that the explicit checks below missed.
    except (struct.error, UnicodeDecodeError, ValueError, IndexError, KeyError, OverflowError, MemoryError) as exc:
        raise CorruptWeightsError(
            f"{path} is not a valid GGUF file ({exc}); re-download or re-assemble it"
        ) from exc


def _parse(path: Path, data: mmap.mmap) -> GGUFFile:
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic != GGUF_MAGIC:
        raise ValueError("bad magic number")
    (version,) = struct.unpack_from("<I", data, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (big-endian or GGUF v1 files are not supported)")
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = _read_str(data, pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        metadata[key], pos = _read_value(data, pos + 4, GGUFValueType(vtype))

    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
    for _ in range(n_tensors):
        name, pos = _read_str(data, pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        if n_dims > 4:  # GGML_MAX_DIMS
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        pos += 4 + 8 * n_dims
        qtype, rel_offset = struct.unpack_from("<IQ", data, pos)
        pos += 12
        infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), rel_offset))

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise ValueError(f"general.alignment={alignment!r} is not a positive multiple of 8")
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, qtype, rel_offset in infos:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(shape))
        nbytes = n_elements // block_size * type_size
        offset = data_start + rel_offset
        if offset + nbytes > len(data):
            raise ValueError(f"tensor {name} extends past the end of the file (truncated download?)")
        tensors[name] = GGUFTensorInfo(name, shape, qtype, offset, nbytes)
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, _map=data)


def _check_span(data: mmap.mmap, start: int, length: int, what: str) -> None:
    if length > len(data) - start:
        raise ValueError(f"{what} of {length} bytes at offset {start} runs past the end of the file")


def _read_str(data: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, pos)
    start = pos + 8
    _check_span(data, start, length, "a string")
    return data[start : start + length].decode("utf-8"), start + length


def _read_value(data: mmap.mmap, pos: int, vtype: GGUFValueType, depth: int = 0) -> tuple[Any, int]:
    if vtype == GGUFValueType.STRING:
        return _read_str(data, pos)
    if vtype == GGUFValueType.ARRAY:
        if depth >= _MAX_ARRAY_NESTING:
            raise ValueError(f"metadata arrays nested more than {_MAX_ARRAY_NESTING} deep")
        elem_type, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        elem_type = GGUFValueType(elem_type)
        # Every element takes at least one byte (a string at least its 8-byte length).
        _check_span(data, pos, count, f"an array of {count} elements")
        if elem_type == GGUFValueType.STRING:
            lazy = _LazyStrings(count, pos)
            return lazy, _skip_strings(data, pos, count)
        if elem_type == GGUFValueType.ARRAY:
            values = []
            for _ in range(count):
                value, pos = _read_value(data, pos, GGUFValueType.ARRAY, depth + 1)
                values.append(value)
            return values, pos
        dtype = np.dtype(_NUMPY_DTYPES[elem_type])
        _check_span(data, pos, count * dtype.itemsize, "an array")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos).copy()
        return arr, pos + count * dtype.itemsize
    fmt = _SCALAR_FORMATS[vtype]
    (value,) = struct.unpack_from(fmt, data, pos)
    return value, pos + struct.calcsize(fmt)


def _skip_strings(data: mmap.mmap, pos: int, count: int) -> int:
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):
        length = unpack(data, pos)[0]
        _check_span(data, pos + 8, length, "a string")
        pos += 8 + length
    return pos


def _read_string_array(data: mmap.mmap, lazy: _LazyStrings) -> list[str]:
    out, pos = [], lazy.offset
    for _ in range(lazy.count):
        s, pos = _read_str(data, pos)
        out.append(s)
    return out
