"""Benchmark: `k2quant run` against llama.cpp's llama-bench on the same weights, CPU only, and
against the memory-bandwidth bound.

A synthetic FP8 checkpoint at Kimi K2's dimensions (hidden 7168, expert width 2048, K2's
MLA shapes, one dense layer and `--moe-layers` MoE layers of `--experts` experts, top-8;
vocabulary 16384), its router skewed the way real MoE routing is: per MoE layer a fixed
half of the experts gets a correction bias that makes it take about 70% of the routed
(token, expert) pairs (measured on random hidden states and printed). From that one
source:

  * k2quant: `convert --preset k2-int4` with INT4 g32 routed experts (4.5 bits per weight),
    attention, shared expert and dense MLP FP8 as released (8 bits + a float32 scale per
    128x128 block), run by the runner's fast path (torch int4pack for the experts, k2quant's
    FP8 matvec from the codes for the rest); and, for comparison, the same with attention,
    shared expert and dense MLP in BF16 (`k2-int4:self_attn.|shared_experts.|layers.0.mlp.=bf16`:
    torch's bf16 F.linear), the only fast CPU form before the FP8 kernel;
  * llama.cpp: `convert --to gguf` with experts Q4_0 (4.5 bits per weight) and the rest
    Q8_0, run by llama-bench built from the installed llama-cpp-python's llama.cpp source,
    with its extra (repacked) buffer types on (its default; this machine has no AMX, where
    they abort) and off (`--repack 0`); the faster is the one compared against.

Same threads for both; tokens/s of 512-token prefill and of 128-token decode at context
depth 0 and `--depth`; decode against the bound (bytes read per token / the runner's
measured RAM read bandwidth); k2quant's peak RSS against the packed bytes it holds.

Usage: python bench/run.py [--dir /tmp/k2bench-run] [--experts 64] [--moe-layers 2] [--threads 2]
                           [--depth 4096] [--llama-dir /tmp/k2bench-imatrix/llama.cpp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from convert import make  # noqa: E402  (bench/convert.py)
from llamacpp import llama_tool  # noqa: E402

from k2quant import open_checkpoint  # noqa: E402
from k2quant.convert import convert  # noqa: E402
from k2quant.convert_gguf import convert_gguf  # noqa: E402
from k2quant.manifest import MANIFEST  # noqa: E402
from k2quant.model import route  # noqa: E402
from k2quant.recipe import build_recipe  # noqa: E402
from k2quant.runner.bandwidth import read_bandwidth  # noqa: E402

K2QUANT = r"""
import json, sys, random
from k2quant.runner.engine import Sampling
from k2quant.runner.runner import Runner, RunOptions
model, threads, depth, bw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
r = Runner(model, RunOptions(device="cpu", threads=threads, ctx=depth + 512 + 256, ram_bandwidth=bw), progress=False)
rng = random.Random(0)
ids = lambda n: [rng.randrange(1, 16000) for _ in range(n)]
out = {}
greedy = lambda n: Sampling(temperature=0, max_tokens=n)
list(r.generate(ids(512), greedy(1)))                      # pp512 at depth 0
out["pp512"] = r.engine.stats.prefill_tps
list(r.generate(ids(1), greedy(129)))                      # tg128 at depth 0 (128 timed forwards)
out["tg128"] = r.engine.stats.decode_tps
rep = r.report()
out["bytes_per_token"] = rep["bytes_per_token"]["cpu"]
out["packed_cpu_bytes"], out["kv_cache_bytes"] = rep["packed_cpu_bytes"], rep["kv_cache_bytes"]
list(r.generate(ids(depth), greedy(129)))                  # depth: prefill `depth` tokens, then tg128
out["tg128_at_depth"] = r.engine.stats.decode_tps
out["prefill_at_depth"] = r.engine.stats.prefill_tps
r.engine.cache.truncate(depth)                             # pp512 after `depth` tokens
r.engine.tokens = r.engine.tokens[:depth]
list(r.generate(r.engine.tokens + ids(512), greedy(1)))
out["pp512_at_depth"] = r.engine.stats.prefill_tps
out["peak_rss"] = r.report()["peak_rss"]
print(json.dumps(out))
"""


def skew_router(src: Path, share: float = 0.7) -> dict[int, float]:
    """Give a fixed half of each MoE layer's experts a correction bias so that they take about
    `share` of the routed pairs on random hidden states; written into the shard in place."""
    ck = open_checkpoint(src)
    cfg = ck.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, cfg.hidden_size, generator=g)
    measured = {}
    for layer in range(cfg.num_hidden_layers):
        if not cfg.is_moe(layer):
            continue
        name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        gate = ck.tensor(f"model.layers.{layer}.mlp.gate.weight")
        hot = torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.n_routed_experts // 2]
        best = None
        for delta in np.linspace(0, 0.2, 81):
            bias = torch.zeros(cfg.n_routed_experts)
            bias[hot] = float(delta)
            _, ids, _ = route(cfg, x, gate, bias)
            got = torch.isin(ids, hot).float().mean().item()
            if best is None or abs(got - share) < abs(best[1] - share):
                best = (bias, got)
        info = ck.info(name).parts[next(iter(ck.info(name).parts))]
        with open(info.file, "r+b") as f:  # same dtype and size: patch the bytes in place
            f.seek(info.start)
            f.write(best[0].to(info.dtype).numpy().tobytes())
        measured[layer] = best[1]
    return measured


def llama_bench(exe: Path, gguf: Path, threads: int, depth: int, repack: bool) -> dict:
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-d", f"0,{depth}", "-r", "1",
           "-o", "json"] + ([] if repack else ["--repack", "0"])  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama-bench failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    out = {}
    for rec in json.loads(r.stdout):
        kind = "pp512" if rec["n_prompt"] else "tg128"
        out[kind + ("_at_depth" if rec.get("n_depth") else "")] = rec["avg_ts"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/k2bench-run")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--moe-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--llama-dir", default="/tmp/k2bench-imatrix/llama.cpp", help="where llama.cpp is built")
    ap.add_argument("--json")
    ap.add_argument("--llama-from", help="take llama-bench's numbers from this earlier --json output (same weights, "
                    "same machine) instead of running it again: saves ~15 minutes; printed as reused")  # fmt: skip
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    src = make(root, a.moe_layers, a.experts)
    marker = src / "skewed.json"
    if not marker.exists():
        marker.write_text(json.dumps(skew_router(src)))
    skew = json.loads(marker.read_text())
    print(f"source {src}: {a.moe_layers} MoE layers x {a.experts} experts at K2 dimensions; hot half of the experts "
          f"takes {', '.join(f'{100 * v:.0f}%' for v in skew.values())} of the routed pairs", flush=True)  # fmt: skip
    bf16 = r"self_attn\.|shared_experts\.|layers\.0\.mlp\.=bf16"
    variants = {"FP8 as released": ("k2quant-int4-fp8", []), "attention BF16": ("k2quant-int4", [bf16])}
    for out, overrides in variants.values():
        if not (root / out / MANIFEST).exists():  # an output without its manifest is unfinished: made again
            shutil.rmtree(root / out, ignore_errors=True)
            convert(src, root / out, build_recipe("k2-int4", overrides=overrides), method="rtn", progress=False)
    gdir = root / "llama-gguf"
    if not (gdir / MANIFEST).exists():
        shutil.rmtree(gdir, ignore_errors=True)
        convert_gguf(src, gdir, build_recipe("q8_0", overrides=["exps=q4_0"], target="gguf"), method="rtn",
                     workers=a.threads, progress=False, name="bench")  # fmt: skip
    gguf = gdir / "bench.gguf"
    bw, _ = read_bandwidth(a.threads)
    gck = open_checkpoint(gguf)
    c = gck.config
    expert_b = sum(
        gck.info(f"model.layers.1.mlp.experts.0.{m}.weight").stored_bytes for m in ("gate_proj", "up_proj", "down_proj")
    )
    dense_b = sum(gck.info(n).stored_bytes for n in gck.names() if ".mlp.experts." not in n and "embed" not in n)
    emb_b = gck.info("model.embed_tokens.weight").stored_bytes / c.vocab_size
    llama_bpt = dense_b + emb_b + a.moe_layers * c.num_experts_per_tok * expert_b
    print(f"RAM read bandwidth {bw / 1e9:.1f} GB/s ({a.threads} threads, the runner's method)", flush=True)
    ks = {}
    for name, (out, _) in variants.items():
        r = subprocess.run([sys.executable, "-c", K2QUANT, str(root / out), str(a.threads), str(a.depth), str(bw)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode:
            raise SystemExit(f"k2quant run ({name}) failed:\n{r.stderr[-3000:]}")
        ks[name] = json.loads(r.stdout.splitlines()[-1])
    if a.llama_from:
        lr = json.loads(Path(a.llama_from).read_text())["llama.cpp"]
        print(f"llama.cpp: numbers reused from {a.llama_from} (an earlier run of this bench), not measured now")
    else:
        exe = llama_tool("llama-bench", Path(a.llama_dir))
        lr = {"repack on": llama_bench(exe, gguf, a.threads, a.depth, True),
              "repack off (--repack 0)": llama_bench(exe, gguf, a.threads, a.depth, False)}  # fmt: skip
    best = max(lr, key=lambda n: lr[n]["tg128"])
    lb = lr[best]
    print(f"\n{a.threads} threads, CPU only; llama.cpp's faster configuration: {best}; tokens/s (ratio to llama.cpp)")
    print(f"{'':28}" + "".join(f"{'k2quant, ' + n:>30}" for n in ks) + f"{'llama.cpp':>12}")
    for key, label in (("pp512", "prefill 512, depth 0"), ("tg128", "decode 128, depth 0"),
                       ("pp512_at_depth", f"prefill 512, depth {a.depth}"),
                       ("tg128_at_depth", f"decode 128, depth {a.depth}")):  # fmt: skip
        cells = "".join(f"{f'{k[key]:.2f} ({k[key] / lb[key]:.2f}x)':>30}" for k in ks.values())
        print(f"{label:<28}{cells}{lb[key]:>12.2f}")
    for name, res in lr.items():
        print(f"  llama.cpp {name}: " + ", ".join(f"{key} {v:.2f}" for key, v in res.items()))
    print(f"decode vs the bandwidth bound ({bw / 1e9:.1f} GB/s), bytes read per decoded token:")
    for name, k in ks.items():
        kb = k["bytes_per_token"]
        print(f"  k2quant, {name}: {kb / 1e9:.3f} GB, {k['tg128'] * kb / bw:.2f} of the bound")
    print(f"  llama.cpp: {llama_bpt / 1e9:.3f} GB, {lb['tg128'] * llama_bpt / bw:.2f} of the bound")
    for name, k in ks.items():
        print(f"k2quant, {name}: peak RSS {k['peak_rss'] / 1e9:.2f} GB for {k['packed_cpu_bytes'] / 1e9:.2f} GB packed"
              f" + {k['kv_cache_bytes'] / 1e9:.3f} GB KV cache ({k['peak_rss'] / k['packed_cpu_bytes']:.2f}x the "
              "packed bytes)")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"k2quant": ks, "llama.cpp": lr, "bandwidth": bw, "skew": skew,
                                            "llama_bytes_per_token": llama_bpt}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
