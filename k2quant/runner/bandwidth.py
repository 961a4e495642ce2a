"""The memory-bandwidth bound and the runner's kernel rates, measured one fixed way (the same in
`k2quant run`, `k2quant plan` and bench/run.py).

A multi-threaded read (torch `sum`) of a float32 buffer of max(1 GiB, 4 x the last-level
cache), best of five after a warm-up, with `threads` torch threads; cached per (CPU model,
threads) in ~/.cache/k2quant/bandwidth.json (or $K2QUANT_HOME) so a run does not re-measure;
measured in a child process, so the buffer does not count in the caller's peak RSS.
The bound for decode is bytes read per token / this bandwidth.

Kernel rates (`kernel_rates`): the bytes per second each of the runner's CPU kernels streams
in a one-token call at K2 expert shapes (torch's int4pack, k2quant's bf16 and FP8 matvecs, an
asymmetric INT4 weight decoded per call), cached the same way (per CPU model, threads and torch version). `k2quant plan`
predicts the runner's CPU decode from them: bytes per kernel / min(its rate, the bandwidth).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
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


def _cached(key: str, code: str, valid: Callable[[object], bool]) -> tuple[object, bool]:
    """The cached value under `key` when `valid(value)`, else the JSON that `code` prints in a child
    process (then cached; an entry that is not valid, e.g. edited by hand, is measured again)."""
    path = _cache_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    if key in data and valid(data[key]):
        return data[key], True
    # in a child process: the measurement's buffers must not count in the caller's own peak RSS
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    data[key] = json.loads(r.stdout.splitlines()[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return data[key], False


def read_bandwidth(threads: int) -> tuple[float, bool]:
    """(bytes/s, whether it came from the cache): measured once per CPU model and thread count."""
    code = f"from k2quant.runner.bandwidth import measure_read_bandwidth; print(measure_read_bandwidth({int(threads)}))"
    bw, cached = _cached(f"{_cpu_model()} | {threads} threads", code, lambda v: isinstance(v, int | float) and v > 0)
    return float(bw), cached


# ---------------------------------------------------------------------------- the runner's CPU kernels
# The shapes a K2 routed expert's kernels take (gate and up fused: 4096 x 7168; down: 7168 x 2048).
KERNEL_SHAPES = ((4096, 7168), (7168, 2048))
KERNEL_KINDS = ("int4pack", "dense", "fp8", "decode per call")


def _kernel_weight(kind: str, n: int, k: int, g: torch.Generator):
    from k2quant.checkpoint import StoredWeight
    from k2quant.quant.int4 import pack_int4
    from k2quant.quant.schemes import parse_scheme

    if kind == "dense":
        return StoredWeight("w", "dense", (n, k), {"weight": (torch.randn(n, k, generator=g) * 0.02).bfloat16()})
    if kind == "int4pack":
        q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        parts = {"weight_packed": pack_int4(q), "weight_scale": torch.full((n, k // 32), 0.01).bfloat16(),
                 "weight_shape": torch.tensor([n, k])}  # fmt: skip
        return StoredWeight("w", "int4_pack", (n, k), parts)
    if kind == "fp8":  # FP8 block: K2's release, k2quant's matvec from the codes
        w = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn)
        return StoredWeight("w", "fp8_block", (n, k), {"weight": w, "weight_scale_inv": torch.full((n // 128, k // 128),
                            1e-4)}, (128, 128))  # fmt: skip
    # decoded per call (_kernel): symmetric INT4 g32, the form of the weights int4pack does not take
    parts = parse_scheme("int4-g32").quantize(torch.randn(n, k, generator=g) * 0.02, search=False)
    return StoredWeight("w", "int4_pack", (n, k), parts)


def _kernel(kind: str, n: int, k: int, g: torch.Generator):
    """The runner's fast-mode CPU kernel of `kind` over a fresh n x k weight."""
    from .kernels import DequantLinear, make_linear

    w = _kernel_weight(kind, n, k, g)
    return DequantLinear(w, torch.device("cpu"), torch.bfloat16) if kind == "decode per call" else \
        make_linear(w, "cpu", "fast")  # fmt: skip


def warm_up(threads: int = 2) -> None:
    """Run each of the runner's CPU code paths once on tiny shapes (the three kernel kinds at one and at
    64 tokens, both of torch's SDPA paths, the router's ops), so that the library code and thread pools
    they touch are resident. `k2quant plan` measures the interpreter's RSS after this: those pages
    (about 17 MB with torch 2.13) are the runner's whatever the model, not part of its weights."""
    import torch.nn.functional as F

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    try:
        for kind in KERNEL_KINDS:
            lin = _kernel(kind, 256, 512, g)
            for tokens in (1, 64):
                lin(torch.randn(tokens, 512, generator=g).bfloat16())
        for qk in (192, 128):  # K2's qk 192 / v 128 takes SDPA's math path; equal dims its fused kernel
            q, k = (torch.randn(1, 4, 64, qk, generator=g).bfloat16() for _ in range(2))
            F.scaled_dot_product_attention(q, k, torch.randn(1, 4, 64, 128, generator=g).bfloat16(), is_causal=True)
        x = torch.randn(64, 384, generator=g)
        torch.topk(torch.sigmoid(x), 8)
        torch.multinomial(torch.softmax(x, -1), 1, generator=g)
    finally:
        torch.set_num_threads(saved)


def measure_kernel_rates(threads: int, working_set: int | None = None) -> dict[str, float]:
    """Bytes per second each of the runner's CPU kernels (runner/kernels.py, fast mode) streams through
    a one-token call, at K2 expert shapes: bytes the kernel holds / seconds per call, over enough
    distinct weights (4 x the last-level cache) that they do not stay in the cache, best of three
    passes. Decoding per call is bound by its arithmetic, not by memory: two weights suffice there."""

    working_set = working_set or max(64 << 20, 4 * _llc_bytes())

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    try:
        for kind in KERNEL_KINDS:
            held = seconds = 0.0
            for n, k in KERNEL_SHAPES:
                first = _kernel(kind, n, k, g)
                copies = [first] + [_kernel(kind, n, k, g)
                                    for _ in range(1 if kind == "decode per call" else
                                                   max(1, working_set // first.nbytes) - 1)]  # fmt: skip
                x = torch.randn(1, k, generator=g).bfloat16()
                for lin in copies:  # warm-up, pages in
                    lin(x)
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    for lin in copies:
                        lin(x)
                    best = min(best, (time.perf_counter() - t) / len(copies))
                held += first.nbytes
                seconds += best
            out[kind] = held / seconds
    finally:
        torch.set_num_threads(saved)
    return out


def kernel_rates(threads: int) -> tuple[dict[str, float], bool]:
    """({kernel kind: bytes/s}, whether from the cache): measured once per CPU model, thread count and torch."""
    code = ("import json; from k2quant.runner.bandwidth import measure_kernel_rates; "
            f"print(json.dumps(measure_kernel_rates({int(threads)})))")  # fmt: skip

    def valid(v) -> bool:
        return isinstance(v, dict) and set(v) == set(KERNEL_KINDS) and all(
            isinstance(x, int | float) and x > 0 for x in v.values())  # fmt: skip

    rates, cached = _cached(f"{_cpu_model()} | {threads} threads | torch {torch.__version__} | kernels", code, valid)
    return {k: float(v) for k, v in rates.items()}, cached
