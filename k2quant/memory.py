"""Measuring memory: the process's own peak resident set.

`resource.getrusage(...).ru_maxrss` is the wrong tool for a child process: Linux carries
the parent's high-water mark across fork and exec, so a small child of a large parent
reports the parent's peak. VmHWM in /proc/self/status belongs to the process's own
address space and starts fresh at exec.
"""

from __future__ import annotations

import resource


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
