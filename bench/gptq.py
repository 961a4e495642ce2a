"""Benchmark: INT4 g32 on mini-K2 by round-to-nearest, clipping search, imatrix-weighted search and GPTQ.

Calibrates mini-K2 (BF16; the bundled calibration set, with Hessians), converts it with
each method (preset int4-all by default), and diffs each against BF16 on the held-out
text: mean KLD, its uncertainty, top-1 agreement and conversion seconds. The last row is
GPTQ calibrated layer by layer inside convert (no stored Hessians) on the same tokens:
it reports whether its shards are byte-identical to the stored-Hessian GPTQ's and the
most Hessian memory it held, against the stored Hessians' size; then the same with
--propagate (each layer calibrated on the quantized layers' outputs).

Usage: python bench/gptq.py [--preset int4-all] [--tokens 8192] [--dir /tmp/k2bench-gptq] [--act-order]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from k2quant import minik2_bench
from k2quant.calib.datasets import heldout_text
from k2quant.calibrate import calibrate
from k2quant.convert import convert
from k2quant.recipe import build_recipe
from k2quant.report.diff import run_diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="int4-all")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dir", default="/tmp/k2bench-gptq")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--demo-model", action="store_true",
                    help="the demo's mini-K2 (built in minutes) instead of the bench model (an hour once)")  # fmt: skip
    a = ap.parse_args()
    _, bf16, about = minik2_bench.releases(a.demo_model)
    print(about)
    root = Path(a.dir) / ("demo-model" if a.demo_model else "bench-model")  # each model's files apart
    calib = root / "calib"
    root.mkdir(parents=True, exist_ok=True)
    a.heldout = root / "heldout.txt"  # calib/heldout/: read by neither training nor calibration
    a.heldout.write_text(heldout_text(), encoding="utf-8")
    if not (calib / "hessians.safetensors").exists():
        s = calibrate(bf16, calib, None, tokens=a.tokens, ctx=256, progress=False, hessian=True)
        print(f"calibrated {s['tokens']} tokens with Hessians in {s['seconds']:.1f} s")
    imatrix, hessians = calib / "imatrix.gguf", calib / "hessians.safetensors"
    runs = [("rtn", {"method": "rtn"}), ("mse", {"method": "mse"}),
            ("mse + imatrix", {"method": "mse", "imatrix": imatrix}),
            ("gptq", {"method": "gptq", "imatrix": imatrix, "hessians": hessians})]  # fmt: skip
    if a.act_order:
        runs.append(("gptq act-order", {"method": "gptq-act-order", "imatrix": imatrix, "hessians": hessians}))
    print(f"{a.preset} on mini-K2 vs BF16 (held-out text {a.heldout}, 4 x 512-token chunks, second halves scored)")
    stored = None
    for name, kw in runs:
        out = root / name.replace(" ", "")
        shutil.rmtree(out, ignore_errors=True)
        s = convert(bf16, out, build_recipe(a.preset), progress=False, **kw)
        m = run_diff(bf16, out, [a.heldout], ctx=512, chunks=4, progress=False)
        k = m["kld"]
        extra = f", {len(s['gptq_fallbacks'])} fallbacks" if s.get("hessians") else ""
        if name == "gptq":
            stored = out
        print(f"  {name:<16} KLD {k['mean']:.6f} ± {k['stderr']:.6f}  top-1 {100 * m['top1_agreement']:.2f}%  "
              f"convert {s['seconds']:.1f} s{extra}", flush=True)  # fmt: skip
    streamed(bf16, root, a, stored, hessians, False)
    streamed(bf16, root, a, stored, hessians, True)


def streamed(bf16: Path, root: Path, a, stored: Path, hessians: Path, propagate: bool) -> None:
    out = root / ("gptq-propagate" if propagate else "gptq-streamed")
    shutil.rmtree(out, ignore_errors=True)
    s = convert(bf16, out, build_recipe(a.preset), method="gptq", calib_tokens=a.tokens, calib_ctx=256,
                propagate=propagate, progress=False)  # fmt: skip
    m = run_diff(bf16, out, [a.heldout], ctx=512, chunks=4, progress=False)
    same = all((out / p.name).read_bytes() == p.read_bytes() for p in sorted(stored.glob("*.safetensors")))
    g = s["gptq_stream"]
    name = "gptq propagate" if propagate else "gptq streamed"
    print(f"  {name:<16} KLD {m['kld']['mean']:.6f} ± {m['kld']['stderr']:.6f}  "
          f"top-1 {100 * m['top1_agreement']:.2f}%  convert {s['seconds']:.1f} s (calibration + GPTQ "
          f"{g['seconds']:.1f} s), {len(s['gptq_fallbacks'])} fallbacks; byte-identical to gptq: {same}; "
          f"Hessians held at most {g['peak_hessian_bytes'] / 2**20:.1f} MiB (stored file "
          f"{hessians.stat().st_size / 2**20:.1f} MiB in float32)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
