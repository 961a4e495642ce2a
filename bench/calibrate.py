"""Benchmark: calibration throughput for one MoE layer at Kimi K2's dimensions.

Builds a one-layer synthetic FP8 checkpoint at K2's dimensions (hidden 7168, MLA 1536/512,
64 heads, experts 2048 wide, top-8 routing, shared expert) with fewer routed experts, runs
k2quant's layer-streamed collection over random tokens, and reports in one run: tokens per
second through the layer, seconds to read and dequantize one routed expert, peak RSS, and
an estimate for all of K2 (60 MoE layers x 384 experts) from those two measured rates.
It also times GPTQ (int4-g32) of one routed expert at K2's dimensions from Hessians of its
real calibration inputs (gate and up share one 7168^2 Hessian, down has a 2048^2 one): the
per-expert cost of `convert --method gptq`, which the layer-streamed run adds per expert.

Usage: python bench/calibrate.py [--dir /tmp/k2quant-bench] [--experts 32] [--tokens 4096] [--ctx 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from k2quant.synthetic import k2_config_dict, write_synthetic_checkpoint

RUN = r"""
import json, sys, time, torch
from k2quant import open_model
from k2quant.calib.collect import collect
from k2quant.memory import peak_rss
src, tokens, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = open_model(src)
ck = model.checkpoint
t = time.time()
for e in range(4):
    for p in ("gate_proj", "up_proj", "down_proj"):
        ck.tensor(f"model.layers.0.mlp.experts.{e}.{p}.weight")
expert_s = (time.time() - t) / 4
seqs = torch.randint(0, ck.config.vocab_size, (tokens // ctx, ctx), generator=torch.Generator().manual_seed(0))
t = time.time()
stats = collect(model, seqs, batch=4, progress=False)
dt = time.time() - t
peak = peak_rss()
from k2quant.quant.schemes import parse_scheme
hot = int(stats.routed[0].argmax())  # the expert with the most tokens: a full-rank Hessian
mod = f"model.layers.0.mlp.experts.{hot}."
g = collect(model, seqs, batch=4, progress=False, hessian={mod + "gate_proj", mod + "down_proj"})
scheme = parse_scheme("int4-g32")
t = time.time()
for p, h in (("gate_proj", "gate_proj"), ("up_proj", "gate_proj"), ("down_proj", "down_proj")):
    scheme.quantize(ck.tensor(mod + p + ".weight"), hessian=g.hessians[mod + h].float())
gptq_s = time.time() - t
print(json.dumps({"seconds": dt, "tokens": seqs.numel(), "expert_load_s": expert_s, "peak_rss": peak,
                  "gptq_expert_s": gptq_s, "gptq_rows": g.counts[mod + "gate_proj"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/k2quant-bench")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    src = Path(a.dir) / f"calib-1x{a.experts}"
    if not (src / "model.safetensors.index.json").exists():
        cfg = k2_config_dict(num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=a.experts, vocab_size=16384)
        t = time.time()
        write_synthetic_checkpoint(src, cfg, num_shards=1)
        print(f"generated {src} in {time.time() - t:.0f} s", flush=True)
    r = subprocess.run([sys.executable, "-c", RUN, str(src), str(a.tokens), str(a.ctx)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    tps = m["tokens"] / m["seconds"]
    # the layer's time = loading its experts once + computing every token; estimate both parts for K2
    compute_s = m["seconds"] - a.experts * m["expert_load_s"]
    tps_compute = m["tokens"] / max(compute_s, 1e-9)
    k2_layer_load = 384 * m["expert_load_s"]
    est_131k = 60 * (k2_layer_load + 131072 / tps_compute) / 3600
    print(f"one MoE layer at K2 dimensions, {a.experts} routed experts (top-8), {m['tokens']} tokens of {a.ctx}:")
    print(f"  {m['seconds']:.1f} s = {tps:.0f} tokens/s through the layer (experts loaded once each)")
    print(f"  reading + dequantizing one routed expert (3 x 2048 x 7168 FP8): {m['expert_load_s']:.3f} s")
    print(f"  compute alone: {tps_compute:.0f} tokens/s; peak RSS {m['peak_rss'] / 1e9:.2f} GB")
    print(f"  estimate for K2 (60 MoE layers x 384 experts), 131072 tokens: {est_131k:.1f} h "
          f"({60 * k2_layer_load / 3600:.1f} h of it loading experts)")  # fmt: skip
    gptq_h = 60 * 384 * m["gptq_expert_s"] / 3600
    print(
        f"  GPTQ int4-g32 of one routed expert (gate, up, down; Hessians from {m['gptq_rows']} routed rows): "
        f"{m['gptq_expert_s']:.1f} s; for K2's 23040 routed experts: {gptq_h:.0f} h on these cores"
    )
    if a.json:
        rates = {
            "tokens_per_s": tps,
            "compute_tokens_per_s": tps_compute,
            "k2_estimate_hours_131k": est_131k,
            "k2_gptq_hours": gptq_h,
        }
        Path(a.json).write_text(json.dumps({**m, **rates}, indent=2))


if __name__ == "__main__":
    main()
