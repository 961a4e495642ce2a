"""Benchmark: GPTQ (int4-g32) of one routed expert at Kimi K2's dimensions, Hessian factored in float64 vs float32.

gate and up (2048x7168) share one 7168^2 Hessian, down (7168x2048) has a 2048^2 one, both from
4096 random tokens with unequal channel scales. Prints, in one run, the seconds per expert and
the seconds spent factoring with the float64 factor (what k2quant did before) and with the
float32 factor it uses where safe (quant/gptq.py: DIAG_SPAN_F32), and which precision was used.

Usage: python bench/gptq_speed.py
"""

from __future__ import annotations

import time

import torch

from k2quant.quant import gptq
from k2quant.quant.schemes import parse_scheme


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 7168, generator=g) * (torch.rand(7168, generator=g) + 0.1)
    h_in = x.T @ x
    xd = torch.randn(4096, 2048, generator=g)
    h_down = xd.T @ xd
    weights = [torch.randn(2048, 7168, generator=g) * 0.02, torch.randn(2048, 7168, generator=g) * 0.02,
               torch.randn(7168, 2048, generator=g) * 0.02]  # fmt: skip
    scheme = parse_scheme("int4-g32")
    span = gptq.DIAG_SPAN_F32
    rows = []
    for label, limit in (("float64 factor (before)", 0.0), ("float32 factor (now)", span)):
        gptq.DIAG_SPAN_F32 = limit
        gptq._LAST.clear()
        before = dict(gptq.FACTORED)
        t, factoring = time.time(), 0.0
        for w, h in zip(weights, (h_in, h_in, h_down), strict=True):
            t0 = time.time()
            gptq._factor(h, 0.01, False)  # cached: quantize below reuses it
            factoring += time.time() - t0
            scheme.quantize(w, hessian=h)
        used = {k: gptq.FACTORED[k] - before[k] for k in before}
        rows.append((label, time.time() - t, factoring, used))
        print(f"{label}: {rows[-1][1]:.1f} s per expert, {factoring:.1f} s factoring, factored {used}", flush=True)
    gptq.DIAG_SPAN_F32 = span
    print(f"float32 / float64: {rows[1][1] / rows[0][1]:.2f}x the time per expert ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
