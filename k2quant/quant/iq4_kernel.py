"""IQ4_NL and IQ4_XS encoders, compiled (numba): llama.cpp's procedure in float32, then k2quant's search.

Both types store each weight as one of 16 fixed non-linear levels (`IQ4_LEVELS`, denser near
zero) times a block scale: IQ4_NL one fp16 scale per 32 weights (18 bytes), IQ4_XS one fp16
scale per 256 weights and a 6-bit signed multiple of it per 32 (136 bytes, 4.25 bits).

The scale of each 32-block is quantize_row_iq4_nl_impl's (ggml-quants.c): weights
imatrix * sqrt(sigma2 + x^2) (x^2 without an imatrix), the grid through the largest |x| and 15
grids stretched around it, each solved by weighted least squares; IQ4_XS then takes its fp16
super-scale from the largest block scale (/ -32) and rounds each block's multiple. Every step is
the same float32 operation in the same order as the C code, so `search=False` is llama-quantize's
result, byte for byte on the inputs the tests try.

`search=True` keeps llama.cpp's result as one candidate and adds others, judged by the squared
error of the values as they decode (fp16 scales, the importance as column weights): the level
indices requantized against the stored (rounded) scales, a least-squares refit of the IQ4_NL
scale, the IQ4_XS super-scale nudged by +-0.5% and +-1%, and each IQ4_XS block's multiple one
step either way. The lowest error wins per block (IQ4_NL) or per 256 (IQ4_XS, with each block's
multiple chosen independently under the super-scale), so it is never worse than llama.cpp's.
Rows run in parallel (numba prange); each row's bytes depend only on that row, so the output is
the same for every thread count and run.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
_LEVELS = np.array([*IQ4_LEVELS, 1e30], dtype=np.float32)  # a 17th, so the last step needs no branch
_MIDS = [(a + b) / 2 for a, b in zip(IQ4_LEVELS[:-1], IQ4_LEVELS[1:], strict=True)]
_CELL = np.array([sum(m < (c - 512) / 4 for m in _MIDS) for c in range(968)], dtype=np.int64)  # x in [-128, 114)
_NUDGE = np.array([0.99, 0.995, 1.005, 1.01], dtype=np.float32)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


# ---------------------------------------------------------------------------- fp16, as ggml rounds it
@njit(cache=True)
def _round16(f):
    """float32 -> the nearest fp16 value (ties to even, as F16C's vcvtps2ph), as float32."""
    a = abs(np.float64(f))
    if a >= 65520.0:
        r = np.inf
    elif a < 6.103515625e-05:  # subnormal halves: multiples of 2^-24
        r = np.rint(a * 16777216.0) / 16777216.0
    else:  # 11 significant bits
        m, e = math.frexp(a)
        r = math.ldexp(np.rint(math.ldexp(m, 11)), e - 11)
    return np.float32(math.copysign(r, f))


@njit(cache=True)
def _f16_bits(r):
    """The IEEE half bits of an fp16 value (one _round16 returned)."""
    a = abs(np.float64(r))
    sign = 0x8000 if math.copysign(1.0, r) < 0 else 0
    if a == np.inf:
        return sign | 0x7C00
    if a < 6.103515625e-05:
        return sign | np.int64(a * 16777216.0)
    m, e = math.frexp(a)
    return sign | ((e + 14) << 10) | (np.int64(math.ldexp(m, 11)) - 1024)


# ---------------------------------------------------------------------------- llama.cpp's steps
@njit(cache=True, inline="always")
def _best_index(v, x):
    """best_index_int8: the nearest of the 16 levels, the upper one on a tie (exactly: the last
    step is the C code's comparison). _CELL gives, for x's quarter-unit cell, the level below
    the one midpoint between levels the cell can hold (midpoints are at least 4.5 apart)."""
    if not x > v[0]:  # also NaN
        return 0
    if x >= v[15]:
        return 15
    i = _CELL[math.floor(x * 4.0) + 512]
    return i + np.int64(not x - v[i] < v[i + 1] - x)  # v[16] is +inf's stand-in: never past 15


@njit(cache=True)
def _block_scale(v, x, w, o):
    """quantize_row_iq4_nl_impl's scale for x[o:o+32] under weights w (ntry = 7)."""
    amax, mx = _ZERO, _ZERO
    for j in range(o, o + 32):
        ax = abs(x[j])
        if ax > amax:
            amax, mx = ax, x[j]
    if amax < _EPS:
        return _ZERO
    d = -mx / v[0]
    inv = _ONE / d
    sqx, sq2 = _ZERO, _ZERO
    for j in range(o, o + 32):
        q = v[_best_index(v, inv * x[j])]
        sqx += w[j] * q * x[j]
        sq2 += w[j] * q * q
    d = sqx / sq2 if sq2 > 0 else _ZERO
    best = d * sqx
    for itry in range(-7, 8):
        inv = np.float32(itry + np.int64(v[0])) / mx
        sqx, sq2 = _ZERO, _ZERO
        for j in range(o, o + 32):
            q = v[_best_index(v, inv * x[j])]
            sqx += w[j] * q * x[j]
            sq2 += w[j] * q * q
        if sq2 > 0 and sqx * sqx > best * sq2:
            d = sqx / sq2
            best = d * sqx
    return d


@njit(cache=True)
def _weights(x, imp, o, n, has_imp, w):
    """w[o:o+n]: imatrix * sqrt(sigma2 + x^2), sigma2 = 2 * mean x^2 over the n; x^2 without one."""
    s = _ZERO
    for j in range(o, o + n):
        s += x[j] * x[j]
    s *= np.float32(2.0 / n)
    for j in range(o, o + n):
        w[j] = imp[j] * np.sqrt(s + x[j] * x[j]) if has_imp else x[j] * x[j]


# ---------------------------------------------------------------------------- k2quant's search
@njit(cache=True)
def _requant(v, x, mw, o, dl, L):
    """L[o:o+32] against the decoded block scale dl; returns the weighted squared error."""
    inv = _ONE / dl if dl != 0 else _ZERO
    err = 0.0
    for j in range(o, o + 32):
        L[j] = _best_index(v, inv * x[j])
        e = dl * v[L[j]] - x[j]
        err += mw[j] * e * e
    return err


@njit(cache=True)
def _error(v, x, mw, o, dl, L):
    err = 0.0
    for j in range(o, o + 32):
        e = dl * v[L[j]] - x[j]
        err += mw[j] * e * e
    return err


@njit(cache=True)
def _pack(L, o, out, p):
    for j in range(16):
        out[p + j] = np.uint8(L[o + j] | (L[o + 16 + j] << 4))


@njit(cache=True)
def _nl_row(v, nudge, x, imp, has_imp, search, w, mw, L, T, out):
    n = x.shape[0]
    cands = np.empty(6, dtype=np.float32)
    for o in range(0, n, 32):
        _weights(x, imp, o, 32, has_imp, w)
        d = _block_scale(v, x, w, o)
        d16 = _round16(d)
        inv = _ONE / d if d != 0 else _ZERO  # llama.cpp: levels against the unrounded scale
        for j in range(o, o + 32):
            L[j] = _best_index(v, inv * x[j])
        if search:
            best = _error(v, x, mw, o, d16, L)
            cands[0] = d16
            for k in range(4):
                cands[1 + k] = _round16(d16 * nudge[k])
            _requant(v, x, mw, o, d16, T)  # the levels against the stored scale, then refit to them
            sqx, sq2 = 0.0, 0.0
            for j in range(o, o + 32):
                q = v[T[j]]
                sqx += mw[j] * q * x[j]
                sq2 += mw[j] * q * q
            cands[5] = _round16(np.float32(sqx / sq2)) if sq2 > 0 else d16
            for k in range(6):
                e = _requant(v, x, mw, o, cands[k], T)
                if e < best:
                    best, d16 = e, cands[k]
                    for j in range(o, o + 32):
                        L[j] = T[j]
        b = o // 32 * 18
        h = _f16_bits(d16)
        out[b], out[b + 1] = h & 0xFF, h >> 8
        _pack(L, o, out, b + 2)


@njit(cache=True)
def _xs_row(v, nudge, x, imp, has_imp, search, w, mw, L, T, out):
    n = x.shape[0]
    scales = np.empty(8, dtype=np.float32)
    ls = np.empty(8, dtype=np.int64)
    cand_ls = np.empty(8, dtype=np.int64)
    for o in range(0, n, 256):
        _weights(x, imp, o, 256, has_imp, w)
        amax, mx = _ZERO, _ZERO
        for ib in range(8):
            scales[ib] = _block_scale(v, x, w, o + 32 * ib)
            if abs(scales[ib]) > amax:
                amax, mx = abs(scales[ib]), scales[ib]
        d = -mx / np.float32(32.0)
        inv = _ONE / d if d != 0 else _ZERO
        for ib in range(8):  # llama.cpp's: each multiple from the unrounded d, levels against d * l
            ls[ib] = min(31, max(-32, np.int64(np.rint(inv * scales[ib]))))
            dl = d * np.float32(ls[ib])
            idl = _ONE / dl if dl != 0 else _ZERO
            for j in range(o + 32 * ib, o + 32 * ib + 32):
                L[j] = _best_index(v, idl * x[j])
        d16 = _round16(d)
        if search:
            total = np.inf
            for k in range(5):
                D = d16 if k == 0 else _round16(d16 * nudge[k - 1])
                invD = _ONE / D if D != 0 else _ZERO
                cand_total = 0.0
                for ib in range(8):  # each block's multiple: l0 - 1, l0, l0 + 1 under D, as decoded
                    bo = o + 32 * ib
                    l0 = min(31, max(-32, np.int64(np.rint(invD * scales[ib]))))
                    be, bl = np.inf, l0
                    for step in (-1, 0, 1):
                        lc = min(31, max(-32, l0 + step))
                        e = _requant(v, x, mw, bo, D * np.float32(lc), T)
                        if e < be:
                            be, bl = e, lc
                    if k == 0:  # under the stored d, llama.cpp's own levels are a candidate too
                        e = _error(v, x, mw, bo, D * np.float32(ls[ib]), L)
                        if e <= be:
                            be, bl = e, -100
                    if bl != -100:
                        _requant(v, x, mw, bo, D * np.float32(bl), T)
                    else:
                        for j in range(bo, bo + 32):
                            T[j] = L[j]
                        bl = ls[ib]
                    for j in range(bo, bo + 32):
                        T[n + j] = T[j]  # the block's chosen levels, kept while later blocks run
                    cand_ls[ib] = bl
                    cand_total += be
                if cand_total < total:  # k = 0 holds llama.cpp's blocks, so it is never worse
                    total, d16 = cand_total, D
                    for ib in range(8):
                        ls[ib] = cand_ls[ib]
                    for j in range(o, o + 256):
                        L[j] = T[n + j]
        b = o // 256 * 136
        h = _f16_bits(d16)
        out[b], out[b + 1] = h & 0xFF, h >> 8
        sh = 0
        for ib in range(8):
            u = ls[ib] + 32
            sh |= (u >> 4) << (2 * ib)
            if ib % 2 == 0:
                out[b + 4 + ib // 2] = np.uint8(u & 0xF)
            else:
                out[b + 4 + ib // 2] |= np.uint8((u & 0xF) << 4)
        out[b + 2], out[b + 3] = np.uint8(sh & 0xFF), np.uint8(sh >> 8)
        for i in range(8):
            _pack(L, o + 32 * i, out, b + 8 + 16 * i)


@njit(parallel=True, cache=True)
def _encode(v, nudge, x, imp, has_imp, xs, search, out):
    rows, n = x.shape
    for r in prange(rows):
        w = np.empty(n, dtype=np.float32)
        mw = imp if has_imp else np.ones(n, dtype=np.float32)
        L = np.empty(n, dtype=np.int64)
        T = np.empty(2 * n, dtype=np.int64)
        if xs:
            _xs_row(v, nudge, x[r], imp, has_imp, search, w, mw, L, T, out[r])
        else:
            _nl_row(v, nudge, x[r], imp, has_imp, search, w, mw, L, T, out[r])


def encode_iq4(x: np.ndarray, importance: np.ndarray | None, xs: bool, search: bool, threads: int) -> np.ndarray:
    """Rows of float32 weights (rows, cols) -> IQ4_XS (`xs`) or IQ4_NL blocks, uint8 (rows, row bytes).

    importance: float32 per column (llama-quantize's imatrix column weights) or None; rows are
    spread over `threads` threads (at most the number numba started with)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    block, nbytes = (256, 136) if xs else (32, 18)
    if cols % block:
        name = "IQ4_XS" if xs else "IQ4_NL"
        raise ValueError(f"{name} needs rows that are a multiple of {block} weights, got {cols}")
    has_imp = importance is not None
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(cols) if has_imp else np.ones(cols, np.float32)
    out = np.zeros((rows, cols // block * nbytes), dtype=np.uint8)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _encode(_LEVELS, _NUDGE, x, imp, has_imp, xs, search, out)
    return out
