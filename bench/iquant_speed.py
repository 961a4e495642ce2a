"""Benchmark: k2quant's compiled k-quant and i-quant encoders against ggml's own, one thread.

ggml's encoder is called in the llama.cpp library the installed llama-cpp-python built
(ggml_quantize_chunk in libggml-base, through ctypes, with the same importance vector); k2quant's
is `ggml.quantize` with --method rtn (llama.cpp's procedure: the bytes must be identical) and
--method mse (its search on top). Prints, per type: microseconds per weight for each, k2quant /
ggml time ratios, whether rtn's bytes equal ggml's, and mse's importance-weighted error over
ggml's. The first call of each kernel (numba's compile or cache load, the grid tables) is made
on a small matrix before timing. Everything is measured in this run.

Usage: python bench/iquant_speed.py [--rows 256] [--cols 4096] [--repeat 3] [--types IQ2_XXS,...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from k2quant.quant import ggml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llamacpp import quantize_chunk_here  # noqa: E402

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")  # fmt: skip


def ggml_encode(x: np.ndarray, t: str, imp: np.ndarray) -> np.ndarray:
    """ggml_quantize_chunk of the rows of x (float32) as type t with column importance imp (one thread)."""
    return quantize_chunk_here(ggml.TYPES[t].id, ggml.TYPES[t].row_bytes(x.shape[1]), x, imp)


def _best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings per encoder")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # k2quant's kernels take their thread count from torch's
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=g) * 0.02
    w[:, ::97] *= 8  # some outlying columns, as real weights have
    imp = torch.rand(args.cols, generator=g) ** 3 * 5 + 1e-3
    rows = []
    for t in args.types.split(","):
        ggml.quantize(w[:2], t, imp, search=True)  # compile / load the kernel and build its tables
        ggml_encode(w[:2].numpy(), t, imp.numpy())
        tg, ref = _best_of(lambda t=t: ggml_encode(w.numpy(), t, imp.numpy()), args.repeat)
        tr, rtn = _best_of(lambda t=t: ggml.quantize(w, t, imp, search=False).numpy(), args.repeat)
        tm, mse = _best_of(lambda t=t: ggml.quantize(w, t, imp, search=True), args.repeat)

        def err(d, t=t):
            return float((((ggml.dequantize(torch.as_tensor(d), t, args.cols) - w) ** 2) * imp).sum())

        n = w.numel()
        rows.append({"type": t, "ggml_us_per_weight": tg / n * 1e6, "rtn_us_per_weight": tr / n * 1e6,
                     "mse_us_per_weight": tm / n * 1e6, "rtn_over_ggml": tr / tg, "mse_over_ggml": tm / tg,
                     "rtn_bytes_identical": bool(np.array_equal(rtn, ref)),
                     "mse_error_over_ggml": err(mse) / err(ref)})  # fmt: skip
    if args.json:
        print(json.dumps({"rows": args.rows, "cols": args.cols, "threads": 1, "results": rows}, indent=1))
        return
    print(f"{args.rows} x {args.cols} weights, one thread, importance-weighted; best of {args.repeat}")
    print(f"{'type':8} {'ggml us/w':>10} {'rtn us/w':>9} {'rtn/ggml':>9} {'mse us/w':>9} {'mse/ggml':>9} "
          f"{'rtn bytes':>10} {'mse err/ggml':>13}")  # fmt: skip
    for r in rows:
        same = "identical" if r["rtn_bytes_identical"] else "DIFFER"
        speeds = f"{r['ggml_us_per_weight']:10.3f} {r['rtn_us_per_weight']:9.3f} {r['rtn_over_ggml']:9.2f}"
        search = f"{r['mse_us_per_weight']:9.3f} {r['mse_over_ggml']:9.2f}"
        print(f"{r['type']:8} {speeds} {search} {same:>10} {r['mse_error_over_ggml']:13.3f}")


if __name__ == "__main__":
    main()
