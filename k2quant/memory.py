"""Measuring memory: the process's own peak resident set; handing freed heap back.

`resource.getrusage(...).ru_maxrss` is the wrong tool for a child process: Linux carries
the parent's high-water mark across fork and exec, so a small child of a large parent
reports the parent's peak. VmHWM in /proc/self/status belongs to the process's own
address space and starts fresh at exec.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource


def meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes ("MemTotal", "MemAvailable"); None where there is no /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc's malloc_trim; elsewhere nothing).

    Quantizing thousands of tensors of varying sizes in one process leaves glibc's heap
    fragmented: freed blocks are kept, and resident memory creeps up by megabytes per
    layer. Long layer-by-layer loops call this once per layer so the peak stays flat."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)
