"""The memory-bandwidth bound, measured one fixed way (the same in `k2quant run` and bench/run.py).

A multi-threaded read (torch `sum`) of a float32 buffer of max(1 GiB, 4 x the last-level
cache), best of five after a warm-up, with `threads` torch threads; cached per (CPU model,
threads) in ~/.cache/k2quant/bandwidth.json (or $K2QUANT_HOME) so a run does not re-measure;
measured in a child process, so the buffer does not count in the caller's peak RSS.
The bound for decode is bytes read per token / this bandwidth.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def _llc_bytes() -> int:
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        t = p.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
        best = max(best, int(t.rstrip("KMG")) * mult)
    return best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cache_file() -> Path:
    home = os.environ.get("K2QUANT_HOME") or Path.home() / ".cache" / "k2quant"
    return Path(home) / "bandwidth.json"


def measure_read_bandwidth(threads: int, size_bytes: int | None = None) -> float:
    """Bytes per second of a `threads`-thread read of a buffer much larger than the last-level cache."""
    n = max(1 << 30, 4 * _llc_bytes()) if size_bytes is None else size_bytes
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(n // 4, dtype=torch.float32)
        buf.sum()  # warm-up (and page-in)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t)
        return buf.nbytes / best
    finally:
        torch.set_num_threads(saved)


def read_bandwidth(threads: int) -> tuple[float, bool]:
    """(bytes/s, whether it came from the cache): measured once per CPU model and thread count."""
    key = f"{_cpu_model()} | {threads} threads"
    path = _cache_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if isinstance(data, dict) and isinstance(data.get(key), int | float):
        return float(data[key]), True
    # in a child process: the 1 GiB buffer must not count in the runner's own peak RSS
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from k2quant.runner.bandwidth import measure_read_bandwidth;"
            f" print(measure_read_bandwidth({int(threads)}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    bw = float(r.stdout.split()[-1])
    data = data if isinstance(data, dict) else {}
    data[key] = bw
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return bw, False
