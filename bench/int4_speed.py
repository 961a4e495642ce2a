"""Benchmark: the fused INT4 encoder (quant/int4_kernel.py) against the torch reference it replaces.

One K2 routed expert's weight (gate/up: 2048x7168) as the release stores it (FP8 e4m3 with
128x128 block scales), symmetric groups of 32 (k2-int4, K2-Thinking's scheme). Times, in this
run: `encode_int4` with round-to-nearest and with the clipping search (importance-weighted),
on 1 and 2 threads, and `int4.quantize_int4` + `pack_int4` on the decoded float32 weight
(torch, the same threads), with a copy of the source bytes for scale. Prints G weights/s and
the kernel / torch speed ratio, and checks that round-to-nearest gives the reference's bytes.
The first call of each (numba's compile or cache load) is made before timing; best of N.

Usage: python bench/int4_speed.py [--rows 2048] [--cols 7168] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from k2quant.quant.fp8 import dequantize_fp8_block, quantize_fp8_block
from k2quant.quant.int4 import pack_int4, quantize_int4
from k2quant.quant.int4_kernel import KernelSource, encode_int4, set_threads


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.rows, a.cols, generator=g) * 0.02
    codes, bscale = quantize_fp8_block(w)
    f = dequantize_fp8_block(codes, bscale)
    imp = torch.rand(a.cols, generator=g) + 0.1
    src = KernelSource.from_fp8_block(codes, bscale, (128, 128))
    n = w.numel()
    raw = codes.view(torch.uint8).numpy()
    encode_int4(KernelSource.from_fp8_block(codes[:128], bscale[:1], (128, 128)), importance=imp, search=True)
    encode_int4(KernelSource.from_fp8_block(codes[:128], bscale[:1], (128, 128)), search=False)
    rows = []
    for threads in (1, 2):
        set_threads(threads)
        torch.set_num_threads(threads)
        t_copy, _ = _best(lambda: raw.copy(), a.repeat)
        for method in ("rtn", "mse"):
            search = method == "mse"
            wi = imp if search else None
            kernel = lambda wi=wi, search=search: encode_int4(src, importance=wi, search=search)  # noqa: E731
            t_k, (packed, s, _) = _best(kernel, a.repeat)
            t_t, (q, s_ref, _) = _best(lambda wi=wi, search=search: quantize_int4(f, 32, True, 8, wi, search), 1)
            same = bool(torch.equal(packed, pack_int4(q)) and torch.equal(s.view(torch.int16), s_ref.view(torch.int16)))
            rows.append({"threads": threads, "method": method, "kernel_s": t_k, "torch_s": t_t, "copy_s": t_copy,
                         "kernel_gw_s": n / t_k / 1e9, "torch_gw_s": n / t_t / 1e9, "speedup": t_t / t_k,
                         "time_vs_copy": t_k / t_copy, "same_bytes": same})  # fmt: skip
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"INT4 g32 symmetric, {a.rows}x{a.cols} FP8 weight ({n / 1e6:.1f} M weights), best of {a.repeat}")
    print(f"{'threads':>7} {'method':>6} {'kernel Gw/s':>11} {'torch Gw/s':>10} {'kernel/torch':>12} "
          f"{'time vs copy':>12} {'same bytes':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['threads']:>7} {r['method']:>6} {r['kernel_gw_s']:>11.3f} {r['torch_gw_s']:>10.3f} "
              f"{r['speedup']:>11.1f}x {r['time_vs_copy']:>11.1f}x {str(r['same_bytes']):>10}")  # fmt: skip
    print("same bytes: rtn must be True; mse may differ on near-ties (the kernel sums errors in float64)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
