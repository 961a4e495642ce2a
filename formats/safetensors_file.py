"""A validating, lazy safetensors reader.

The `safetensors` package reads files fine, but k2quant needs two things it does not
give: an error that names the file and tensor when a shard is truncated or its header
lies (a 1 TB download often arrives broken), and per-tensor memory maps, so that a
tensor's pages leave the process's resident set as soon as the tensor is dropped.
Each `load` maps only that tensor's byte range; nothing is read until it is used.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from k2quant.errors import CheckpointError, DiskFullError
from k2quant.formats.hashed import HashingFile

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """One .safetensors file: header parsed and checked at open, tensors mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"file is {size} bytes, too short for a safetensors header", str(self.path))
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise CheckpointError(
                        f"header length {n} runs beyond the end of the file ({size} bytes): "
                        "truncated or not safetensors",
                        str(self.path),
                    )
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"header length {n} exceeds {MAX_HEADER_BYTES} bytes", str(self.path))
                raw = f.read(n)
        except FileNotFoundError:
            raise CheckpointError("file not found", str(self.path)) from None
        except IsADirectoryError:
            raise CheckpointError("is a directory, not a safetensors file", str(self.path)) from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an int of 5000 digits
            raise CheckpointError(f"header is not valid JSON ({e})", str(self.path)) from None
        if not isinstance(header, dict):
            raise CheckpointError("header is not a JSON object", str(self.path))
        self.file_size = size
        self.data_start = 8 + n
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not (isinstance(self.metadata, dict) and all(isinstance(v, str) for v in self.metadata.values())):
            raise CheckpointError("__metadata__ is not an object of strings", str(self.path))
        self.tensors: dict[str, TensorInfo] = {}
        data_len = size - self.data_start
        for name, entry in header.items():
            self.tensors[name] = self._check_entry(name, entry, data_len)

    def _check_entry(self, name: str, entry: object, data_len: int) -> TensorInfo:
        def bad(msg: str) -> CheckpointError:
            return CheckpointError(msg, str(self.path), name)

        if not isinstance(entry, dict):
            raise bad("header entry is not an object")
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        if dtype is None:
            raise bad(f"unsupported dtype {entry.get('dtype')!r}")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"bad shape {shape!r}")
        # torch sizes are int64, and it refuses a zero-size shape whose other dimensions overflow
        if math.prod(d for d in shape if d) > 2**63 - 1:
            raise bad(f"shape {shape!r} is too large")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise bad(f"bad data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end:
            raise bad(f"bad data_offsets {offsets!r}")
        if end - begin != expected:
            raise bad(f"data_offsets span {end - begin} bytes but {entry['dtype']}{shape} needs {expected}")
        if end > data_len:
            raise bad(
                f"data ends at byte {self.data_start + end} but the file has {self.data_start + data_len}: truncated"
            )
        return TensorInfo(name, self.path, dtype, tuple(shape), self.data_start + begin, expected)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def load(self, name: str) -> torch.Tensor:
        """The tensor as a copy-on-write view of a memory map of its own byte range."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError("not in this file", str(self.path), name) from None
        return map_tensor(info)


def map_tensor(info: TensorInfo) -> torch.Tensor:
    """Map `info`'s bytes; the map lives exactly as long as the returned tensor."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    gran = mmap.ALLOCATIONGRANULARITY
    base = info.start - info.start % gran
    lead = info.start - base
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointError("file vanished while reading", str(info.file), info.name) from None
    try:
        size = os.fstat(fd).st_size
        if info.start + info.nbytes > size:
            # Touching a mapping past the end of a file kills the process with SIGBUS.
            raise CheckpointError(f"file shrank to {size} bytes while open: truncated", str(info.file), info.name)
        m = mmap.mmap(fd, lead + info.nbytes, access=mmap.ACCESS_COPY, offset=base)
    finally:
        os.close(fd)
    flat = torch.frombuffer(m, dtype=torch.uint8, count=info.nbytes, offset=lead)
    return flat.view(info.dtype).reshape(info.shape)


def read_bytes(info: TensorInfo) -> bytes:
    """The tensor's raw little-endian bytes, for bit-exact copying."""
    with open(info.file, "rb") as f:
        f.seek(info.start)
        data = f.read(info.nbytes)
    if len(data) != info.nbytes:
        raise CheckpointError("short read: file truncated", str(info.file), info.name)
    return data


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor, with the header fixed up front.

    The header is computed from the planned (name, dtype, shape) entries, so tensors can be
    produced and written one at a time and never held together. Data goes to `<path>.tmp`,
    renamed to `path` by `close()` only when every planned tensor was written. Every byte
    (header included) is hashed as it is written: `sha256` holds the file's digest after
    `close()`. A full disk raises DiskFullError naming `path`, with the temporary file removed.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):  # fmt: skip
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self.expected: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        offset = 0
        for name, dtype, shape in entries:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.expected.append((name, dtype, tuple(shape), n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.size = 8 + len(raw) + offset
        self.sha256: str | None = None
        self._f = HashingFile(self.tmp, self.path)
        try:
            self._f.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape, n = self.expected[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {want} {dtype} {list(shape)}, got {name} "
                             f"{tensor.dtype} {list(tensor.shape)}")  # fmt: skip
        t = tensor.detach().contiguous().cpu()
        try:
            self._f.write(t.view(torch.uint8).numpy().reshape(-1).data if n else b"")  # the buffer itself, no copy
        except DiskFullError:
            self.abort()
            raise
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.expected):
            self.abort()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.expected)} tensors")
        try:
            self._f.sync()
            self._f.close()
        except DiskFullError:
            self.abort()
            raise
        if self._f.size != self.size:
            self.abort()
            raise ValueError(f"{self.path}: wrote {self._f.size} bytes, the header implies {self.size}")
        os.replace(self.tmp, self.path)
        self.sha256 = self._f.hexdigest()

    def abort(self) -> None:
        self._f.discard()


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """`tensors` as one safetensors file, in their order, through a SafetensorsWriter (temporary name,
    fsync, rename; nothing left behind on any failure or interrupt); the file's sha256."""
    w = SafetensorsWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata)
    try:
        for k, t in tensors.items():
            w.write(k, t)
        w.close()
    except BaseException:
        w.abort()
        raise
    return w.sha256
