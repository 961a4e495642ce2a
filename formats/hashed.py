"""Files written once, hashed while they are written, renamed into place when complete.

Every byte k2quant writes into an output goes through a `HashingFile`: it counts and
sha256-hashes what passes, so a file's digest is known the moment it is closed, with no
second pass over hundreds of GB. A write that fails because the disk (or a quota) is
full becomes one `DiskFullError` naming the file. `atomic_write` and `copy_file` write
under `<name>.tmp`, fsync, and rename; on any failure the temporary file is removed, so
a final name never holds a partial file.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from k2quant.errors import DiskFullError

FULL = (errno.ENOSPC, errno.EDQUOT)


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
        self._f = self._guard(_open_raw, self.path)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            if e.errno in FULL:
                raise DiskFullError(self.name, f" ({self.size:,} bytes written)") from None
            raise

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._guard(self._f.write, view)
        self._sha.update(view)
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
