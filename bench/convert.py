"""Benchmark: k2quant convert throughput against a raw copy of the same bytes, and peak RSS.

Generates a synthetic FP8-block checkpoint at real Kimi K2 dimensions (hidden 7168,
expert width 2048, MLA ranks 1536/512, 64 heads; fewer experts per layer and a smaller
vocabulary so it fits on a test machine), then in one run measures:

  * raw copy of the shard files (shutil.copyfile + sync): the I/O bound, warm and (as root,
    the page cache dropped first) cold;
  * k2quant convert per preset and method at 1 and 2 workers, as GB of source per second and
    as a ratio to the raw copy, marked against issue 15's acceptance ratios;
  * peak RSS of a conversion (separate process) on two checkpoint sizes.

Usage: python bench/convert.py [--dir /tmp/k2bench] [--experts 32] [--moe-layers 2] [--no-cold] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from k2quant.synthetic import k2_config_dict, write_synthetic_checkpoint


def make(root: Path, moe_layers: int, experts: int) -> Path:
    d = root / f"src-{moe_layers}x{experts}"
    if (d / "model.safetensors.index.json").exists():
        return d
    cfg = k2_config_dict(num_hidden_layers=1 + moe_layers, n_routed_experts=experts, vocab_size=16384)
    t = time.time()
    write_synthetic_checkpoint(d, cfg, num_shards=1 + moe_layers)
    print(f"generated {d} ({size(d) / 1e9:.2f} GB) in {time.time() - t:.0f} s", flush=True)
    return d


def size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def warm(d: Path) -> None:
    for p in sorted(d.glob("*.safetensors")):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def raw_copy(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t = time.time()
    for p in sorted(src.glob("*.safetensors")):
        shutil.copyfile(p, dst / p.name)
    os.sync()
    dt = time.time() - t
    shutil.rmtree(dst)
    return dt


CONVERT = r"""
import json, resource, sys, time
from k2quant.convert import convert
from k2quant.memory import peak_rss
from k2quant.recipe import build_recipe
t = time.time()
s = convert(sys.argv[1], sys.argv[2], build_recipe(sys.argv[3]), method=sys.argv[4], workers=int(sys.argv[5]),
            progress=False)
import os; os.sync()
print(json.dumps({"seconds": time.time() - t, "bytes": s["bytes"], "bpw": s["bits_per_weight"],
                  "peak_rss": peak_rss(),
                  # workers are spawned by this small process, so their inherited high-water mark is small too
                  "children_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def run_convert(src: Path, out: Path, preset: str, method: str, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(out), preset, method, str(workers)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode:
        raise SystemExit(r.stderr)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(out)
    return res


# issue 15's rows: (preset, method, the ratio to the raw copy it must reach, the aim)
TARGETS = {("k2-int4", "rtn"): (0.8, 1.0), ("k2-int4", "mse"): (0.4, 0.8), ("int4-all", "rtn"): (0.6, 0.9)}


def drop_caches() -> str | None:
    """Empty the page cache (root only): None when done, else why not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"cannot drop the page cache ({e.strerror}); cold rows skipped"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/k2quant-bench")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--moe-layers", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["throughput", "rss"], default=None, help="Run one half of the benchmark.")
    ap.add_argument("--no-cold", action="store_true", help="Skip the cold page cache rows.")
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    src = make(root, a.moe_layers, a.experts)
    gb = size(src) / 1e9
    rows, rss = [], []
    cases = [("fp8", "rtn", 1, "warm")]
    cases += [(p, m, w, "warm") for p, m in TARGETS for w in (1, 2)]
    cold_note = None
    if not a.no_cold:
        cold_note = drop_caches()
        if cold_note is None:
            cases += [(p, m, 2, "cold") for p, m in TARGETS]
    if a.only == "rss":
        cases = []
    copy_s = {}
    if cases:
        warm(src)
        copy_s["warm"] = min(raw_copy(src, root / "copy") for _ in range(2))
        rows.append(
            {"case": "raw copy (warm)", "seconds": copy_s["warm"], "gb_per_s": gb / copy_s["warm"], "ratio": 1.0}
        )
        if any(c[3] == "cold" for c in cases):
            drop_caches()
            copy_s["cold"] = raw_copy(src, root / "copy")
            rows.append({"case": "raw copy (cold)", "seconds": copy_s["cold"], "gb_per_s": gb / copy_s["cold"],
                         "ratio": 1.0})  # fmt: skip
    for preset, method, workers, cache in cases:
        warm(src) if cache == "warm" else drop_caches()
        r = run_convert(src, root / "out", preset, method, workers)
        ratio = copy_s[cache] / r["seconds"]
        target = TARGETS.get((preset, method))
        rows.append({"case": f"--preset {preset} --method {method} --workers {workers} ({cache})",
                     "seconds": r["seconds"], "gb_per_s": gb / r["seconds"], "ratio": ratio,
                     "bpw": r["bpw"], "peak_rss_gb": max(r["peak_rss"], r["children_rss"]) / 1e9,
                     "acceptance": target and target[0], "aim": target and target[1],
                     "met": None if target is None else ratio >= target[0]})  # fmt: skip
        print(f"{rows[-1]['case']}: {r['seconds']:.1f} s", flush=True)
    # peak RSS on two sizes (single worker, rtn)
    for layers in (a.moe_layers, 2 * a.moe_layers) if a.only != "throughput" else ():
        s = make(root, layers, a.experts)
        warm(s)
        r = run_convert(s, root / "out", "k2-int4", "rtn", 1)
        rss.append({"source_gb": size(s) / 1e9, "peak_rss_gb": r["peak_rss"] / 1e9})
    print(f"\nsource: {gb:.2f} GB FP8-block, K2 dimensions, {a.moe_layers} MoE layers x {a.experts} experts, "
          f"{os.cpu_count()} cores")  # fmt: skip
    if cold_note:
        print(cold_note)
    print(f"{'case':<52}{'s':>7}{'GB/s':>8}{'x copy':>8}{'bpw':>6}{'RSS GB':>8}  acceptance / aim")
    for r in rows:
        verdict = (
            ""
            if r.get("met") is None
            else f"  >= {r['acceptance']} / {r['aim']}: " + ("met" if r["met"] else "NOT met")
        )
        print(f"{r['case']:<52}{r['seconds']:>7.1f}{r['gb_per_s']:>8.3f}{r['ratio']:>8.3f}"
              f"{r.get('bpw', 0):>6.2f}{r.get('peak_rss_gb', 0):>8.2f}{verdict}")  # fmt: skip
    for r in rss:
        print(f"peak RSS converting {r['source_gb']:.2f} GB: {r['peak_rss_gb']:.2f} GB")
    if a.json:
        Path(a.json).write_text(json.dumps({"source_gb": gb, "rows": rows, "rss": rss}, indent=2))


if __name__ == "__main__":
    main()
