"""The k-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), compiled (numba): llama.cpp's procedures in
float32, then k2quant's search.

A k-quant stores a super-block of 256 weights as an fp16 scale (and, for the asymmetric Q2_K /
Q4_K / Q5_K, an fp16 min) times a small integer multiple per sub-block (Q4_K / Q5_K: eight 6-bit
scales and mins per 32 weights; Q2_K: sixteen 4-bit pairs per 16; Q3_K: sixteen 6-bit signed
scales; Q6_K: sixteen 8-bit signed scales) times the weights' levels.

`search=False` is ggml-quants.c's own procedure for the case, step for step in float32 in the C
code's order, so it writes llama-quantize's bytes:
- without an importance matrix the _ref procedures: Q4_K / Q5_K fit each sub-block with
  make_qkx2_quants under the weights mean|x| + |x| (Q2_K: |x| and absolute error), then take the
  multiples over the largest; Q3_K runs make_q3_quants (x^2 weights, coordinate descent), Q6_K
  make_qx_quants weighted by x^2;
- with one the _impl procedures: imatrix * sqrt(sigma2 + x^2) weights, make_qkx3_quants and
  make_qp_quants for the multiples (Q2_K, Q4_K, Q5_K), make_qx_quants per sub-block and over the
  scales (Q3_K), make_qx_quants weighted by the imatrix (Q6_K).

`search=True` (convert's `--method mse`) runs both of llama.cpp's procedures (the _impl one with its
no-imatrix weights when there is none), keeps per super-block the one whose values, as they decode,
have the lower error (weighted by the importance when there is one), then tries the fp16 scale
(and min) nudged by +-0.5% and +-1%, and each sub-block's multiples one step either way, requantizing
the levels against each: never worse than llama.cpp's own result on any super-block.

The work is laid out one sub-block per SIMD lane: each row is transposed so that the inner loops run
across its sub-blocks while every sub-block's sums are still added in the C code's order. Rows run
in parallel (numba prange); each row's bytes depend only on that row, so the output is the same for
every thread count and run.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .iq4_kernel import _f16_bits, _round16

KINDS = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}
BYTES = {2: 84, 3: 110, 4: 144, 5: 176, 6: 210}
_NUDGE = np.array([0.99, 0.995, 1.005, 1.01], dtype=np.float32)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_ZERO, _ONE = np.float32(0.0), np.float32(1.0)
_TENTH = np.float32(0.1)


# ---------------------------------------------------------------------------- ggml-quants.c's helpers
@njit(cache=True, inline="always")
def _nearest(v):
    """nearest_int: round half to even (the C code's float trick)."""
    return np.int64(np.rint(v))


@njit(cache=True, inline="always")
def _largest(v, o, n):
    """The largest of v[o:o+n], 0 if none is positive (the C code's max_scale / max_min)."""
    m = _ZERO
    for i in range(o, o + n):
        m = v[i] if v[i] > m else m
    return m


@njit(cache=True, inline="always")
def _largest_magnitude(v, o, n):
    """The first of v[o:o+n] with the largest |v| (sign kept) and that magnitude (0, 0 if all are 0)."""
    m, a = _ZERO, _ZERO
    for i in range(o, o + n):
        if abs(v[i]) > a:
            a, m = abs(v[i]), v[i]
    return m, a


@njit(cache=True)
def _sigma2(x, factor):
    """Per super-block of the row, factor * (sum of x^2) / 256, summed in the row's order as the C code
    sums it (factor 2 for Q3_K..Q5_K's importance weights, 1 for Q2_K's)."""
    out = np.empty(x.shape[0] // 256, np.float32)
    for b in range(out.shape[0]):
        s = _ZERO
        for i in range(256 * b, 256 * b + 256):
            s += x[i] * x[i]
        out[b] = np.float32(factor) * s / np.float32(256.0)
    return out


@njit(cache=True)
def make_qp(x, w, o, n, nmax, L):
    """make_qp_quants: non-negative x[o:o+n] as scale * L, L in 0..nmax under weights w[o:o+n].
    The levels L[0:n] are kept as the C code keeps them, in bytes (a negative level reads back as
    256 + level); returns the scale."""
    mx = _ZERO
    for i in range(o, o + n):
        mx = mx if mx > x[i] else x[i]
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    fn = np.float32(nmax)
    iscale = fn / mx
    scale = _ONE / iscale
    best = _ZERO
    for i in range(n):
        L[i] = _nearest(iscale * x[o + i]) & 0xFF
        diff = x[o + i] - scale * np.float32(L[i])
        best += w[o + i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        isc = (_TENTH * np.float32(s) + fn) / mx
        sc = _ONE / isc
        mse = _ZERO
        for i in range(n):
            lv = min(nmax, _nearest(isc * x[o + i]))
            diff = x[o + i] - sc * np.float32(lv)
            mse += w[o + i] * diff * diff
        if mse < best:
            best, iscale = mse, isc
    slx, sl2 = _ZERO, _ZERO
    for i in range(n):
        lv = min(nmax, _nearest(iscale * x[o + i]))
        L[i] = lv & 0xFF
        slx += w[o + i] * x[o + i] * np.float32(lv)
        sl2 += w[o + i] * np.float32(lv) * np.float32(lv)
    for _ in range(5):
        changed = 0
        for i in range(n):
            wi, xi, li = w[o + i], x[o + i], np.float32(L[i])
            a = slx - wi * xi * li
            b = sl2 - wi * li * li
            if a > 0 and b > 0:
                nl = min(nmax, _nearest(xi * b / a))
                if nl != L[i]:
                    a += wi * xi * np.float32(nl)
                    b += wi * np.float32(nl) * np.float32(nl)
                    if a * a * sl2 > slx * slx * b:
                        L[i], slx, sl2 = nl & 0xFF, a, b
                        changed += 1
        if not changed:
            break
    return slx / sl2 if sl2 > 0 else _ZERO


# ---------------------------------------------------------------------------- the fits, every sub-block at once
# xt[i, k] is weight i of sub-block k of a row: the inner loops run across sub-blocks (SIMD lanes)
# while each sub-block's sums are added in the C code's order, so every result is the C code's.
@njit(cache=True, error_model="numpy")
def _transpose(x, n, xt):
    """xt[i, k] = x[n k + i]."""
    for k in range(xt.shape[1]):
        for i in range(n):
            xt[i, k] = x[n * k + i]


@njit(cache=True)
def _lanes(x, n, impt, has_imp):
    """A row's work arrays in the lane layout (sub-blocks of n): the weights transposed, fit weights,
    the importance (ones without one), levels, candidate levels, scratch levels."""
    K = x.shape[0] // n
    xt = np.empty((n, K), np.float32)
    _transpose(x, n, xt)
    mwt = impt if has_imp else np.ones((n, K), np.float32)
    return (
        xt,
        np.empty((n, K), np.float32),
        mwt,
        np.zeros((n, K), np.float32),
        np.zeros((n, K), np.float32),
        np.empty((n, K), np.float32),
    )


@njit(cache=True, error_model="numpy")
def _make_qkx(xt, wt, nmax, rmin, rdelta, nstep, use_mad, L, Laux, scale, the_min):
    """make_qkx2_quants / make_qkx3_quants (the same steps given the weights) of every sub-block:
    x ~ scale * L - the_min, L in 0..nmax, errors squared or absolute (use_mad). As in the C code, an
    accepted step moves the min that the later steps stretch their grids from."""
    n, K = xt.shape
    fn = np.float32(nmax)
    mn, mx, sum_w = xt[0].copy(), xt[0].copy(), wt[0].copy()
    sum_x = wt[0] * xt[0]
    for i in range(1, n):
        xi, wi = xt[i], wt[i]
        for k in range(K):
            v = xi[k]
            mn[k] = v if v < mn[k] else mn[k]
            mx[k] = v if v > mx[k] else mx[k]
            sum_w[k] += wi[k]
            sum_x[k] += wi[k] * v
    flat = np.empty(K, np.bool_)
    iscale, best = np.empty(K, np.float32), np.zeros(K, np.float32)
    for k in range(K):
        mn[k] = _ZERO if mn[k] > 0 else mn[k]
        flat[k] = mx[k] <= mn[k]
        iscale[k] = fn / (mx[k] - mn[k] if not flat[k] else _ONE)
        scale[k] = _ONE / iscale[k]
    for i in range(n):
        xi, wi, Li = xt[i], wt[i], L[i]
        for k in range(K):
            lv = min(fn, max(_ZERO, np.rint(iscale[k] * (xi[k] - mn[k]))))
            Li[k] = lv
            diff = scale[k] * lv + mn[k] - xi[k]
            best[k] += wi[k] * (abs(diff) if use_mad else diff * diff)
    s_l, s_l2, s_xl = np.empty(K, np.float32), np.empty(K, np.float32), np.empty(K, np.float32)
    ts, tm, cur = np.empty(K, np.float32), np.empty(K, np.float32), np.empty(K, np.float32)
    take = np.empty(K, np.bool_)
    for s in range(nstep + 1):
        step = rmin + rdelta * np.float32(s) + fn
        for k in range(K):
            iscale[k] = step / (mx[k] - mn[k] if not flat[k] else _ONE)
            s_l[k], s_l2[k], s_xl[k], cur[k] = _ZERO, _ZERO, _ZERO, _ZERO
        for i in range(n):
            xi, wi, Ai = xt[i], wt[i], Laux[i]
            for k in range(K):
                lv = min(fn, max(_ZERO, np.rint(iscale[k] * (xi[k] - mn[k]))))
                Ai[k] = lv
                wl = wi[k] * lv
                s_l[k] += wl
                s_l2[k] += wl * lv
                s_xl[k] += wl * xi[k]
        for k in range(K):
            D = sum_w[k] * s_l2[k] - s_l[k] * s_l[k]
            take[k] = D > 0
            Dk = D if take[k] else _ONE
            a = (sum_w[k] * s_xl[k] - sum_x[k] * s_l[k]) / Dk
            b = (s_l2[k] * sum_x[k] - s_l[k] * s_xl[k]) / Dk
            ts[k] = s_xl[k] / s_l2[k] if b > 0 else a
            tm[k] = _ZERO if b > 0 else b
        for i in range(n):
            xi, wi, Ai = xt[i], wt[i], Laux[i]
            for k in range(K):
                diff = ts[k] * Ai[k] + tm[k] - xi[k]
                cur[k] += wi[k] * (abs(diff) if use_mad else diff * diff)
        for k in range(K):
            take[k] = take[k] and cur[k] < best[k]
            best[k] = cur[k] if take[k] else best[k]
            scale[k] = ts[k] if take[k] else scale[k]
            mn[k] = tm[k] if take[k] else mn[k]
        for i in range(n):
            Ai, Li = Laux[i], L[i]
            for k in range(K):
                Li[k] = Ai[k] if take[k] else Li[k]
    for k in range(K):
        scale[k] = _ZERO if flat[k] else scale[k]
        the_min[k] = -mn[k]


@njit(cache=True, error_model="numpy")
def _make_qx(xt, wt, has_w, nmax, L, scale):
    """make_qx_quants with rmse_type 1 of every sub-block: x ~ scale * (L - nmax), L in
    0..2 nmax - 1, under weights wt (x^2 when has_w is false)."""
    n, K = xt.shape
    fn = np.float32(nmax)
    mx, amax = np.zeros(K, np.float32), np.zeros(K, np.float32)
    for i in range(n):
        xi = xt[i]
        for k in range(K):
            ax = abs(xi[k])
            bigger = ax > amax[k]
            mx[k] = xi[k] if bigger else mx[k]
            amax[k] = ax if bigger else amax[k]
    zero = np.empty(K, np.bool_)
    sumlx, suml2, best = np.zeros(K, np.float32), np.zeros(K, np.float32), np.empty(K, np.float32)
    iscale = np.empty(K, np.float32)
    for k in range(K):
        zero[k] = amax[k] < _EPS
        mx[k] = _ONE if zero[k] else mx[k]
        iscale[k] = -fn / mx[k]
    for i in range(n):
        xi, wi, Li = xt[i], wt[i], L[i]
        for k in range(K):
            lv = min(fn - _ONE, max(-fn, np.rint(iscale[k] * xi[k])))
            Li[k] = lv + fn
            w = wi[k] if has_w else xi[k] * xi[k]
            sumlx[k] += w * xi[k] * lv
            suml2[k] += w * lv * lv
    for k in range(K):
        scale[k] = sumlx[k] / suml2[k] if suml2[k] != 0 else _ZERO
        best[k] = scale[k] * sumlx[k]
    take = np.empty(K, np.bool_)
    for s in range(-9, 10):
        if s == 0:
            continue
        step = fn + _TENTH * np.float32(s)
        for k in range(K):
            iscale[k] = -step / mx[k]
            sumlx[k], suml2[k] = _ZERO, _ZERO
        for i in range(n):
            xi, wi = xt[i], wt[i]
            for k in range(K):
                lv = min(fn - _ONE, max(-fn, np.rint(iscale[k] * xi[k])))
                w = wi[k] if has_w else xi[k] * xi[k]
                sumlx[k] += w * xi[k] * lv
                suml2[k] += w * lv * lv
        for k in range(K):
            take[k] = suml2[k] > 0 and sumlx[k] * sumlx[k] > best[k] * suml2[k]
            scale[k] = sumlx[k] / suml2[k] if take[k] else scale[k]
            best[k] = scale[k] * sumlx[k] if take[k] else best[k]
        for i in range(n):
            xi, Li = xt[i], L[i]
            for k in range(K):
                lv = min(fn - _ONE, max(-fn, np.rint(iscale[k] * xi[k])))
                Li[k] = lv + fn if take[k] else Li[k]
    for k in range(K):
        scale[k] = _ZERO if zero[k] else scale[k]
    for i in range(n):
        Li = L[i]
        for k in range(K):
            Li[k] = _ZERO if zero[k] else Li[k]


@njit(cache=True, error_model="numpy")
def _lane_sums(wt):
    """Every sub-block's sum of its weights, added in the C code's order (its sw[j])."""
    sw = np.zeros(wt.shape[1], np.float32)
    for i in range(wt.shape[0]):
        wi = wt[i]
        for k in range(wt.shape[1]):
            sw[k] += wi[k]
    return sw


@njit(cache=True, error_model="numpy")
def _lane_errors(xt, mwt, dj, mj, shift, L, err):
    """err[k]: sub-block k's weighted squared error of the values as they decode, dj (L - shift) - mj."""
    n, K = xt.shape
    err[:] = 0.0
    for i in range(n):
        xi, mi, Li = xt[i], mwt[i], L[i]
        for k in range(K):
            e = dj[k] * (Li[k] - shift) - mj[k] - xi[k]
            err[k] += mi[k] * e * e


@njit(cache=True, error_model="numpy")
def _block_sums(err, per, out):
    """out[b]: the sum of err over super-block b's `per` sub-blocks."""
    for b in range(out.shape[0]):
        t = 0.0
        for j in range(per):
            t += err[per * b + j]
        out[b] = t


# ---------------------------------------------------------------------------- Q4_K / Q5_K
@njit(cache=True)
def _pack_scales(ls, lm, sc12):
    """Eight 6-bit scales and mins into 12 bytes, as the C code writes them (byte arithmetic)."""
    for j in range(8):
        a, b = ls[j] & 0xFF, lm[j] & 0xFF
        if j < 4:
            sc12[j], sc12[j + 4] = a, b
        else:
            sc12[j + 4] = (a & 0xF) | ((b & 0xF) << 4)
            sc12[j - 4] = (sc12[j - 4] | ((a >> 4) << 6)) & 0xFF
            sc12[j] = (sc12[j] | ((b >> 4) << 6)) & 0xFF


@njit(cache=True)
def _scale_min(sc12, j):
    """get_scale_min_k4: sub-block j's scale and min multiples as a reader decodes them."""
    if j < 4:
        return sc12[j] & 63, sc12[j + 4] & 63
    return (sc12[j + 4] & 0xF) | ((sc12[j - 4] >> 6) << 4), (sc12[j + 4] >> 4) | ((sc12[j] >> 6) << 4)


@njit(cache=True, error_model="numpy")
def _asym_decoded(d, dmin, sc12, dj, mj):
    """Every sub-block's decoded scale and min, d * sc and dmin * m."""
    for k in range(dj.shape[0]):
        sc, m = _scale_min(sc12[k // 8], k % 8)
        dj[k] = d[k // 8] * np.float32(sc)
        mj[k] = dmin[k // 8] * np.float32(m)


@njit(cache=True, error_model="numpy")
def _asym_levels(xt, nmax, dj, mj, L):
    """The levels against the stored scales (a sub-block whose scale is 0 keeps the levels it has, as
    the C code does: they decode to its min either way)."""
    fn = np.float32(nmax)
    for i in range(xt.shape[0]):
        xi, Li = xt[i], L[i]
        for k in range(xt.shape[1]):
            lv = min(fn, max(_ZERO, np.rint((xi[k] + mj[k]) / dj[k])))
            Li[k] = lv if dj[k] != 0 else Li[k]


@njit(cache=True)
def _asym_ref(xt, nmax, wt, L, Laux, d, dmin, sc12):
    """quantize_row_q{4,5}_K_ref's fit of every super-block: levels into L, d / dmin (fp16 values)
    and the packed multiples into sc12."""
    n, K = xt.shape
    sum_x2 = np.zeros(K, np.float32)
    for i in range(n):
        xi = xt[i]
        for k in range(K):
            sum_x2[k] += xi[k] * xi[k]
    av_x = np.sqrt(sum_x2 / np.float32(32.0))
    for i in range(n):
        xi, wi = xt[i], wt[i]
        for k in range(K):
            wi[k] = av_x[k] + abs(xi[k])
    scales, mins = np.empty(K, np.float32), np.empty(K, np.float32)
    rmin, nstep = (np.float32(-1.0), 20) if nmax == 15 else (np.float32(-0.5), 15)
    _make_qkx(xt, wt, nmax, rmin, _TENTH, nstep, False, L, Laux, scales, mins)
    ls, lm = np.empty(8, np.int64), np.empty(8, np.int64)
    for b in range(K // 8):
        max_scale, max_min = _largest(scales, 8 * b, 8), _largest(mins, 8 * b, 8)
        inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else _ZERO
        inv_min = np.float32(63.0) / max_min if max_min > 0 else _ZERO
        for j in range(8):
            ls[j] = min(63, _nearest(inv_scale * scales[8 * b + j]) & 0xFF)
            lm[j] = min(63, _nearest(inv_min * mins[8 * b + j]) & 0xFF)
        _pack_scales(ls, lm, sc12[b])
        d[b], dmin[b] = _round16(max_scale / np.float32(63.0)), _round16(max_min / np.float32(63.0))


@njit(cache=True)
def _asym_impl(x, xt, impt, has_imp, nmax, wt, L, Laux, d, dmin, sc12):
    """quantize_row_q{4,5}_K_impl's fit of every super-block (its no-imatrix weights when there is
    none): levels into L, d / dmin (fp16 values) and the packed multiples into sc12."""
    n, K = xt.shape
    sigma2 = _sigma2(x, 2.0)
    for i in range(n):
        xi, wi, qi = xt[i], wt[i], impt[i]
        for k in range(K):
            s2 = sigma2[k // 8]
            wi[k] = qi[k] * np.sqrt(s2 + xi[k] * xi[k]) if has_imp else np.sqrt(s2) + abs(xi[k])
    sw = _lane_sums(wt)
    scales, mins = np.empty(K, np.float32), np.empty(K, np.float32)
    _make_qkx(xt, wt, nmax, np.float32(-0.9), np.float32(0.05), 36, False, L, Laux, scales, mins)
    ls, lm = np.empty(8, np.int64), np.empty(8, np.int64)
    for b in range(K // 8):
        db = make_qp(scales, sw, 8 * b, 8, 63, ls)
        mb = make_qp(mins, sw, 8 * b, 8, 63, lm)
        if nmax == 31:  # Q5_K's impl clamps the multiples; Q4_K's writes make_qp's bytes as they are
            for j in range(8):
                ls[j], lm[j] = min(63, ls[j]), min(63, lm[j])
        _pack_scales(ls, lm, sc12[b])
        d[b], dmin[b] = _round16(db), _round16(mb)


@njit(cache=True)
def _asym_row(nudge, nmax, x, impt, has_imp, search, out):
    cols = x.shape[0]
    K, S = cols // 32, cols // 256
    xt, wt, mwt, L, T, Laux = _lanes(x, 32, impt, has_imp)
    d, dmin = np.zeros(S, np.float32), np.zeros(S, np.float32)
    td, tdmin = np.zeros(S, np.float32), np.zeros(S, np.float32)
    sc12, t12 = np.zeros((S, 12), np.int64), np.zeros((S, 12), np.int64)
    dj, mj, err = np.empty(K, np.float32), np.empty(K, np.float32), np.empty(K, np.float64)
    best, cand = np.zeros(S, np.float64), np.zeros(S, np.float64)
    if search or not has_imp:
        _asym_ref(xt, nmax, wt, L, Laux, d, dmin, sc12)
        _asym_decoded(d, dmin, sc12, dj, mj)
        _asym_levels(xt, nmax, dj, mj, L)
        if search:
            _lane_errors(xt, mwt, dj, mj, _ZERO, L, err)
            _block_sums(err, 8, best)
    if search or has_imp:
        _asym_impl(x, xt, impt, has_imp, nmax, wt, T, Laux, td, tdmin, t12)
        _asym_decoded(td, tdmin, t12, dj, mj)
        _asym_levels(xt, nmax, dj, mj, T)
        if search:
            _lane_errors(xt, mwt, dj, mj, _ZERO, T, err)
            _block_sums(err, 8, cand)
        for b in range(S):  # the weighted fit where it is better (llama.cpp's own when not searching)
            if not search or cand[b] < best[b]:
                best[b], d[b], dmin[b] = cand[b], td[b], tdmin[b]
                sc12[b] = t12[b]
                L[:, 8 * b : 8 * b + 8] = T[:, 8 * b : 8 * b + 8]
    if search:
        ls, lm = np.empty(K, np.int64), np.empty(K, np.int64)
        for k in range(K):
            ls[k], lm[k] = _scale_min(sc12[k // 8], k % 8)
        _asym_search(xt, mwt, nudge, nmax, 8, 63, d, dmin, ls, lm, best, L, T)
        for b in range(S):
            _pack_scales(ls[8 * b : 8 * b + 8], lm[8 * b : 8 * b + 8], sc12[b])
    nbytes = 144 if nmax == 15 else 176
    for b in range(S):
        o = b * nbytes
        h, hm = _f16_bits(d[b]), _f16_bits(dmin[b])
        out[o], out[o + 1], out[o + 2], out[o + 3] = h & 0xFF, h >> 8, hm & 0xFF, hm >> 8
        for j in range(12):
            out[o + 4 + j] = sc12[b, j]
        q = o + 16
        if nmax == 31:  # qh: bit j of byte l is the fifth bit of weight l of sub-block j
            for i in range(32):
                hb = 0
                for j in range(8):
                    hb |= (np.int64(L[i, 8 * b + j]) >> 4) << j
                out[o + 16 + i] = hb
            q = o + 48
        for c in range(4):  # two sub-blocks a chunk: the first in the low nibbles, the second in the high
            for i in range(32):
                lo, hi = np.int64(L[i, 8 * b + 2 * c]), np.int64(L[i, 8 * b + 2 * c + 1])
                out[q + 32 * c + i] = (lo & 0xF) | ((hi & 0xF) << 4)


@njit(cache=True, error_model="numpy")
def _keep_better(err, best, T, L):
    """Per sub-block, T's levels where err is lower than best (and best lowered)."""
    better = err < best
    for k in range(err.shape[0]):
        best[k] = err[k] if better[k] else best[k]
    for i in range(L.shape[0]):
        Ti, Li = T[i], L[i]
        for k in range(L.shape[1]):
            Li[k] = Ti[k] if better[k] else Li[k]
    return better


@njit(cache=True, error_model="numpy")
def _lane_decoded(d, dmin, ls, lm, per, dj, mj):
    """Every sub-block's decoded scale and min from its multiples, `per` sub-blocks per super-block."""
    for k in range(dj.shape[0]):
        dj[k] = d[k // per] * np.float32(ls[k])
        mj[k] = dmin[k // per] * np.float32(lm[k])


@njit(cache=True)
def _asym_search(xt, mwt, nudge, nmax, per, lmax, d, dmin, ls, lm, best, L, T):
    """k2quant's search for the asymmetric types, after llama.cpp's fits: the fp16 scale, then the
    fp16 min, nudged by +-0.5% / +-1% (kept per super-block where its error drops); then each
    sub-block's scale and min multiples (0..lmax) one step either way, each sub-block decoding
    independently of the others under the stored d and dmin (kept per sub-block). The levels are
    requantized to every candidate."""
    K, S = xt.shape[1], d.shape[0]
    dj, mj, err = np.empty(K, np.float32), np.empty(K, np.float32), np.empty(K)
    td, tdmin, cand = np.empty(S, np.float32), np.empty(S, np.float32), np.empty(S)
    for key in range(2):
        for n in range(4):
            for b in range(S):
                td[b] = _round16(d[b] * nudge[n]) if key == 0 else d[b]
                tdmin[b] = _round16(dmin[b] * nudge[n]) if key == 1 else dmin[b]
            T[:] = L
            _lane_decoded(td, tdmin, ls, lm, per, dj, mj)
            _asym_levels(xt, nmax, dj, mj, T)
            _lane_errors(xt, mwt, dj, mj, _ZERO, T, err)
            _block_sums(err, per, cand)
            for b in range(S):
                if cand[b] < best[b]:
                    best[b], d[b], dmin[b] = cand[b], td[b], tdmin[b]
                    L[:, per * b : per * b + per] = T[:, per * b : per * b + per]
    lane_best, bls, blm = np.empty(K), ls.copy(), lm.copy()
    _lane_decoded(d, dmin, ls, lm, per, dj, mj)
    _lane_errors(xt, mwt, dj, mj, _ZERO, L, lane_best)
    for a in range(-1, 2):
        for c in range(-1, 2):
            if a == 0 and c == 0:
                continue
            for k in range(K):
                dj[k] = d[k // per] * np.float32(min(lmax, max(0, bls[k] + a)))
                mj[k] = dmin[k // per] * np.float32(min(lmax, max(0, blm[k] + c)))
            T[:] = L
            _asym_levels(xt, nmax, dj, mj, T)
            _lane_errors(xt, mwt, dj, mj, _ZERO, T, err)
            better = _keep_better(err, lane_best, T, L)
            for k in range(K):
                if better[k]:
                    ls[k], lm[k] = min(lmax, max(0, bls[k] + a)), min(lmax, max(0, blm[k] + c))


# ---------------------------------------------------------------------------- Q2_K
@njit(cache=True)
def _q2_ref(xt, wt, L, Laux, d, dmin, sb):
    """quantize_row_q2_K_ref's fit: make_qkx2_quants (|x| weights, absolute error) per sub-block of
    16, the 4-bit multiples over the largest; levels into L, each sub-block's scale byte
    (scale | min << 4) into sb, d / dmin (fp16)."""
    n, K = xt.shape
    for i in range(n):
        xi, wi = xt[i], wt[i]
        for k in range(K):
            wi[k] = abs(xi[k])
    scales, mins = np.empty(K, np.float32), np.empty(K, np.float32)
    _make_qkx(xt, wt, 3, np.float32(-0.5), _TENTH, 15, True, L, Laux, scales, mins)
    fifteen = np.float32(15.0)
    for b in range(K // 16):
        max_scale, max_min = _largest(scales, 16 * b, 16), _largest(mins, 16 * b, 16)
        d[b], dmin[b] = _ZERO, _ZERO
        for j in range(16):
            sb[16 * b + j] = 0
        if max_scale > 0:
            isc = fifteen / max_scale
            for j in range(16):
                sb[16 * b + j] = _nearest(isc * scales[16 * b + j]) & 0xFF
            d[b] = _round16(max_scale / fifteen)
        if max_min > 0:
            isc = fifteen / max_min
            for j in range(16):
                sb[16 * b + j] = (sb[16 * b + j] | (_nearest(isc * mins[16 * b + j]) << 4)) & 0xFF
            dmin[b] = _round16(max_min / fifteen)


@njit(cache=True)
def _q2_impl(x, xt, impt, has_imp, wt, L, Laux, d, dmin, sb):
    """quantize_row_q2_K_impl's fit (sqrt(sigma2 + x^2) weights when there is no imatrix):
    make_qkx3_quants per sub-block, make_qp_quants over each super-block's scales and mins."""
    n, K = xt.shape
    S = K // 16
    sigma2 = _sigma2(x, 1.0)
    for i in range(n):
        xi, wi, qi = xt[i], wt[i], impt[i]
        for k in range(K):
            root = np.sqrt(sigma2[k // 16] + xi[k] * xi[k])
            wi[k] = qi[k] * root if has_imp else root
    sw = _lane_sums(wt)
    scales, mins = np.empty(K, np.float32), np.empty(K, np.float32)
    _make_qkx(xt, wt, 3, np.float32(-0.9), np.float32(0.05), 36, False, L, Laux, scales, mins)
    Ls, Lm = np.empty(16, np.int64), np.empty(16, np.int64)
    for b in range(S):
        d[b] = _round16(make_qp(scales, sw, 16 * b, 16, 15, Ls))
        dmin[b] = _round16(make_qp(mins, sw, 16 * b, 16, 15, Lm))
        for j in range(16):
            sb[16 * b + j] = (Ls[j] | (Lm[j] << 4)) & 0xFF


@njit(cache=True)
def _q2_row(nudge, x, impt, has_imp, search, out):
    cols = x.shape[0]
    K, S = cols // 16, cols // 256
    xt, wt, mwt, L, T, Laux = _lanes(x, 16, impt, has_imp)
    d, dmin = np.zeros(S, np.float32), np.zeros(S, np.float32)
    td, tdmin = np.zeros(S, np.float32), np.zeros(S, np.float32)
    sb, tsb = np.zeros(K, np.int64), np.zeros(K, np.int64)
    dj, mj, err = np.empty(K, np.float32), np.empty(K, np.float32), np.empty(K, np.float64)
    best, cand = np.zeros(S, np.float64), np.zeros(S, np.float64)
    ls, lm = np.empty(K, np.int64), np.empty(K, np.int64)
    for fit in range(2):  # 0: the reference fit, 1: the weighted one
        if not search and fit != (1 if has_imp else 0):
            continue
        if fit == 0:
            _q2_ref(xt, wt, T, Laux, td, tdmin, tsb)
        else:
            _q2_impl(x, xt, impt, has_imp, wt, T, Laux, td, tdmin, tsb)
        for k in range(K):
            ls[k], lm[k] = tsb[k] & 0xF, tsb[k] >> 4
        _lane_decoded(td, tdmin, ls, lm, 16, dj, mj)
        _asym_levels(xt, 3, dj, mj, T)
        if search:
            _lane_errors(xt, mwt, dj, mj, _ZERO, T, err)
            _block_sums(err, 16, cand)
        for b in range(S):
            if not search or fit == 0 or cand[b] < best[b]:
                best[b], d[b], dmin[b] = cand[b], td[b], tdmin[b]
                sb[16 * b : 16 * b + 16] = tsb[16 * b : 16 * b + 16]
                L[:, 16 * b : 16 * b + 16] = T[:, 16 * b : 16 * b + 16]
    if search:
        for k in range(K):
            ls[k], lm[k] = sb[k] & 0xF, sb[k] >> 4
        _asym_search(xt, mwt, nudge, 3, 16, 15, d, dmin, ls, lm, best, L, T)
        for k in range(K):
            sb[k] = ls[k] | (lm[k] << 4)
    for b in range(S):  # 16 scale bytes, 64 bytes of 2-bit levels, d, dmin
        o = b * 84
        for j in range(16):
            out[o + j] = sb[16 * b + j]
        _pack_2bit(L, b, out, o + 16)
        h, hm = _f16_bits(d[b]), _f16_bits(dmin[b])
        out[o + 80], out[o + 81], out[o + 82], out[o + 83] = h & 0xFF, h >> 8, hm & 0xFF, hm >> 8


# ---------------------------------------------------------------------------- Q3_K / Q6_K
# Symmetric types: x ~ d * (q - qoff) * (L - nmax), one multiple q per 16-weight sub-block (per lane).
@njit(cache=True, error_model="numpy")
def _sym_decoded(d, q, qoff, dj, zero):
    """Every sub-block's decoded scale d * (q - qoff), 16 sub-blocks per super-block."""
    for k in range(dj.shape[0]):
        dj[k] = d[k // 16] * np.float32(q[k] - qoff)
        zero[k] = _ZERO


@njit(cache=True, error_model="numpy")
def _sym_levels(xt, nmax, dj, L):
    """The levels against the stored scales, L - nmax in -nmax..nmax-1 (a sub-block whose scale is 0
    keeps the levels it has, as the C code does)."""
    fn = np.float32(nmax)
    for i in range(xt.shape[0]):
        xi, Li = xt[i], L[i]
        for k in range(xt.shape[1]):
            lv = min(fn - _ONE, max(-fn, np.rint(xi[k] / dj[k])))
            Li[k] = lv + fn if dj[k] != 0 else Li[k]


@njit(cache=True)
def _sym_search(xt, mwt, nudge, nmax, qoff, qlo, qhi, d, q, best, L, T):
    """k2quant's search for the symmetric types, after llama.cpp's fits: the fp16 super-block scale
    nudged by +-0.5% / +-1%, then each sub-block's multiple one step either way (within qlo..qhi);
    the levels requantized to each, kept where the error (per super-block, then per sub-block) drops."""
    K, S = xt.shape[1], d.shape[0]
    dj, zero, err = np.empty(K, np.float32), np.zeros(K, np.float32), np.empty(K)
    td, cand = np.empty(S, np.float32), np.empty(S)
    for n in range(4):
        for b in range(S):
            td[b] = _round16(d[b] * nudge[n])
        T[:] = L
        _sym_decoded(td, q, qoff, dj, zero)
        _sym_levels(xt, nmax, dj, T)
        _lane_errors(xt, mwt, dj, zero, np.float32(nmax), T, err)
        _block_sums(err, 16, cand)
        for b in range(S):
            if cand[b] < best[b]:
                best[b], d[b] = cand[b], td[b]
                L[:, 16 * b : 16 * b + 16] = T[:, 16 * b : 16 * b + 16]
    lane_best, base = np.empty(K), q.copy()
    _sym_decoded(d, q, qoff, dj, zero)
    _lane_errors(xt, mwt, dj, zero, np.float32(nmax), L, lane_best)
    for a in (-1, 1):
        for k in range(K):
            dj[k] = d[k // 16] * np.float32(min(qhi, max(qlo, base[k] + a)) - qoff)
        T[:] = L
        _sym_levels(xt, nmax, dj, T)
        _lane_errors(xt, mwt, dj, zero, np.float32(nmax), T, err)
        better = _keep_better(err, lane_best, T, L)
        for k in range(K):
            if better[k]:
                q[k] = min(qhi, max(qlo, base[k] + a))


@njit(cache=True)
def _q6_fit(xt, wt, has_w, L, d, q):
    """quantize_row_q6_K_ref / _impl's fit of every super-block under weights wt (x^2 when has_w
    is false): levels into L, each sub-block's signed multiple into q, d (fp16; 0: a zero block)."""
    K = xt.shape[1]
    scales = np.empty(K, np.float32)
    _make_qx(xt, wt, has_w, 32, L, scales)
    for b in range(K // 16):
        max_scale, max_abs = _largest_magnitude(scales, 16 * b, 16)
        if max_abs < _EPS:  # the C code zeroes the whole block
            L[:, 16 * b : 16 * b + 16] = _ZERO
            q[16 * b : 16 * b + 16] = 0
            d[b] = _ZERO
            continue
        iscale = np.float32(-128.0) / max_scale
        for j in range(16):
            q[16 * b + j] = min(127, _nearest(iscale * scales[16 * b + j]))
        d[b] = _round16(_ONE / iscale)


@njit(cache=True, error_model="numpy")
def _q3_ref(xt, L, d, q):
    """quantize_row_q3_K_ref's fit: make_q3_quants (x^2-weighted, coordinate descent) per sub-block,
    the multiples over the largest; levels into L, the 6-bit multiples (0..63) into q, d (fp16)."""
    n, K = xt.shape
    fn = np.float32(4.0)
    mx, amax = np.zeros(K, np.float32), np.zeros(K, np.float32)
    for i in range(n):
        xi = xt[i]
        for k in range(K):
            bigger = abs(xi[k]) > amax[k]
            mx[k] = xi[k] if bigger else mx[k]
            amax[k] = abs(xi[k]) if bigger else amax[k]
    zero = np.empty(K, np.bool_)
    iscale, sumlx, suml2 = np.empty(K, np.float32), np.zeros(K, np.float32), np.zeros(K, np.float32)
    for k in range(K):
        zero[k] = amax[k] < _EPS
        iscale[k] = -fn / (_ONE if zero[k] else mx[k])
    for i in range(n):
        xi, Li = xt[i], L[i]
        for k in range(K):
            lv = min(fn - _ONE, max(-fn, np.rint(iscale[k] * xi[k])))
            Li[k] = lv
            w = xi[k] * xi[k]
            sumlx[k] += w * xi[k] * lv
            suml2[k] += w * lv * lv
    for _ in range(5):  # a lane with no change in a pass would change nothing in the next either
        for i in range(n):
            xi, Li = xt[i], L[i]
            for k in range(K):
                w = xi[k] * xi[k]
                slx = sumlx[k] - w * xi[k] * Li[k]
                sl2 = suml2[k] - w * Li[k] * Li[k]
                nl = min(fn - _ONE, max(-fn, np.rint(xi[k] * sl2 / slx)))
                slx2 = slx + w * xi[k] * nl
                sl22 = sl2 + w * nl * nl
                take = slx > 0 and nl != Li[k] and sl22 > 0 and slx2 * slx2 * suml2[k] > sumlx[k] * sumlx[k] * sl22
                Li[k] = nl if take else Li[k]
                sumlx[k] = slx2 if take else sumlx[k]
                suml2[k] = sl22 if take else suml2[k]
    scales = np.empty(K, np.float32)
    for k in range(K):
        scales[k] = _ZERO if zero[k] else (sumlx[k] / suml2[k] if suml2[k] > 0 else _ZERO)
    for i in range(n):
        Li = L[i]
        for k in range(K):
            Li[k] = _ZERO if zero[k] else Li[k] + fn
    for b in range(K // 16):
        max_scale = _largest_magnitude(scales, 16 * b, 16)[0]
        if max_scale == 0:
            q[16 * b : 16 * b + 16] = 0
            d[b] = _ZERO
            continue
        isc = np.float32(-32.0) / max_scale
        for j in range(16):
            lv = _nearest(isc * scales[16 * b + j]) & 0xFF  # the C code keeps it in an int8
            lv = lv - 256 if lv > 127 else lv
            q[16 * b + j] = max(-32, min(31, lv)) + 32
        d[b] = _round16(_ONE / isc)


@njit(cache=True)
def _q3_impl(x, xt, impt, has_imp, wt, L, d, q):
    """quantize_row_q3_K_impl's fit (x^2 weights when there is no imatrix): make_qx_quants per
    sub-block, then over each super-block's 16 scales; levels into L, multiples (0..63) into q."""
    n, K = xt.shape
    S = K // 16
    sigma2 = _sigma2(x, 2.0)
    for i in range(n):
        xi, wi, qi = xt[i], wt[i], impt[i]
        for k in range(K):
            wi[k] = qi[k] * np.sqrt(sigma2[k // 16] + xi[k] * xi[k]) if has_imp else xi[k] * xi[k]
    scales = np.empty(K, np.float32)
    _make_qx(xt, wt, True, 4, L, scales)
    sw = _lane_sums(wt)
    st, swt = np.empty((16, S), np.float32), np.empty((16, S), np.float32)
    for k in range(K):  # each super-block's 16 scales as one lane, for make_qx_quants over them
        st[k % 16, k // 16], swt[k % 16, k // 16] = scales[k], sw[k]
    Ls, dblock = np.empty((16, S), np.float32), np.empty(S, np.float32)
    _make_qx(st, swt, True, 32, Ls, dblock)
    for k in range(K):
        q[k] = np.int64(Ls[k % 16, k // 16])
    for b in range(S):
        d[b] = _round16(dblock[b])


@njit(cache=True)
def _sym_row(nudge, kind, x, impt, has_imp, search, out):
    """Q6_K (kind 6) or Q3_K (kind 3): llama.cpp's fit (x^2 weights without an imatrix, the imatrix
    with one); with search, both (plain weights for Q6_K's second without one), the better per
    super-block, then _sym_search."""
    cols = x.shape[0]
    K, S = cols // 16, cols // 256
    nmax, qoff, qlo, qhi = (32, 0, -128, 127) if kind == 6 else (4, 32, 0, 63)
    xt, wt, mwt, L, T, _ = _lanes(x, 16, impt, has_imp)
    d, td = np.zeros(S, np.float32), np.zeros(S, np.float32)
    q, tq = np.zeros(K, np.int64), np.zeros(K, np.int64)
    dj, zero, err = np.empty(K, np.float32), np.empty(K, np.float32), np.empty(K, np.float64)
    best, cand = np.full(S, np.inf), np.zeros(S, np.float64)
    for fit in range(3):  # 0: x^2 weights, 1: the imatrix's, 2: plain weights (Q6_K's search without one)
        if not search and fit != (1 if has_imp else 0) or fit == 1 and not has_imp or fit == 2 and has_imp:
            continue
        if kind == 3 and fit == 2:
            _q3_impl(x, xt, impt, False, wt, T, td, tq)  # the impl's fit under x^2 weights
        elif kind == 3 and fit == 0:
            _q3_ref(xt, T, td, tq)
        elif kind == 3:
            _q3_impl(x, xt, impt, True, wt, T, td, tq)
        else:
            _q6_fit(xt, impt if fit == 1 else mwt, fit != 0, T, td, tq)
        _sym_decoded(td, tq, qoff, dj, zero)
        _sym_levels(xt, nmax, dj, T)
        if search:
            _lane_errors(xt, mwt, dj, zero, np.float32(nmax), T, err)
            _block_sums(err, 16, cand)
        for b in range(S):
            if not search or cand[b] < best[b]:
                best[b], d[b] = cand[b], td[b]
                q[16 * b : 16 * b + 16] = tq[16 * b : 16 * b + 16]
                L[:, 16 * b : 16 * b + 16] = T[:, 16 * b : 16 * b + 16]
    if search:
        _sym_search(xt, mwt, nudge, nmax, qoff, qlo, qhi, d, q, best, L, T)
    for b in range(S):
        if kind == 6:
            _q6_pack(L, q, d, b, out)
        else:
            _q3_pack(L, q, d, b, out)


@njit(cache=True)
def _level(L, w):
    """The level of weight w of the row in the lane layout (sub-blocks of 16)."""
    return np.int64(L[w % 16, w // 16])


@njit(cache=True)
def _pack_2bit(L, b, out, p):
    """Super-block b's low two level bits into 64 bytes at out[p:] (Q2_K's and Q3_K's qs): per 128
    weights, byte i holds weights i, i + 32, i + 64, i + 96."""
    for half in range(2):
        for i in range(32):
            w = 256 * b + 128 * half + i
            v = 0
            for c in range(4):
                v |= (_level(L, w + 32 * c) & 3) << (2 * c)
            out[p + 32 * half + i] = v


@njit(cache=True)
def _q6_pack(L, q, d, b, out):
    o = b * 210
    for half in range(2):  # per 128 weights: ql 64 bytes, qh 32
        p, ph = o + 64 * half, o + 128 + 32 * half
        for i in range(32):
            w = 256 * b + 128 * half + i
            q1, q2, q3, q4 = _level(L, w), _level(L, w + 32), _level(L, w + 64), _level(L, w + 96)
            out[p + i] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            out[p + 32 + i] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            out[ph + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    for j in range(16):
        out[o + 192 + j] = q[16 * b + j] & 0xFF
    h = _f16_bits(d[b])
    out[o + 208], out[o + 209] = h & 0xFF, h >> 8


@njit(cache=True)
def _q3_pack(L, q, d, b, out):
    """hmask (32), qs (64: 2 bits a weight), 12 bytes of 6-bit multiples, d."""
    o = b * 110
    for j in range(32):
        hb = 0
        for m in range(8):  # bit m of hmask byte j: weight 32 m + j's third bit
            hb |= (_level(L, 256 * b + 32 * m + j) >> 2) << m
        out[o + j] = hb
    _pack_2bit(L, b, out, o + 32)
    sc = np.zeros(12, np.int64)
    for j in range(16):
        lv = q[16 * b + j]
        if j < 8:
            sc[j] = lv & 0xF
        else:
            sc[j - 8] |= (lv & 0xF) << 4
        sc[8 + j % 4] |= (lv >> 4) << (2 * (j // 4))
    for j in range(12):
        out[o + 96 + j] = sc[j] & 0xFF
    h = _f16_bits(d[b])
    out[o + 108], out[o + 109] = h & 0xFF, h >> 8


@njit(parallel=True, cache=True)
def _encode(nudge, kind, x, impt, has_imp, search, out):
    for r in prange(x.shape[0]):
        if kind == 6 or kind == 3:
            _sym_row(nudge, kind, x[r], impt, has_imp, search, out[r])
        elif kind == 2:
            _q2_row(nudge, x[r], impt, has_imp, search, out[r])
        else:
            _asym_row(nudge, 15 if kind == 4 else 31, x[r], impt, has_imp, search, out[r])


def encode_kquant(
    x: np.ndarray, importance: np.ndarray | None, type_name: str, search: bool, threads: int
) -> np.ndarray:
    """Rows of float32 weights (rows, cols) -> Q4_K, Q5_K or Q6_K blocks, uint8 (rows, row bytes).

    importance: float32 per column (llama-quantize's imatrix column weights) or None; rows are
    spread over `threads` threads (at most the number numba started with)."""
    kind = KINDS[type_name]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % 256:
        raise ValueError(f"{type_name} needs rows that are a multiple of 256 weights, got {cols}")
    has_imp = importance is not None
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(cols) if has_imp else np.ones(cols, np.float32)
    sub = 32 if kind in (4, 5) else 16
    impt = np.ascontiguousarray(imp.reshape(cols // sub, sub).T)  # the importance as the rows are laid out
    out = np.zeros((rows, cols // 256 * BYTES[kind]), dtype=np.uint8)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _encode(_NUDGE, kind, x, impt, has_imp, search, out)
    return out
