"""A small, strict GGUF container reader.

Why not `gguf.GGUFReader`: it turns every metadata item — 49k vocabulary strings and 49k merges for
the bundled model — into numpy objects up front, which costs ~2 s and ~150 MB before a single
weight is read. This reader walks the header once with `struct`, keeps large arrays as byte
offsets until someone asks for them, and hands out tensor bytes as zero-copy views of one
read-only memory map. Every length and offset is checked against the file size, so a damaged
file fails with a message, not a crash or a huge allocation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_EAGER_ARRAY_LIMIT = 1024  # arrays longer than this are parsed on demand


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (GGUF stores innermost first)
    ggml_type: int
    offset: int  # absolute offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class _LazyArray:
    item_type: int
    count: int
    offset: int  # first item


class GGUFFile:
    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._mm)
        self._pos = 0
        if self._read(4) != MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic)")
        self.version = self._u32()
        if self.version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = self._u64(), self._u64()
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise GGUFFormatError(f"implausible header ({n_tensors} tensors, {n_kv} metadata items)")
        self._fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self._fields[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._u32()
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name}: {n_dims} dimensions")
            dims = [self._u64() for _ in range(n_dims)]
            ggml_type, offset = self._u32(), self._u64()
            infos.append((name, dims, ggml_type, offset))
        alignment = int(self._fields.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (KeyError, ValueError):
                raise GGUFFormatError(f"tensor {name}: unknown ggml type {ggml_type}") from None
            n = int(np.prod(dims, dtype=np.uint64)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFFormatError(f"tensor {name}: row of {dims[0]} is not a whole number of {block}-blocks")
            nbytes = n // block * type_size
            start = data_start + offset
            if start + nbytes > self.size:
                raise GGUFFormatError(f"truncated: tensor {name} ends at byte {start + nbytes}, the file has {self.size}")
            self.tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), ggml_type, start, nbytes)

    # -- public

    def field(self, key: str, default: Any = None) -> Any:
        v = self._fields.get(key, default)
        if isinstance(v, _LazyArray):
            v = self._fields[key] = self._parse_array(v)
        return v

    def keys(self) -> list[str]:
        return list(self._fields)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only view of the memory map (no copy)."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    # -- parsing

    def _read(self, n: int) -> bytes:
        if n < 0 or self._pos + n > self.size:
            raise GGUFFormatError(f"truncated: header runs past the end of the file (at byte {self._pos})")
        b = self._mm[self._pos : self._pos + n]
        self._pos += n
        return b

    def _u32(self) -> int:
        return struct.unpack("<I", self._read(4))[0]

    def _u64(self) -> int:
        return struct.unpack("<Q", self._read(8))[0]

    def _string(self) -> str:
        n = self._u64()
        if n > self.size:
            raise GGUFFormatError(f"corrupt string length {n} at byte {self._pos}")
        try:
            return self._read(n).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"invalid UTF-8 in a string at byte {self._pos}") from None

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._u32(), self._u64()
            lazy = _LazyArray(item_type, count, self._pos)
            if count <= _EAGER_ARRAY_LIMIT:
                return self._parse_array(lazy, advance=True)
            self._skip_array(lazy)
            return lazy
        raise GGUFFormatError(f"unknown metadata type {vtype} at byte {self._pos}")

    def _skip_array(self, a: _LazyArray) -> None:
        if a.item_type in _NUMPY:
            self._read(a.count * np.dtype(_NUMPY[a.item_type]).itemsize)
        elif a.item_type == _STRING:
            mm, pos, size = self._mm, self._pos, self.size
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(a.count):
                if pos + 8 > size:
                    raise GGUFFormatError("truncated: string array runs past the end of the file")
                pos += 8 + unpack(mm, pos)[0]
            if pos > size:
                raise GGUFFormatError("truncated: string array runs past the end of the file")
            self._pos = pos
        else:
            raise GGUFFormatError(f"unsupported array item type {a.item_type}")

    def _parse_array(self, a: _LazyArray, advance: bool = False) -> list:
        saved = self._pos
        self._pos = a.offset
        if a.item_type in _NUMPY:
            dt = np.dtype(_NUMPY[a.item_type]).newbyteorder("<")
            out = np.frombuffer(self._read(a.count * dt.itemsize), dtype=dt).tolist()
        elif a.item_type == _STRING:
            out = [self._string() for _ in range(a.count)]
        elif a.item_type == _ARRAY:
            raise GGUFFormatError("nested metadata arrays are not supported")
        else:
            raise GGUFFormatError(f"unsupported array item type {a.item_type}")
        if not advance:
            self._pos = saved
        return out

