"""Benchmark: one layer's MLA attention at Kimi K2's dimensions, the absorbed form before and after
issue 13, and the crossover between the absorbed and expanded forms that "auto" uses.

One attention layer (hidden 7168, 64 heads, q_lora_rank 1536, kv_lora_rank 512, qk_rope 64,
qk_nope 128, v_head 128) with random weights and an `MLACache` in bf16, as the runner's fast mode
holds them (`--dtype f32`: exact mode), `--threads` torch threads; `K2Model.attention` is timed
whole (projections included), best of a few calls (the machine may be shared: the load average
is printed, and another process on these cores slows every parallel op):

  * decode (one new token) at KV depths `--depths`: the old absorbed form (reimplemented below,
    only here: the cache views cast to the compute dtype, [latent, k_rot] concatenated and both
    expanded over the 64 heads for SDPA; its rule sent depth 0 to the expanded form), the new one
    (latent_attention: heads folded into the query rows, two bmm's over the un-expanded cache, in
    float32 on the CPU), and the new one with its products in the cache's dtype (the cache read
    as stored, the query side cast instead); ms per layer, the tokens/s that attention alone
    would allow over K2's 61 layers, the bytes of cache one step reads per layer and the time
    they take at the measured read bandwidth (runner/bandwidth.py);
  * absorbed against expanded for chunks of t new tokens after `past` cached ones (t and past
    from `--chunks`, `--pasts`): where "auto" should switch (model.ABSORBED_MAX_TOKENS);
  * what `RunnerWeights.get` pays per step for kv_b_proj: nothing for a bf16 one in bf16 (held as
    stored), a decode per call for a packed one (FP8 block, INT4 g32; the runner's StoredHeads multiply
    an FP8 one from its codes instead, bench/matvec.py);
  * prefill's expanded attention core, 512 new tokens after 0 and 4096 cached: torch's CPU SDPA
    with K2's v narrower than q and k (its math path, float32 scores held whole) against
    model.expanded_sdpa (v padded to q's width: its fused kernel).

Usage: python bench/attention.py [--threads 2] [--depths 0,1024,4096,16384] [--chunks 16,64,256]
                                 [--pasts 0,1024] [--dtype bf16|f32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from k2quant import model as k2model
from k2quant.checkpoint import StoredWeight
from k2quant.config import K2Config
from k2quant.model import DictWeights, K2Model, MLACache, latent_attention
from k2quant.quant.forms import form
from k2quant.quant.schemes import parse_scheme
from k2quant.runner.bandwidth import read_bandwidth
from k2quant.synthetic import k2_config_dict, random_tensor

LAYERS = 61  # Kimi K2's decoder layers
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}  # the runner's fast mode / exact mode


class OldAbsorbed(K2Model):
    """The absorbed form as it was before issue 13 (kept here only, to measure against)."""

    def use_absorbed(self, t: int, s: int, cache: MLACache | None) -> bool:
        return self.mla == "absorbed" or (self.mla == "auto" and cache is not None and t <= 4 and s > t)

    def absorbed_attention(self, p, q_nope, q_rot, latent, k_rot, mask):
        c = self.config
        h = c.num_attention_heads
        latent, k_rot = latent.to(q_nope.dtype), k_rot.to(q_nope.dtype)
        kv_b = self.weights.get(p + "kv_b_proj.weight").view(h, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_kb, w_vb = kv_b.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        q_lat = torch.matmul(q_nope, w_kb)
        keys = torch.cat([latent, k_rot], dim=-1)[:, None]
        o_lat = F.scaled_dot_product_attention(torch.cat([q_lat, q_rot], dim=-1), keys.expand(-1, h, -1, -1),
                                               latent[:, None].expand(-1, h, -1, -1), attn_mask=mask,
                                               scale=c.softmax_scale)  # fmt: skip
        return torch.matmul(o_lat, w_vb.transpose(1, 2)), o_lat


class CacheDtypeAbsorbed(K2Model):
    """The new absorbed form with its products in the cache's dtype instead of attention_dtype's
    float32 (the same thing for a float32 cache)."""

    def absorbed_attention(self, p, q_nope, q_rot, latent, k_rot, mask):
        c = self.config
        h = c.num_attention_heads
        kv_b = self.weights.get(p + "kv_b_proj.weight").view(h, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_kb, w_vb = kv_b.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        q_lat = torch.matmul(q_nope.to(latent.dtype) * c.softmax_scale, w_kb.to(latent.dtype))
        q_rot = q_rot.to(latent.dtype) * c.softmax_scale
        o_lat = latent_attention(q_lat, q_rot, latent, k_rot, mask).to(q_nope.dtype)
        return torch.matmul(o_lat, w_vb.transpose(1, 2)), o_lat


def attention_weights(cfg: K2Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer 0's attention tensors, random (synthetic.random_tensor), in `dtype`."""
    c, p = cfg, "model.layers.0."
    shapes = {
        p + "input_layernorm.weight": (c.hidden_size,),
        p + "self_attn.q_a_proj.weight": (c.q_lora_rank, c.hidden_size),
        p + "self_attn.q_a_layernorm.weight": (c.q_lora_rank,),
        p + "self_attn.q_b_proj.weight": (c.num_attention_heads * c.qk_head_dim, c.q_lora_rank),
        p + "self_attn.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size),
        p + "self_attn.kv_a_layernorm.weight": (c.kv_lora_rank,),
        p + "self_attn.kv_b_proj.weight": (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                           c.kv_lora_rank),
        p + "self_attn.o_proj.weight": (c.hidden_size, c.num_attention_heads * c.v_head_dim),
    }  # fmt: skip
    return {name: random_tensor(name, shape).to(dtype) for name, shape in shapes.items()}


def best_ms(fn: Callable[[], object], reps: int, warm: bool = True) -> float:
    """Best wall time of `reps` calls (after one warm-up call when `warm`), in ms."""
    if warm:
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def attention_call(model: K2Model, cache: MLACache, past: int, t: int) -> Callable[[], torch.Tensor]:
    """One attention call of t new tokens after `past` cached ones (the cache is rewound each call)."""
    x = torch.randn(1, t, model.config.hidden_size, generator=torch.Generator().manual_seed(t)).to(model.weights.dtype)
    positions = torch.arange(past, past + t)

    def run() -> torch.Tensor:
        cache.truncate(0)
        cache.advance(past)
        with torch.no_grad():
            return model.attention(0, x, positions, cache)

    return run


def decode_rows(cfg: K2Config, weights: DictWeights, cache: MLACache, depths: list[int], bw: float) -> list[dict]:
    old, new, as_cache = OldAbsorbed(cfg, weights), K2Model(cfg, weights), CacheDtypeAbsorbed(cfg, weights)
    as_cache.mla = "absorbed"
    row_bytes = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cache.latent.element_size()
    rows = []
    print(f"\ndecode, one layer's attention (projections included), {weights.dtype} weights and cache, "
          f"{torch.get_num_threads()} threads; tok/s: 1000 / (ms x {LAYERS} layers)")  # fmt: skip
    print(f"{'depth':>6} {'old ms':>9} {'new ms':>8} {'speedup':>8} {'old tok/s':>10} {'new tok/s':>10} "
          f"{'cache-dtype ms':>15} {'cache MB':>9} {'at bw ms':>9}")  # fmt: skip
    for d in depths:
        slow = d >= 4096  # the old form takes seconds there: fewer calls
        r = {"depth": d}
        r["old_ms"] = best_ms(attention_call(old, cache, d, 1), 1 if slow else 3, warm=not slow)
        r["new_ms"] = best_ms(attention_call(new, cache, d, 1), 5)
        r["cache_dtype_ms"] = best_ms(attention_call(as_cache, cache, d, 1), 1 if slow else 3, warm=not slow)
        r["cache_bytes"] = (d + 1) * row_bytes
        r["bandwidth_ms"] = r["cache_bytes"] / bw * 1e3
        rows.append(r)
        print(f"{d:>6} {r['old_ms']:>9.1f} {r['new_ms']:>8.2f} {r['old_ms'] / r['new_ms']:>7.1f}x "
              f"{1e3 / (r['old_ms'] * LAYERS):>10.2f} {1e3 / (r['new_ms'] * LAYERS):>10.2f} "
              f"{r['cache_dtype_ms']:>15.1f} {r['cache_bytes'] / 1e6:>9.2f} {r['bandwidth_ms']:>9.3f}",
              flush=True)  # fmt: skip
    return rows


def crossover_rows(cfg: K2Config, weights: DictWeights, cache: MLACache, chunks: list[int],
                   pasts: list[int]) -> list[dict]:  # fmt: skip
    absorbed, expanded = K2Model(cfg, weights), K2Model(cfg, weights)
    absorbed.mla, expanded.mla = "absorbed", "expanded"
    rows = []
    print(f"\nchunks of t new tokens after `past` cached ones: absorbed against expanded "
          f"(auto: absorbed for t <= {k2model.ABSORBED_MAX_TOKENS})")  # fmt: skip
    print(f"{'t':>5} {'past':>6} {'absorbed ms':>12} {'expanded ms':>12} {'faster':>9}")
    for t in chunks:
        for past in pasts:
            r = {"t": t, "past": past}
            r["absorbed_ms"] = best_ms(attention_call(absorbed, cache, past, t), 1, warm=False)
            r["expanded_ms"] = best_ms(attention_call(expanded, cache, past, t), 1, warm=False)
            rows.append(r)
            win = "absorbed" if r["absorbed_ms"] < r["expanded_ms"] else "expanded"
            print(f"{t:>5} {past:>6} {r['absorbed_ms']:>12.1f} {r['expanded_ms']:>12.1f} {win:>9}", flush=True)
    return rows


def kv_b_decode_rows(cfg: K2Config, dtype: torch.dtype) -> list[dict]:
    """ms per layer-step that RunnerWeights.get spends decoding kv_b_proj stored packed (fast mode)."""
    shape = (cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    w = random_tensor("kv_b", shape)
    rows = []
    print("\nkv_b_proj read whole per step by RunnerWeights.get (decoded per call when packed):")
    for scheme in ("bf16", "fp8-block", "int4-g32"):
        s = parse_scheme(scheme)
        st = StoredWeight("kv_b", s.form, shape, s.quantize(w, search=False), (128, 128) if s.kind == "fp8" else None)
        if st.format == "dense":  # RunnerWeights.fetch: the stored tensor, converted only if the dtype differs
            ms = best_ms(lambda st=st: st.parts["weight"].to(dtype), 3)
        else:
            ms = best_ms(lambda st=st: form(st.format).dequantize(st.parts, st.shape, st.block).to(dtype), 3)
        rows.append({"scheme": scheme, "get_ms": ms})
        print(f"  {scheme} -> {dtype}: {ms:.2f} ms per layer-step ({ms * LAYERS / 1e3:.2f} s per token over "
              f"{LAYERS} layers)")  # fmt: skip
    return rows


def sdpa_rows(cfg: K2Config, dtype: torch.dtype, t: int, pasts: list[int]) -> list[dict]:
    """Prefill's expanded attention core at K2's head dims: torch's CPU SDPA with v 128 wide (its math
    path: float32 scores [H, t, s] held whole) against model.expanded_sdpa (v padded to 192: its fused
    kernel, no score matrix); ms per layer and the largest difference."""
    h, qk, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    g = torch.Generator().manual_seed(1)
    rows = []
    print(f"\nexpanded attention core, {t} new tokens over `past` cached ones ({h} heads, qk {qk}, v {v}):")
    print(f"{'past':>6} {'math path ms':>13} {'scores MB':>10} {'padded v ms':>12} {'speedup':>8} {'max diff':>9}")
    for past in pasts:
        s = past + t
        q = torch.randn(1, h, t, qk, generator=g).to(dtype)
        k, vv = torch.randn(1, h, s, qk, generator=g).to(dtype), torch.randn(1, h, s, v, generator=g).to(dtype)
        mask = torch.arange(s)[None, :] <= torch.arange(past, s)[:, None]
        ref = F.scaled_dot_product_attention(q, k, vv, attn_mask=mask, scale=cfg.softmax_scale)
        diff = (k2model.expanded_sdpa(q, k, vv, mask, cfg.softmax_scale) - ref).abs().max().item()
        r = {"past": past, "t": t, "scores_bytes": 4 * h * t * s, "max_diff": diff}
        r["math_ms"] = best_ms(lambda: F.scaled_dot_product_attention(q, k, vv, attn_mask=mask,  # noqa: B023
                                                                       scale=cfg.softmax_scale), 2)  # fmt: skip
        r["padded_ms"] = best_ms(lambda: k2model.expanded_sdpa(q, k, vv, mask, cfg.softmax_scale), 2)  # noqa: B023
        rows.append(r)
        print(f"{past:>6} {r['math_ms']:>13.0f} {r['scores_bytes'] / 1e6:>10.0f} {r['padded_ms']:>12.0f} "
              f"{r['math_ms'] / r['padded_ms']:>7.2f}x {diff:>9.2e}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="0,1024,4096,16384")
    ap.add_argument("--chunks", default="16,64,256", help="t of the crossover grid ('' to skip it)")
    ap.add_argument("--pasts", default="0,1024", help="cached tokens before each chunk of the crossover grid")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights, activations and cache")
    ap.add_argument("--json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)
    depths = [int(v) for v in a.depths.split(",") if v]
    chunks = [int(v) for v in a.chunks.split(",") if v]
    pasts = [int(v) for v in a.pasts.split(",") if v]
    cfg = K2Config.from_dict(k2_config_dict(num_hidden_layers=1))
    dtype = DTYPES[a.dtype]
    weights = DictWeights(attention_weights(cfg, dtype), dtype=dtype)
    longest = max(depths + [p + t for p in pasts for t in chunks]) + 1
    cache = MLACache(cfg, longest, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    cache.latent.copy_(torch.randn(cache.latent.shape, generator=g))  # rms-normed latents: about unit scale
    cache.k_rot.copy_(torch.randn(cache.k_rot.shape, generator=g))
    bw, cached = read_bandwidth(a.threads)
    print(
        f"read bandwidth {bw / 1e9:.1f} GB/s ({a.threads} threads, {'cached' if cached else 'measured now'}); "
        f"load average {os.getloadavg()[0]:.2f} (other processes on these cores slow every parallel op)"
    )
    out = {"threads": a.threads, "dtype": a.dtype, "bandwidth": bw}
    out["decode"] = decode_rows(cfg, weights, cache, depths, bw)
    if chunks:
        out["crossover"] = crossover_rows(cfg, weights, cache, chunks, pasts)
    out["kv_b_decode"] = kv_b_decode_rows(cfg, dtype)
    out["expanded_sdpa"] = sdpa_rows(cfg, dtype, 512, [0, 4096])
    out["seconds"] = time.perf_counter() - t0
    out["load_average_end"] = os.getloadavg()[0]
    print(f"\n{out['seconds']:.0f} s; load average {out['load_average_end']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
