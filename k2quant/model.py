"""The Kimi K2 / DeepSeek-V3 forward pass, written once.

It serves calibration (layer-streamed, with an observer on every linear's input),
accuracy diffs (layer-streamed), training mini-K2 (autograd through the same code) and
the runner (resident weights, KV cache). Weights come through `Weights`: the forward asks
for a logical tensor by its checkpoint name and gets a float tensor on the compute device;
where it came from (BF16, FP8 block, INT4, GGUF, GPU cache or a memory map) is the
source's business. `Weights.linear` is the one place a source may substitute a
quantized kernel; `RoutedExperts.submit` (the model's `routed` seam) is where a source runs
a MoE layer's routed experts elsewhere (another device, a thread pool) and hands back a
pending result, so the shared expert runs meanwhile.

Attention has two exact forms: expanded (kv_b_proj applied to every cached latent: cheap
for prefill) and absorbed (q_nope taken through W_kb into the latent space, attention over
the cached latents and rope keys, the output through W_vb: what decode uses, since its
cost does not grow with the cache beyond the attention itself). `MLACache` is allocated
once for a maximum length and written in place; RoPE tables are built once per device.

Semantics follow transformers' DeepseekV3 (which matches DeepSeek's reference code):
YaRN with mscale on the softmax scale, sigmoid noaux_tc routing where the correction bias
only selects, group-limited top-k, interleaved RoPE pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .config import K2Config, RopeConfig

LinearObserver = Callable[[str, torch.Tensor], None]
RouteObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]  # (expert id, rows [n, H]) -> that expert's MLP output


class Pending(Protocol):
    """A result being computed elsewhere (concurrent.futures.Future has this shape)."""

    def result(self) -> torch.Tensor: ...


@dataclass
class Done:
    """A result computed already."""

    value: torch.Tensor

    def result(self) -> torch.Tensor:
        return self.value


class RoutedExperts:
    """The routed-experts seam of a MoE layer: out[n] = sum_k weights[n, k] * expert(ids[n, k], x[n]).

    `submit` gets the flattened tokens x [N, H], the router's scores [N, E], chosen ids and
    weights [N, k], and `expert`, the model's own MLP for one expert (through `linear`, so
    observers see its inputs). This default computes now, one expert at a time in id order;
    a runner returns its own pending result (hot experts on the GPU, cold ones on CPU threads)
    and calibration its own (extra tokens per expert, a callback when an expert is done)."""

    def submit(self, layer: int, x: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               expert: ExpertFn) -> Pending:  # fmt: skip
        out = torch.zeros_like(x)
        for e in sorted(torch.unique(ids).tolist()):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(e, x[tok]) * weights[tok, slot, None].to(x.dtype))
        return Done(out)


# ---------------------------------------------------------------------------- weights
class HeadProducts(Protocol):
    """Absorbed attention's two products with kv_b_proj, per head (Weights.heads)."""

    def keys(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [b, H, t, nope] through W_kb: [b, H, t, L]."""
        ...

    def values(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat [b, H, t, L] back through W_vb: [b, H, t, v]."""
        ...


@dataclass
class DenseHeads:
    """W_kb [H, nope, L] and W_vb [H, v, L] as tensors: two batched matmuls."""

    w_kb: torch.Tensor
    w_vb: torch.Tensor

    def keys(self, q_nope: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q_nope, self.w_kb)

    def values(self, o_lat: torch.Tensor) -> torch.Tensor:
        return torch.matmul(o_lat, self.w_vb.transpose(1, 2))


class Weights:
    """Where the forward gets its weights: `get(name)` -> float tensor on device.

    With cache=True each tensor is fetched once and kept (resident use); with cache=False
    every call fetches again and nothing outlives its use (layer streaming), so memory is
    bounded by the largest tensor in flight. `cache` may also be a predicate on the name
    (calibration keeps a layer's attention and dense weights, never the routed experts),
    and `release(prefix)` drops what was kept.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache: bool | Callable[[str], bool] = False,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache = cache
        self._cached: dict[str, torch.Tensor] = {}

    def release(self, prefix: str = "") -> None:
        for name in [n for n in self._cached if n.startswith(prefix)]:
            del self._cached[name]

    def fetch(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        t = self._cached.get(name)
        if t is None:
            t = self.fetch(name)
            if t.device != self.device or (t.is_floating_point() and t.dtype != self.dtype):
                t = t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
            if self.cache is True or (callable(self.cache) and self.cache(name)):
                self._cached[name] = t
        return t

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T for the linear module `name` (without the `.weight` suffix)."""
        return F.linear(x, self.get(name + ".weight"))

    def embedding(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the embedding table `name`."""
        return F.embedding(ids, self.get(name))

    def heads(self, name: str, heads: int, nope: int, dtype: torch.dtype) -> HeadProducts:
        """kv_b_proj `name` as absorbed attention multiplies by it, per head, in `dtype`: the whole
        weight read once (get) and split into W_kb / W_vb views (cast, a transient, where dtype differs)."""
        kv_b = self.get(name + ".weight")
        kv_b = kv_b.view(heads, -1, kv_b.shape[-1])
        return DenseHeads(kv_b[:, :nope].to(dtype), kv_b[:, nope:].to(dtype))


class DictWeights(Weights):
    """Weights held in a dict of tensors (tests, training: the tensors may require grad)."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        super().__init__(device, dtype, cache=False)
        self.tensors = tensors

    def fetch(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class CheckpointWeights(Weights):
    """Weights dequantized on demand from an opened checkpoint (see checkpoint.py)."""

    def __init__(
        self,
        checkpoint,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache: bool | Callable[[str], bool] = False,
    ):
        super().__init__(device, dtype, cache)
        self.checkpoint = checkpoint

    def fetch(self, name: str) -> torch.Tensor:
        return self.checkpoint.tensor(name, torch.float32)


# ---------------------------------------------------------------------------- RoPE
def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies for a `dim`-wide rotary part; YaRN blends interpolation and extrapolation."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.type != "yarn":
        return 1.0 / pos_freqs
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_cos_sin(cfg: K2Config, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, rope_dim/2] for integer positions, scaled by YaRN's attention factor."""
    inv_freq = rope_inv_freq(cfg.rope, cfg.qk_rope_head_dim).to(device)
    freqs = positions.to(device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    scale = cfg.rope.cos_sin_scale
    return freqs.cos() * scale, freqs.sin() * scale


class RopeTable:
    """cos / sin for positions 0..n-1 on one device, built once and grown (doubling) when a
    position past the end is asked for; rows are gathered per forward, not recomputed per layer."""

    def __init__(self, cfg: K2Config):
        self.cfg = cfg
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last: tuple | None = None

    def __call__(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._last is not None and self._last[0] is positions and self._last[1] == device:
            return self._last[2]  # the layers of one forward share their positions: one gather per forward
        cos, sin = self.tables.get(device, (None, None))
        need = int(positions.max()) + 1 if positions.numel() else 1
        if cos is None or cos.shape[0] < need:
            n = max(need, 2 * cos.shape[0] if cos is not None else 4096)
            cos, sin = rope_cos_sin(self.cfg, torch.arange(n), device)
            self.tables[device] = (cos, sin)
        out = cos[positions.to(device)], sin[positions.to(device)]
        self._last = (positions, device, out)
        return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [..., T, d]. Interleaved: pairs (x0,x1),(x2,x3)... (DeepSeek's layout);
    the result is written de-interleaved, which leaves q.k unchanged since q and k get the same order."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------- cache
class MLACache:
    """KV cache of the compressed latents, allocated once for `max_tokens` and written in place:
    per layer the normed kv latent [B, S, kv_lora_rank] and the rotated shared key [B, S, rope_dim];
    576 values per token per layer for K2. The model writes a forward's tokens at positions
    length()..length()+T-1 in every layer, then `advance(T)`; `truncate(n)` rewinds (prefix reuse)."""

    def __init__(self, config: K2Config, max_tokens: int, batch: int = 1, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        n = config.num_hidden_layers
        self.max_tokens = max_tokens
        self.latent = torch.zeros(n, batch, max_tokens, config.kv_lora_rank, device=device, dtype=dtype)
        self.k_rot = torch.zeros(n, batch, max_tokens, config.qk_rope_head_dim, device=device, dtype=dtype)
        self._length = 0

    def length(self) -> int:
        return self._length

    def update(self, layer: int, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's latents and keys of `layer` (cast to the cache's dtype); views of everything
        cached so far, them included, in the cache's dtype (the absorbed form reads them as they are)."""
        start, t = self._length, latent.shape[1]
        if start + t > self.max_tokens:
            raise ValueError(f"KV cache full: {start} + {t} tokens > max_tokens {self.max_tokens}")
        self.latent[layer, :, start : start + t] = latent
        self.k_rot[layer, :, start : start + t] = k_rot
        return self.latent[layer, :, : start + t], self.k_rot[layer, :, : start + t]

    def advance(self, t: int) -> None:
        self._length += t

    def truncate(self, n: int) -> None:
        self._length = min(self._length, n)

    def nbytes(self) -> int:
        """Bytes allocated (the whole preallocated cache)."""
        return self.latent.nbytes + self.k_rot.nbytes


# ---------------------------------------------------------------------------- absorbed attention
# "auto" attention form: absorbed when at most this many new tokens attend to a cache holding earlier
# ones. bench/attention.py at K2's dimensions, 2 CPU threads, 1024 tokens cached: in bf16 (the
# runner's fast mode; its kv_b_proj GEMM is slow on an AVX2 CPU) absorbed wins at every t measured
# (t = 16: 0.33 vs 1.9 s, 64: 0.83 vs 2.0 s, 256: 3.1 vs 4.0 s); in float32 it wins at t = 16
# (0.21 vs 0.48 s), ties at t = 64 and loses from t = 128-256 (2.6 vs 1.9 s at 256). With nothing
# cached the two forms are within 10% at every t. 64: absorbed wherever it wins in either dtype.
ABSORBED_MAX_TOKENS = 64
SCORE_BLOCK = 1 << 21  # float32 scores per block of latent_attention (8 MiB): bounds its memory at any depth
CACHE_BLOCK = 4096  # at most this many cache rows per block (a float32 copy of one block stays under 10 MB)


def attention_dtype(device: torch.device, cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype absorbed attention multiplies in: float32 on the CPU, the cache's dtype elsewhere.

    On a CPU without native bf16 matmul (AVX2), torch's bf16 bmm runs far slower than casting a
    block of a bf16 cache (and W_kb / W_vb) to float32 and multiplying there: 9x at depth 4096, 24x
    at 16384 (bench/attention.py, its cache-dtype column), and some bf16 layouts (the W_vb product)
    erratically so, 1 to 500 ms a call. An exact-mode (float32) cache is read without a copy."""
    return torch.float32 if device.type == "cpu" else cache_dtype


def expanded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T * scale, masked) v, per head. torch's CPU SDPA runs its fused (flash) kernel,
    which never holds the [H, t, s] score matrix, only when q, k and v have one head dimension; K2's
    v (128) is narrower than q and k (192), which sent it down the math path: float32 scores, 1.6 GB
    for 512 new tokens over 4608 at K2's 64 heads, and 1.9x slower (bench/attention.py). So on the
    CPU v is padded with zeros to q's width and the padding dropped from the result: the same sums."""
    pad = q.shape[-1] - v.shape[-1]
    if q.device.type != "cpu" or pad <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), attn_mask=mask, scale=scale)
    return out[..., : v.shape[-1]]


def latent_attention(q_lat: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """MLA attention in the latent space over the cache as stored: o_lat [b, H, t, L] in q_lat's dtype.

    q_lat [b, H, t, L] (q_nope through W_kb) and q_rot [b, H, t, R], both already multiplied by
    the softmax scale; latent [b, s, L] and k_rot [b, s, R] (s >= 1), the cache's views in any dtype;
    mask [t, s] bool (True: attend) or None; every query must see key 0 (a causal mask does).
    o_lat = softmax(q_lat latent^T + q_rot k_rot^T) latent, per head.

    The heads are folded into the query rows ([b, H*t, .]), so each product is one bmm against
    the un-expanded cache: no concatenation, no per-head copy. The cache is read in blocks of
    rows, each cast to q_lat's dtype (a view when it already is that dtype, a block-sized copy
    otherwise), with an online softmax in float32 (running max and sum over the blocks), so
    memory is bounded by SCORE_BLOCK scores whatever the depth.
    """
    b, h, t, width = q_lat.shape
    s, rows = latent.shape[1], h * t
    dtype = q_lat.dtype
    ql, qr = q_lat.reshape(b, rows, width), q_rot.reshape(b, rows, q_rot.shape[-1])
    step = min(CACHE_BLOCK, max(256, SCORE_BLOCK // (b * rows)))  # at least 256 rows: few blocks at large t
    for a in range(0, s, step):
        lat = latent[:, a : a + step].to(dtype)
        rot = k_rot[:, a : a + step].to(dtype)
        scores = torch.baddbmm(torch.bmm(qr, rot.transpose(1, 2)), ql, lat.transpose(1, 2)).float()
        if mask is not None:
            blocked = scores.view(b, h, t, -1).masked_fill(~mask[:, a : a + step], float("-inf"))
            scores = blocked.view(b, rows, -1)
        if a == 0:  # running max, sum of exp(score - max) and sum of exp(score - max) * latent
            top = scores.amax(-1, keepdim=True)
            probs = (scores - top).exp_()
            total = probs.sum(-1, keepdim=True)
            acc = torch.bmm(probs.to(dtype), lat).float()
        else:  # a new max rescales what the earlier blocks summed
            new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
            probs = (scores - new_top).exp_()
            rescale = (top - new_top).exp_()
            total = total * rescale + probs.sum(-1, keepdim=True)
            acc = acc * rescale + torch.bmm(probs.to(dtype), lat).float()
            top = new_top
    return (acc / total).view(b, h, t, width).to(dtype)


# ---------------------------------------------------------------------------- forward
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)  # a float32 weight (the runner keeps norms f32) keeps x's dtype


def route(cfg: K2Config, x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor | None):
    """noaux_tc routing of tokens x [N, H]: (scores [N, E], top-k ids [N, k], weights [N, k]).

    Sigmoid scores; the correction bias is added for selection only; experts are first
    limited to the top `topk_group` groups by the sum of each group's best two scores.
    """
    logits = F.linear(x.to(torch.float32), gate_w.to(torch.float32))
    scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias.to(torch.float32)
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        n, e = choice.shape
        grouped = choice.view(n, cfg.n_group, e // cfg.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // cfg.n_group, dim=1), float("-inf"))
    ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return scores, ids, weights * cfg.routed_scaling_factor


class K2Model:
    """The K2 forward over a `Weights` source. `logits(ids)` runs layer by layer."""

    def __init__(self, config: K2Config, weights: Weights):
        self.config = config
        self.weights = weights
        self.checkpoint = getattr(weights, "checkpoint", None)  # the opened checkpoint, when there is one
        self.observer: LinearObserver | None = None  # sees every linear's input (calibration)
        self.route_observer: RouteObserver | None = None  # sees (layer, scores, ids, weights)
        self.routed: RoutedExperts = RoutedExperts()  # the routed-experts seam (a runner or calibration sets its own)
        # attention form: "auto" (absorbed when few new tokens attend to a cache, else expanded), or forced
        self.mla: str = "auto"
        self.rope = RopeTable(config)

    @property
    def device(self) -> torch.device:
        return self.weights.device

    # -- pieces
    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(name, x)
        return self.weights.linear(name, x)

    def mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        gate = self.linear(prefix + "gate_proj", x)
        up = self.linear(prefix + "up_proj", x)
        return self.linear(prefix + "down_proj", F.silu(gate) * up)

    def use_absorbed(self, t: int, s: int, cache: MLACache | None) -> bool:
        """Whether `t` new tokens attending to `s` keys take the absorbed form (self.mla decides;
        "auto": when a cache holds earlier tokens, s > t, and t <= ABSORBED_MAX_TOKENS)."""
        if self.mla == "auto":
            return cache is not None and s > t and t <= ABSORBED_MAX_TOKENS
        return self.mla == "absorbed"

    def absorbed_attention(self, p: str, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor,
                           k_rot: torch.Tensor, mask: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Absorbed MLA: (out [b, H, t, v] in q's dtype, o_lat [b, H, t, L], what attn_v_b sees).

        q_nope goes through W_kb per head into the latent space, attention runs over the cached
        latents and rope keys as stored (latent_attention), the result goes back through W_vb; all
        three products run in attention_dtype. The products with kv_b_proj are the weight source's
        (Weights.heads: by default the weight read whole and split into W_kb / W_vb views; the runner
        multiplies FP8 codes as stored)."""
        c = self.config
        core = attention_dtype(q_nope.device, latent.dtype)
        kv_b = self.weights.heads(p + "kv_b_proj", c.num_attention_heads, c.qk_nope_head_dim, core)
        q_lat = kv_b.keys(q_nope.to(core) * c.softmax_scale)  # [b, H, t, L]
        o_lat = latent_attention(q_lat, q_rot.to(core) * c.softmax_scale, latent, k_rot, mask)
        out = kv_b.values(o_lat).to(q_nope.dtype)  # [b, H, t, v]
        if self.observer is not None:
            self.observer(p + "attn_k_b", q_nope)
        return out, o_lat.to(q_nope.dtype)

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor, cache: MLACache | None) -> torch.Tensor:
        c, w = self.config, self.weights
        p = f"model.layers.{i}.self_attn."
        b, t, _ = x.shape
        h = c.num_attention_heads
        if c.q_lora_rank is not None:
            q_lat = rms_norm(self.linear(p + "q_a_proj", x), w.get(p + "q_a_layernorm.weight"), c.rms_norm_eps)
            q = self.linear(p + "q_b_proj", q_lat)
        else:
            q = self.linear(p + "q_proj", x)
        q = q.view(b, t, h, c.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        ckv = self.linear(p + "kv_a_proj_with_mqa", x)
        latent, k_rot = ckv.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = rms_norm(latent, w.get(p + "kv_a_layernorm.weight"), c.rms_norm_eps)
        cos, sin = self.rope(positions, x.device)
        q_rot = apply_rope(q_rot, cos, sin, c.rope_interleave)
        k_rot = apply_rope(k_rot, cos, sin, c.rope_interleave)
        if cache is not None:  # views of everything cached, in the cache's dtype
            latent, k_rot = cache.update(i, latent, k_rot)
        s = latent.shape[1]
        # every key up to the query's own position; a lone newest query sees all keys and needs no mask
        mask = None if t == 1 else torch.arange(s, device=x.device)[None, :] <= positions.to(x.device)[:, None]
        if self.use_absorbed(t, s, cache):
            out, o_lat = self.absorbed_attention(p, q_nope, q_rot, latent, k_rot, mask)
        else:
            latent, k_rot = latent.to(x.dtype), k_rot.to(x.dtype)
            kv = self.linear(p + "kv_b_proj", latent).view(b, s, h, -1).transpose(1, 2)
            if self.observer is not None:  # the input of llama.cpp's absorbed-MLA attn_k_b, per head [b, H, t, d]
                self.observer(p + "attn_k_b", q_nope)
            k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_rot[:, None].expand(-1, h, -1, -1)], dim=-1)
            qq = torch.cat([q_nope, q_rot], dim=-1)
            out = expanded_sdpa(qq, k, v, mask, c.softmax_scale)
            o_lat = None
            if self.observer is not None:
                lat = latent[:, None].expand(-1, h, -1, -1)
                o_lat = F.scaled_dot_product_attention(qq, k, lat, attn_mask=mask, scale=c.softmax_scale)
        if self.observer is not None:  # the input of attn_v_b: the attention output in latent space
            self.observer(p + "attn_v_b", o_lat)
        out = out.transpose(1, 2).reshape(b, t, h * c.v_head_dim)
        return self.linear(p + "o_proj", out)

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        c, w = self.config, self.weights
        p = f"model.layers.{i}.mlp."
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores, ids, weights = route(c, flat, w.get(p + "gate.weight"), w.get(p + "gate.e_score_correction_bias"))
        if self.route_observer is not None:
            self.route_observer(i, scores, ids, weights)
        pending = self.routed.submit(i, flat, scores, ids, weights, lambda e, rows: self.mlp(f"{p}experts.{e}.", rows))
        shared = self.mlp(p + "shared_experts.", x) if c.n_shared_experts else None  # runs while the experts do
        out = pending.result().view(shape)
        return out if shared is None else out + shared

    def layer(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: MLACache | None = None) -> torch.Tensor:
        return self.ffn_block(i, self.attention_block(i, h, positions, cache))

    def attention_block(
        self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: MLACache | None = None
    ) -> torch.Tensor:
        """h + attention(norm(h)): the first half of a decoder layer."""
        w = self.weights.get(f"model.layers.{i}.input_layernorm.weight")
        return h + self.attention(i, rms_norm(h, w, self.config.rms_norm_eps), positions, cache)

    def ffn_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h + mlp_or_moe(norm(h)): the second half; position-free, so any set of tokens can go at once."""
        c = self.config
        p = f"model.layers.{i}."
        x = rms_norm(h, self.weights.get(p + "post_attention_layernorm.weight"), c.rms_norm_eps)
        return h + (self.moe(i, x) if c.is_moe(i) else self.mlp(p + "mlp.", x))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weights.embedding("model.embed_tokens.weight", input_ids.to(self.device))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h, self.weights.get("model.norm.weight"), self.config.rms_norm_eps)
        name = "model.embed_tokens" if self.config.tie_word_embeddings else "lm_head"
        return self.linear(name, h)

    def forward(self, input_ids: torch.Tensor, cache: MLACache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] in the compute dtype; with a cache, positions continue after it."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        past = cache.length() if cache is not None else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=self.device)
        h = self.embed(input_ids)
        for i in range(self.config.num_hidden_layers):
            h = self.layer(i, h, positions, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.head(h)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, T, vocab] for LongTensor input_ids [B, T]."""
        return self.forward(torch.as_tensor(input_ids, dtype=torch.long)).to(torch.float32)


def open_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, resident: bool = False
) -> K2Model:
    """Open a K2 model directory for evaluation.

    resident=False streams: every weight is read and dequantized when the forward needs it
    and dropped after, so a model far larger than RAM can still be evaluated.
    """
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    return K2Model(ckpt.config, CheckpointWeights(ckpt, device, dtype, cache=resident))


@torch.no_grad()
def generate(model: K2Model, prompt: list[int], max_new_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding with the compressed-latent KV cache; returns the new token ids. The naive
    reference the runner's engine is tested against."""
    cache = MLACache(model.config, len(prompt) + max_new_tokens, device=model.device, dtype=model.weights.dtype)
    logits = model.forward(torch.tensor([prompt], dtype=torch.long), cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        logits = model.forward(torch.tensor([[nxt]], dtype=torch.long), cache)
    return out
