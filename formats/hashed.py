"""Files written once, hashed while they are written, renamed into place when complete.

Every byte k2quant writes into an output goes through a `HashingFile`: it counts and
sha256-hashes what passes, so a file's digest is known the moment it is closed, with no
second pass over hundreds of GB (a large buffer is written by a second thread while it is
hashed, so the hash adds no time where there is a core for it). A write that fails because the disk (or a quota) is
full becomes one `DiskFullError` naming the file. `atomic_write` and `copy_file` write
under `<name>.tmp`, fsync, and rename; on any failure the temporary file is removed, so
a final name never holds a partial file.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from k2quant.errors import DiskFullError

FULL = (errno.ENOSPC, errno.EDQUOT)
PARALLEL_BYTES = 1 << 20  # writes from this size on overlap the write and the hash
_WRITER: list[ThreadPoolExecutor] = []  # one writer thread per process, made on first use


_SYNC_FILE_RANGE = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)  # Linux only
EARLY_WRITEBACK = _SYNC_FILE_RANGE is not None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to the disk now (sync_file_range with
    SYNC_FILE_RANGE_WRITE: it does not wait), so the fsync at the end finds little left to write.
    Only a hint: its result is not checked (a full disk shows up in the write or the fsync)."""
    _SYNC_FILE_RANGE(ctypes.c_int(fd), ctypes.c_int64(offset), ctypes.c_int64(nbytes), ctypes.c_uint(2))


def _writer() -> ThreadPoolExecutor:
    if not _WRITER:
        _WRITER.append(ThreadPoolExecutor(1, thread_name_prefix="k2quant-write"))
    return _WRITER[0]


@dataclass(frozen=True)
class WrittenFile:
    """A finished file: where it is, its size and the sha256 of its bytes."""

    path: Path
    size: int
    sha256: str


def _open_raw(path: Path):
    """The plain file under a HashingFile (one place, so tests can put a full disk under it)."""
    return open(path, "wb")


class HashingFile:
    """A binary file open for writing that hashes and counts every byte written through it.

    `name` is the file reported when the disk is full (the final name, not the temporary one)."""

    def __init__(self, path: str | Path, name: str | Path | None = None):
        self.path = Path(path)
        self.name = str(name or path)
        self.size = 0
        self._sha = hashlib.sha256()
        self._pending: Future | None = None
        self._f = self._guard(_open_raw, self.path)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            if e.errno in FULL:
                raise DiskFullError(self.name, f" ({self.size:,} bytes written)") from None
            raise

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write and hash `data`; a large buffer is written by a second thread while this one hashes it
        (both release the GIL: on 2 cores the hash costs no time of its own). Nothing is in flight
        when this returns, so the caller may reuse its buffer."""
        view = memoryview(data).cast("B")
        if len(view) < PARALLEL_BYTES:
            self._guard(self._f.write, view)
            self._sha.update(view)
        else:
            self._pending = _writer().submit(self._f.write, view)
            try:
                self._sha.update(view)
            finally:
                self._guard(self._pending.result)
                self._pending = None
            if EARLY_WRITEBACK:
                self._f.flush()
                _start_writeback(self._f.fileno(), self.size, len(view))
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._guard(self._f.flush)

    def sync(self) -> None:
        """Flush and fsync: the bytes are on the disk (a full disk can still show up here)."""
        self.flush()
        self._guard(os.fsync, self._f.fileno())

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._guard(self._f.close)

    def discard(self) -> None:
        """Close without raising (what is buffered may not fit) and delete the file."""
        if self._pending is not None:  # interrupted while a write was in flight: let it end first
            wait([self._pending])
        try:
            self._f.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def atomic_write(path: str | Path, chunks: Iterable[bytes]) -> WrittenFile:
    """Write `chunks` to `path` via `<path>.tmp` (fsync, rename); the digest is taken on the way."""
    path = Path(path)
    f = HashingFile(path.with_name(path.name + ".tmp"), path)
    try:
        for chunk in chunks:
            f.write(chunk)
        f.sync()
        f.close()
        os.replace(f.path, path)
    except BaseException:
        f.discard()
        raise
    return WrittenFile(path, f.size, f.hexdigest())


def copy_file(src: str | Path, dst: str | Path) -> WrittenFile:
    """Copy `src` to `dst` as atomic_write does, hashing the bytes written."""

    def chunks():
        with open(src, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    return atomic_write(dst, chunks())
