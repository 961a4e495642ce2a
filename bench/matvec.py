"""Benchmark: the CPU's FP8 matvec (quant/matvec_kernel.py, the runner's decode kernel for K2's FP8
attention, shared experts and dense MLP) against torch's bf16 F.linear on the same weights and
against the memory-bandwidth bound, at Kimi K2's shapes, one token.

For each shape, enough distinct random FP8-block weights (128x128 scales) that together they
exceed 4x the last-level cache, so every call reads its weight from RAM; the same weights decoded
to bf16 for torch. Per shape and thread count: milliseconds per call (best of 3 passes), the
bytes the kernel streams per second (codes and scales for FP8, bf16 bytes for torch), and
  * speedup: torch's seconds / the FP8 kernel's seconds for the same weight (the decode win);
  * of bound: (FP8 bytes / the measured read bandwidth) / the FP8 kernel's seconds;
  * k2quant's bf16 matvec on the bf16 weights (the runner's kernel for bf16 weights, one token) and
    its speedup over torch's F.linear.
Then the crossover against decoding to bf16 (a chunk of rows at a time) and F.linear as the rows
of x grow (why the runner switches at runner/kernels.py FP8_MATVEC_ROWS).

Usage: python bench/matvec.py [--threads 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import best_ms  # noqa: E402  (bench/attention.py)

from k2quant.checkpoint import StoredWeight  # noqa: E402
from k2quant.quant import matvec_kernel as K  # noqa: E402
from k2quant.runner.bandwidth import _llc_bytes, measure_read_bandwidth  # noqa: E402
from k2quant.runner.kernels import FP8_MATVEC_ROWS, FP8CPU  # noqa: E402

# (name, rows, columns) of K2's weights a decoded token reads through this kernel
SHAPES = [
    ("q_a_proj", 1536, 7168),
    ("q_b_proj", 12288, 1536),
    ("kv_a_proj_with_mqa", 576, 7168),
    ("o_proj", 7168, 8192),
    ("shared gate+up", 4096, 7168),
    ("shared down", 7168, 2048),
    ("dense gate+up", 36864, 7168),
]


def best_s(fn, reps: int = 3) -> float:
    return best_ms(fn, reps) / 1e3


def _shape(n: int, k: int, copies: int, g: torch.Generator) -> tuple[float, float, float, int, int]:
    """(FP8 matvec, torch's bf16 F.linear, k2quant's bf16 matvec seconds, FP8 bytes, bf16 bytes) per one-token
    call of an n x k weight."""
    ws, bs = [], []
    for _ in range(copies):
        q = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = torch.rand(-(-n // 128), -(-k // 128), generator=g) * 1e-3 + 1e-5
        ws.append(K.Codes.from_fp8(q, s, (128, 128)))
        bs.append(K.decode_bf16(ws[-1]))
    x = torch.randn(1, 1, k, generator=g)
    xb = x[:, 0].bfloat16()
    t8 = best_s(lambda: [K.matvec(w, x) for w in ws]) / copies
    t16 = best_s(lambda: [F.linear(xb, b) for b in bs]) / copies
    tk = best_s(lambda: [K.matvec_bf16(b, x[:, 0]) for b in bs]) / copies
    return t8, t16, tk, ws[0].nbytes, bs[0].numel() * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    working = max(256 << 20, 4 * _llc_bytes())
    rows, results = [], {}
    for threads in a.threads:
        bw = measure_read_bandwidth(threads)
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): read bandwidth {bw / 1e9:.1f} GB/s")
        print(f"{'weight':<20} {'shape':>12} {'fp8 ms':>8} {'GB/s':>6} {'bf16 ms':>8} {'GB/s':>6} {'speedup':>8} "
              f"{'of bound':>8} {'k2q bf16 ms':>12} {'GB/s':>6} {'vs torch':>9}")  # fmt: skip
        tot_fp8 = tot_bf16 = tot_k = tot_bytes = 0.0
        for name, n, k in SHAPES:
            t8, t16, tk, nb8, nb16 = _shape(n, k, max(1, working // (n * k)), g)
            bound = nb8 / bw
            print(f"{name:<20} {f'{n}x{k}':>12} {t8 * 1e3:8.2f} {nb8 / t8 / 1e9:6.1f} {t16 * 1e3:8.2f} "
                  f"{nb16 / t16 / 1e9:6.1f} {t16 / t8:7.2f}x {bound / t8:8.2f} {tk * 1e3:12.2f} {nb16 / tk / 1e9:6.1f} "
                  f"{t16 / tk:8.2f}x")  # fmt: skip
            rows.append({"threads": threads, "weight": name, "shape": [n, k], "fp8_s": t8, "bf16_s": t16,
                         "k2quant_bf16_s": tk, "fp8_bytes": nb8, "bf16_bytes": nb16, "bandwidth": bw})  # fmt: skip
            tot_fp8, tot_bf16, tot_k, tot_bytes = tot_fp8 + t8, tot_bf16 + t16, tot_k + tk, tot_bytes + nb8
        print(f"{'one layer of each':<33} {tot_fp8 * 1e3:8.2f} {tot_bytes / tot_fp8 / 1e9:6.1f} {tot_bf16 * 1e3:8.2f}"
              f" {'':>6} {tot_bf16 / tot_fp8:7.2f}x {tot_bytes / bw / tot_fp8:8.2f} {tot_k * 1e3:12.2f} {'':>6} "
              f"{tot_bf16 / tot_k:8.2f}x")  # fmt: skip
        results[threads] = {"fp8_s": tot_fp8, "bf16_s": tot_bf16, "k2quant_bf16_s": tot_k, "fp8_bytes": tot_bytes,
                            "bandwidth": bw}  # fmt: skip
    # the crossover: matvec against decoding in chunks + F.linear, as x grows (runner/kernels.py FP8_MATVEC_ROWS)
    threads = a.threads[-1]
    torch.set_num_threads(threads)
    q = (torch.randn(4096, 7168, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    lin = FP8CPU(StoredWeight("w", "fp8_block", (4096, 7168), {"weight": q, "weight_scale_inv": torch.full((32, 56),
                 1e-4)}, (128, 128)))  # fmt: skip
    print(f"\nrows of x, 4096x7168, {threads} thread(s): matvec ms / decode to bf16 in chunks + F.linear ms "
          f"(the runner takes the matvec up to {FP8_MATVEC_ROWS} rows)")  # fmt: skip
    cross = []
    for m in (1, 2, 3, 4, 6, 8, 16, 64):
        x = torch.randn(m, 7168, generator=g).bfloat16()
        tm = best_s(lambda: lin.matvec(x))  # noqa: B023
        td = best_s(lambda: lin.decoded_linear(x))  # noqa: B023
        cross.append({"rows": m, "matvec_s": tm, "decode_linear_s": td})
        print(f"  {m:3d}: {tm * 1e3:7.2f} / {td * 1e3:7.2f}  {'matvec' if tm < td else 'decode + F.linear'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shapes": rows, "totals": results, "crossover": cross}, f, indent=1)


if __name__ == "__main__":
    main()
