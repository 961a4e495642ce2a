"""llama.cpp's tensor types (GGML): encoders and decoders.

Block layouts are ggml-common.h's byte for byte, so gguf-py and llama.cpp read what
`quantize` writes, and `dequantize` (torch) returns exactly the floats gguf-py's dequantize
does (same float32 operations). The k-quants (Q2_K..Q6_K) and the i-quants are encoded by
compiled kernels (kquant_kernel.py, iq*_kernel.py): llama.cpp's procedures step for step in
float32, so search=False is llama-quantize's bytes, then k2quant's search. The 32-weight
blocks (Q4_0, Q5_0, Q4_1, Q5_1, Q8_0: row fallbacks and the q4_0 preset) are vectorized torch
here, following ggml-quants.c: the symmetric make_qx fit (Q4_0, Q5_0), the asymmetric
min/scale fit of make_qkx3 (Q4_1, Q5_1) and the importance weights llama-quantize applies
(qw * sqrt(sigma2 + x^2)). llama.cpp runs one procedure without an imatrix (its reference
path) and another with one; with search=True k2quant runs both and keeps, per block, the one
with the lower error (weighted by the importance when there is one), then tries the scales
nudged, so it is not worse than either. Everything is requantized against the stored fp16
scales, as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import iq_grid
from .iq1_kernel import encode_iq1
from .iq2_kernel import encode_iq2
from .iq3_kernel import encode_iq3
from .iq4_kernel import IQ4_LEVELS, encode_iq4
from .kquant_kernel import KINDS as KQUANT_KINDS
from .kquant_kernel import encode_kquant

QK_K = 256
_TINY = 1e-15  # GROUP_MAX_EPS
_ELEMS_PER_CHUNK = 1 << 17  # bounds the (blocks x candidates x block) search tensors to ~20 MB each


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int  # GGMLQuantizationType value
    block: int  # weights per block
    nbytes: int  # bytes per block

    def row_bytes(self, ncols: int) -> int:
        return ncols // self.block * self.nbytes

    @property
    def quantized(self) -> bool:
        return self.name not in ("F32", "F16", "BF16")


TYPES = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("BF16", 30, 1, 2),
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q2_K", 10, QK_K, 84),
        GGMLType("Q3_K", 11, QK_K, 110),
        GGMLType("Q4_K", 12, QK_K, 144),
        GGMLType("Q5_K", 13, QK_K, 176),
        GGMLType("Q6_K", 14, QK_K, 210),
        GGMLType("IQ4_NL", 20, 32, 18),
        GGMLType("IQ4_XS", 23, QK_K, 136),
        GGMLType("IQ2_XXS", 16, QK_K, 66),
        GGMLType("IQ2_XS", 17, QK_K, 74),
        GGMLType("IQ2_S", 22, QK_K, 82),
        GGMLType("IQ3_XXS", 18, QK_K, 98),
        GGMLType("IQ3_S", 21, QK_K, 110),
        GGMLType("IQ1_S", 19, QK_K, 50),
        GGMLType("IQ1_M", 29, QK_K, 56),
    )
}
BY_ID = {t.id: t for t in TYPES.values()}
# llama-quantize's tensor_type_fallback: a row that is not a whole number of 256-blocks
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL",
            "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL",
            "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL"}  # fmt: skip
# llama-quantize refuses these without an importance matrix (tensor_requires_imatrix), except for
# token_embd and output, which it makes with the type's no-imatrix weights where ggml has them:
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ1_S", "IQ1_M")
ALWAYS_NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ1_S")  # ggml's encoder asserts an imatrix, token_embd and output too
IMATRIX_EXEMPT = ("token_embd.weight", "output.weight")


def ggml_type(name: str) -> GGMLType:
    t = TYPES.get(name.upper())
    if t is None:
        raise ValueError(f"unknown GGML type {name!r}; k2quant writes {', '.join(TYPES)}")
    return t


def fit_type(name: str, ncols: int) -> str:
    """The type llama-quantize would use for rows of `ncols` weights (its fallback chain, then F16)."""
    t = ggml_type(name)
    if ncols % t.block == 0:
        return t.name
    fb = FALLBACK.get(t.name)
    if fb and ncols % TYPES[fb].block == 0:
        return fb
    return "F16"


# ---------------------------------------------------------------------------- searches
def _rint(v: torch.Tensor) -> torch.Tensor:
    """nearest_int: round half to even, as ggml's float trick does."""
    return torch.round(v)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _fp16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).to(torch.float32)


def _fit_asym(x, w, nmax, rmin, rdelta, nstep, use_mad=False):
    """Per row of x (B, n): (scale, m) with x ~ scale * L - m, L in 0..nmax (make_qkx2/3_quants).

    Start from the plain min..max grid; each step stretches the grid over the current
    (max - min), solves the weighted least squares for scale and min, and keeps the result
    when its weighted error is lower. As in ggml, an accepted step moves the min that later
    steps start from, so the steps run in order (each one vectorized over the blocks)."""
    mn = x.amin(1, keepdim=True).clamp(max=0)
    mx = x.amax(1, keepdim=True)
    flat = (mx - mn) <= 0
    one = torch.ones_like(mn)

    def error(scale, m, L):
        d = scale * L + m - x
        return (w * (d.abs() if use_mad else d * d)).sum(1, keepdim=True)

    iscale = nmax / torch.where(flat, one, mx - mn)
    scale = 1 / iscale
    best = error(scale, mn, torch.clamp(_rint(iscale * (x - mn)), 0, nmax))
    sum_w = w.sum(1, keepdim=True)
    sum_x = (w * x).sum(1, keepdim=True)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / torch.where(flat, one, mx - mn)
        L = torch.clamp(_rint(iscale * (x - mn)), 0, nmax)
        wl = w * L
        sum_l = wl.sum(1, keepdim=True)
        sum_l2 = (wl * L).sum(1, keepdim=True)
        sum_xl = (wl * x).sum(1, keepdim=True)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, one), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = error(this_scale, this_min, L)
        take = ok & (err < best)
        best = torch.where(take, err, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale.squeeze(1), -mn.squeeze(1)


def _fit_sym(x, w, nmax):
    """Per row of x (B, n): (scale, L) with x ~ scale * L, L in -nmax..nmax-1 (make_qx_quants, weighted).

    Tries the grid through the largest |x| and 18 stretched ones; keeps the best least-squares fit."""
    amax, idx = x.abs().max(1)
    mx = x.gather(1, idx[:, None]).squeeze(1)
    zero = amax < _TINY
    mx = torch.where(zero, torch.ones_like(mx), mx)
    offs = torch.tensor([0.0] + [0.1 * i for i in range(-9, 10) if i])
    iscale = -(nmax + offs)[None, :] / mx[:, None]
    L = torch.clamp(_rint(iscale[:, :, None] * x[:, None, :]), -nmax, nmax - 1)
    sumlx = torch.einsum("bkn,bn->bk", L, w * x)
    suml2 = torch.einsum("bkn,bn->bk", L * L, w)
    ok = suml2 > 0
    score = sumlx * sumlx / torch.where(ok, suml2, torch.ones_like(suml2))
    score = torch.where(ok, score, torch.full_like(score, -float("inf")))
    score[:, 0] = torch.where(ok[:, 0], score[:, 0], torch.zeros_like(score[:, 0]))
    k = score.argmax(1, keepdim=True)
    lx = sumlx.gather(1, k).squeeze(1)
    l2 = suml2.gather(1, k).squeeze(1)
    scale = torch.where(l2 > 0, lx / torch.where(l2 > 0, l2, torch.ones_like(l2)), torch.zeros_like(lx))
    Lk = L.gather(1, k[:, :, None].expand(-1, 1, L.shape[2])).squeeze(1)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    Lk = torch.where(zero[:, None], torch.zeros_like(Lk), Lk)
    return scale, Lk


def _signed_max(v):
    """The element of each row with the largest magnitude (sign kept)."""
    idx = v.abs().argmax(1, keepdim=True)
    return v.gather(1, idx).squeeze(1)


def _pick(cands, x, mw):
    """Per block, the candidate (dict with 'deq' and its stored fields) with the lowest weighted error."""
    if len(cands) == 1:
        return cands[0]
    errs = torch.stack([(mw * (c["deq"] - x) ** 2).sum(1) for c in cands])  # (C, B)
    best = errs.argmin(0)
    out = {}
    for key in cands[0]:
        vals = torch.stack([c[key] for c in cands])  # (C, B, ...)
        idx = best.view(1, -1, *([1] * (vals.dim() - 2))).expand(1, *vals.shape[1:])
        out[key] = vals.gather(0, idx).squeeze(0)
    return out


_POLISH = (0.99, 0.995, 1.005, 1.01)


def _polish(c, x, mw, requant, keys):
    """Try the chosen block scales nudged by +-0.5% and +-1% (one key at a time), requantizing
    the weights against each; keep what lowers the block's error."""
    cands = [c]
    for key in keys:
        for f in _POLISH:
            args = {k: c[k] for k in ("d", "dm", "m", "ls", "lm", "sc") if k in c}
            args[key] = _fp16(c[key] * f)
            cands.append(requant(**args))
    return _pick(cands, x, mw)


def _bytes_f16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


# ---------------------------------------------------------------------------- 32-blocks
def _q_sym32(x, qw, sigma2, nmax, search):
    """Q4_0 (nmax 8) and Q5_0 (nmax 16): d * (L - nmax)."""
    mw = qw if qw is not None else torch.ones_like(x)
    ds = []
    if qw is None or search:  # reference: the grid through the largest |x|, d = max / -nmax
        ds.append(_signed_max(x) / -nmax)
    if qw is not None or search:
        w = (qw if qw is not None else 1.0) * torch.sqrt(sigma2 + x * x)
        ds.append(_fit_sym(x, w, nmax)[0])

    def requant(d):
        nz = (d != 0)[:, None]
        L = torch.where(nz, torch.clamp(_rint(x / torch.where(nz, d[:, None], 1.0)), -nmax, nmax - 1), 0)
        return {"d": d, "L": L, "deq": d[:, None] * L}

    c = _pick([requant(_fp16(d)) for d in ds], x, mw)
    if search:
        c = _polish(c, x, mw, requant, ("d",))
    L = (c["L"] + nmax).to(torch.uint8)
    qs = (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)
    if nmax == 8:
        return torch.cat([_bytes_f16(c["d"]), qs], 1)
    return torch.cat([_bytes_f16(c["d"]), _bits32(L >> 4), qs], 1)


def _bits32(bits: torch.Tensor) -> torch.Tensor:
    """32 one-bit values per row -> 4 bytes, element j at bit j (little-endian uint32)."""
    b = bits.to(torch.uint8).view(-1, 4, 8)
    out = torch.zeros(b.shape[0], 4, dtype=torch.uint8)
    for i in range(8):
        out |= b[:, :, i] << i
    return out


def _q_asym32(x, qw, sigma2, nmax, search):
    """Q4_1 (nmax 15) and Q5_1 (nmax 31): d * L + m."""
    mw = qw if qw is not None else torch.ones_like(x)
    fits = []
    if qw is None or search:
        mn, mx = x.amin(1), x.amax(1)
        fits.append(((mx - mn) / nmax, mn))
    if qw is not None or search:
        w = (qw if qw is not None else 1.0) * torch.sqrt(sigma2 + x * x)
        s, m = _fit_asym(x, w, nmax, -0.9, 0.05, 36)
        fits.append((s, -m))

    def requant(d, m):
        nz = (d != 0)[:, None]
        L = torch.where(nz, torch.clamp(_rint((x - m[:, None]) / torch.where(nz, d[:, None], 1.0)), 0, nmax), 0)
        return {"d": d, "m": m, "L": L, "deq": d[:, None] * L + m[:, None]}

    c = _pick([requant(_fp16(d), _fp16(m)) for d, m in fits], x, mw)
    if search:
        c = _polish(c, x, mw, requant, ("d", "m"))
    L = c["L"].to(torch.uint8)
    qs = (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)
    if nmax == 15:
        return torch.cat([_bytes_f16(c["d"]), _bytes_f16(c["m"]), qs], 1)
    return torch.cat([_bytes_f16(c["d"]), _bytes_f16(c["m"]), _bits32(L >> 4), qs], 1)


def _q8_0(x):
    """Q8_0 exactly as ggml's reference: d = amax / 127, q = roundf(x / d)."""
    d = x.abs().amax(1) / 127
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = _roundf(x * inv[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([_bytes_f16(d), q], 1)


# ---------------------------------------------------------------------------- public
def quantize(
    w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None, search: bool = True
) -> torch.Tensor:
    """Encode a 2-D float weight (rows, cols) as `type_name`; returns uint8 (rows, row_bytes).

    importance: per input column (llama-quantize's imatrix column weights, mean x^2);
    search=False runs only llama.cpp's own procedure for the case (fastest)."""
    t = ggml_type(type_name)
    rows, cols = w.shape
    if cols % t.block:
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block} weights, got {cols}")
    if t.name == "F32":
        return w.to(torch.float32).contiguous().view(torch.uint8)
    if t.name in ("F16", "BF16"):
        return w.to(torch.float16 if t.name == "F16" else torch.bfloat16).contiguous().view(torch.uint8)
    if t.name.startswith("IQ") and not torch.isfinite(w).all():
        raise ValueError(f"{t.name}: the weight holds NaN or infinite values")
    if t.name in KQUANT_KINDS or t.name.startswith("IQ"):  # compiled: llama.cpp's procedure, then k2quant's search
        x = w.to(torch.float32).numpy()
        imp = None if importance is None else importance.to(torch.float32).reshape(cols).numpy()
        threads = torch.get_num_threads()
        if t.name in KQUANT_KINDS:  # kquant_kernel.py
            return torch.from_numpy(encode_kquant(x, imp, t.name, search, threads))
        if t.name in ("IQ4_NL", "IQ4_XS"):  # iq4_kernel.py
            return torch.from_numpy(encode_iq4(x, imp, t.name == "IQ4_XS", search, threads))
        encode = {"IQ1": encode_iq1, "IQ2": encode_iq2, "IQ3": encode_iq3}[t.name[:3]]  # over iq_grid.py
        return torch.from_numpy(encode(x, imp, t.name, search, threads))
    if importance is not None:
        importance = importance.to(torch.float32).reshape(1, cols)
    rows_per_chunk = max(1, _ELEMS_PER_CHUNK // cols)
    out = torch.empty(rows, t.row_bytes(cols), dtype=torch.uint8)
    for r0 in range(0, rows, rows_per_chunk):
        x = w[r0 : r0 + rows_per_chunk].to(torch.float32)
        n = x.shape[0]
        qw = importance.expand(n, cols).reshape(-1, t.block) if importance is not None else None
        sigma2 = ((x * x).sum(1, keepdim=True) / cols).expand(n, cols // t.block).reshape(-1, 1)
        xb = x.reshape(-1, t.block)
        if t.name == "Q8_0":
            enc = _q8_0(xb)
        elif t.name in ("Q4_0", "Q5_0"):
            enc = _q_sym32(xb, qw, sigma2, 8 if t.name == "Q4_0" else 16, search)
        else:
            enc = _q_asym32(xb, qw, sigma2, 15 if t.name == "Q4_1" else 31, search)
        out[r0 : r0 + n] = enc.reshape(n, -1)
    return out


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32).reshape(-1, 1)


def _unpack2(qs: torch.Tensor) -> torch.Tensor:
    B = qs.shape[0]
    q = qs.view(B, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    return (q & 3).reshape(B, QK_K)


_K4 = torch.tensor(IQ4_LEVELS, dtype=torch.float32)
_GRID = {name: torch.from_numpy(iq_grid.grid(name)[0]) for name in iq_grid.CLASSES}
_POPCOUNT7 = torch.tensor([bin(i).count("1") for i in range(128)])


def _unpack_nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """(B, 16) bytes -> (B, 32) 4-bit indices (low nibbles first): _pack_nibbles32's inverse."""
    return torch.cat([qs & 0xF, qs >> 4], 1).long()


def _k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = sc[:, :4], sc[:, 4:8], sc[:, 8:]
    s = torch.cat([d & 63, (md & 0xF) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return s.to(torch.float32), mn.to(torch.float32)


def dequantize(data: torch.Tensor, type_name: str, cols: int) -> torch.Tensor:
    """Decode uint8 rows (rows, row_bytes) of `type_name` to float32 (rows, cols)."""
    t = ggml_type(type_name)
    rows = data.shape[0]
    data = data.contiguous()
    if t.name == "F32":
        return data.view(torch.float32).reshape(rows, cols).clone()
    if t.name in ("F16", "BF16"):
        return data.view(torch.float16 if t.name == "F16" else torch.bfloat16).reshape(rows, cols).to(torch.float32)
    b = data.reshape(-1, t.nbytes)
    B = b.shape[0]
    if t.name == "Q8_0":
        y = b[:, 2:].view(torch.int8).to(torch.float32) * _f16(b[:, :2])
    elif t.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        off = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[t.name]
        qs = b[:, off:]
        q = torch.cat([qs & 0xF, qs >> 4], 1)
        if t.name in ("Q5_0", "Q5_1"):
            qh = b[:, off - 4 : off].view(B, 4, 1) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8)
            q = q | ((qh & 1).reshape(B, 32) << 4)
        if t.name in ("Q4_1", "Q5_1"):
            y = _f16(b[:, :2]) * q.to(torch.float32) + _f16(b[:, 2:4])
        else:
            y = _f16(b[:, :2]) * (q.to(torch.int8) - (8 if t.name == "Q4_0" else 16)).to(torch.float32)
    elif t.name == "Q2_K":
        sc, qs = b[:, :16], b[:, 16:80]
        d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
        dl = (d * (sc & 0xF).to(torch.float32)).view(B, 16, 1)
        ml = (dmin * (sc >> 4).to(torch.float32)).view(B, 16, 1)
        y = dl * _unpack2(qs).view(B, 16, 16).to(torch.float32) - ml
    elif t.name == "Q3_K":
        hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
        lo = (sc[:, :8].view(B, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 2, 1)).reshape(B, 16)
        hi = (sc[:, 8:].view(B, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)).reshape(B, 16)
        s = (((lo & 0xF) | ((hi & 3) << 4)).to(torch.int8) - 32).to(torch.float32)
        dl = (d * s).view(B, 16, 1)
        ql = _unpack2(qs).view(B, 16, 16)
        qh = (hmask.view(B, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)).reshape(B, 16, 16) & 1
        q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).to(torch.float32)
        y = dl * q
    elif t.name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        s, m = _k_scales(b[:, 4:16])
        de = (d * s).view(B, 8, 1)
        me = (dmin * m).view(B, 8, 1)
        qs = b[:, -128:].view(B, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
        q = (qs & 0xF).reshape(B, 8, 32)
        if t.name == "Q5_K":
            qh = b[:, 16:48].view(B, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
            q = q | ((qh & 1) << 4)
        y = de * q.to(torch.float32) - me
    elif t.name == "IQ4_NL":
        y = _f16(b[:, :2]) * _K4[_unpack_nibbles32(b[:, 2:])]
    elif t.name == "IQ4_XS":
        hi = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32).view(B, 1) >> torch.arange(0, 16, 2).view(1, 8)
        lo = (b[:, 4:8].view(B, 4, 1) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2)).reshape(B, 8) & 0xF
        ls = (lo.to(torch.int32) | ((hi & 3) << 4)) - 32
        dl = (_f16(b[:, :2]) * ls.to(torch.float32)).view(B, 8, 1)
        y = dl * _K4[_unpack_nibbles32(b[:, 8:].reshape(B * 8, 16))].view(B, 8, 32)
    elif t.name == "IQ2_XXS":
        words = b[:, 2:].reshape(B, 8, 2, 4).to(torch.int64) << torch.tensor([0, 8, 16, 24]).view(1, 1, 1, 4)
        q1 = words[:, :, 1].sum(-1)  # per 32 weights: 4 x 7 sign bits, then the 4-bit multiple
        db = (_f16(b[:, :2]) * (0.5 + (q1 >> 28).to(torch.float32)) * 0.25).view(B, 8, 1, 1)
        s7 = (q1.view(B, 8, 1) >> torch.tensor([0, 7, 14, 21]).view(1, 1, 4)) & 127
        s8 = s7 | ((_POPCOUNT7[s7] & 1) << 7)  # the 8th sign makes the count of minus signs even
        neg = (s8.unsqueeze(-1) >> torch.arange(8).view(1, 1, 1, 8)) & 1
        g = _GRID["IQ2_XXS"][b[:, 2:].reshape(B, 8, 8)[:, :, :4].long()]  # (B, 8, 4, 8)
        y = db * g * (1 - 2 * neg).to(torch.float32)
    elif t.name == "IQ2_XS":
        q = (b[:, 2:66].reshape(B, 32, 2).to(torch.int64) << torch.tensor([0, 8])).sum(-1)  # index | signs << 9
        sc = (b[:, 66:74].view(B, 8, 1) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2)).reshape(B, 16) & 0xF
        db = (_f16(b[:, :2]) * (0.5 + sc.to(torch.float32)) * 0.25).view(B, 16, 1, 1)
        s7 = (q >> 9).view(B, 16, 2)
        s8 = s7 | ((_POPCOUNT7[s7] & 1) << 7)
        neg = (s8.unsqueeze(-1) >> torch.arange(8).view(1, 1, 1, 8)) & 1
        g = _GRID["IQ2_XS"][(q & 511).view(B, 16, 2)]  # (B, 16, 2, 8)
        y = db * g * (1 - 2 * neg).to(torch.float32)
    elif t.name == "IQ2_S":  # 32 low index bytes, 32 sign bytes, 2 high index bits each, 16 multiples
        qh = (b[:, 66:74].view(B, 8, 1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4)) & 3
        idx = b[:, 2:34].long() | (qh.reshape(B, 32).long() << 8)
        sc = (b[:, 74:82].view(B, 8, 1) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2)).reshape(B, 16) & 0xF
        db = (_f16(b[:, :2]) * (0.5 + sc.to(torch.float32)) * 0.25).view(B, 16, 1, 1)
        neg = (b[:, 34:66].view(B, 32, 1) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8)) & 1
        y = db * _GRID["IQ2_S"][idx.view(B, 16, 2)] * (1 - 2 * neg.view(B, 16, 2, 8).long()).to(torch.float32)
    elif t.name == "IQ3_XXS":  # 64 index bytes; per 32 weights 4 x 7 signs and the multiple
        q1 = (b[:, 66:98].reshape(B, 8, 4).to(torch.int64) << torch.tensor([0, 8, 16, 24]).view(1, 1, 4)).sum(-1)
        db = (_f16(b[:, :2]) * (0.5 + (q1 >> 28).to(torch.float32)) * 0.5).view(B, 8, 1, 1)
        s7 = (q1.view(B, 8, 1) >> torch.tensor([0, 7, 14, 21]).view(1, 1, 4)) & 127
        s8 = s7 | ((_POPCOUNT7[s7] & 1) << 7)
        neg = (s8.unsqueeze(-1) >> torch.arange(8).view(1, 1, 1, 8)) & 1
        g = _GRID["IQ3_XXS"][b[:, 2:66].long()].view(B, 8, 4, 8)  # 8 groups of 4 = 4 rows of 8 signs
        y = db * g * (1 - 2 * neg).to(torch.float32)
    elif t.name == "IQ1_S":  # fp16 d, 32 low index bytes, per 32 weights a word: 4 x 3 high bits, multiple, shift
        qh = b[:, 34:50].contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # (B, 8)
        dl = (_f16(b[:, :2]) * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).view(B, 8, 1, 1)
        delta = torch.where((qh & 0x8000) == 0, 0.125, -0.125).to(torch.float32).view(B, 8, 1, 1)
        hi = (qh.view(B, 8, 1) >> torch.tensor([0, 3, 6, 9]).view(1, 1, 4)) & 7
        idx = b[:, 2:34].long() | (hi << 8).view(B, 32)
        y = dl * (_GRID["IQ1_S"][idx].view(B, 8, 4, 8) + delta)
    elif t.name == "IQ1_M":  # 32 low index bytes, 16 bytes of high bits and shifts, 4 words of multiples and d
        sc = b[:, 48:56].contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # (B, 4)
        dbits = ((sc >> 12) << torch.tensor([0, 4, 8, 12]).view(1, 4)).sum(1)
        d = dbits.to(torch.int16).view(torch.float16).to(torch.float32).view(B, 1)
        s = ((sc.view(B, 4, 1) >> torch.tensor([0, 3, 6, 9]).view(1, 1, 4)) & 7).reshape(B, 16)
        dl = (d * (2 * s + 1).to(torch.float32)).view(B, 16, 1, 1)
        qh = b[:, 32:48].view(B, 16, 1).long() >> torch.tensor([0, 4]).view(1, 1, 2)  # (B, 16, 2)
        delta = torch.where((qh & 0x08) == 0, 0.125, -0.125).to(torch.float32).view(B, 16, 2, 1)
        idx = b[:, :32].long() | ((qh & 7) << 8).view(B, 32)
        y = dl * (_GRID["IQ1_S"][idx].view(B, 16, 2, 8) + delta)
    elif t.name == "IQ3_S":  # 64 low index bytes, 8 bytes of 9th bits, 32 sign bytes, 8 multiples
        qh = (b[:, 66:74].view(B, 8, 1) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8)) & 1
        idx = b[:, 2:66].long() | (qh.reshape(B, 64).long() << 8)
        sc = (b[:, 106:110].view(B, 4, 1) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2)).reshape(B, 8) & 0xF
        db = (_f16(b[:, :2]) * (1 + 2 * sc).to(torch.float32)).view(B, 8, 1, 1)
        neg = (b[:, 74:106].view(B, 32, 1) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8)) & 1
        y = db * _GRID["IQ3_S"][idx].view(B, 8, 4, 8) * (1 - 2 * neg.view(B, 8, 4, 8).long()).to(torch.float32)
    else:  # Q6_K
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        de = (d * sc.view(torch.int8).to(torch.float32)).view(B, 16, 1)
        lo = (ql.view(B, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)) & 0xF
        hi = (qh.view(B, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
        q = (lo.reshape(B, 2, 4, 32) | (hi << 4)).to(torch.int8) - 32
        y = de * q.reshape(B, 16, 16).to(torch.float32)
    return y.reshape(rows, cols)
