"""IQ1_S and IQ1_M encoders, compiled (numba): llama.cpp's exhaustive split search in float32, then k2quant's.

Both store each group of 8 weights as an index into a grid of 2048 points with coordinates -1, 0
or 1 (gguf-py's IQ1_S grid), shifted by +-1/8 (the sign of the shift stored per block for IQ1_S,
per group for IQ1_M), and a 3-bit multiple per block: value = d * (2 s + 1) * (grid + shift).
IQ1_S: blocks of 32 under an fp16 scale, 50 bytes per 256 (1.56 bpw); IQ1_M: blocks of 16, the
fp16 scale split in four nibbles over the multiples' words, 56 bytes (1.75 bpw).

quantize_row_iq1_s_impl and quantize_row_iq1_m_impl (ggml-quants.c), step for step in float32:
importance weights imatrix * sqrt(sigma2 + x^2) (IQ1_M without an imatrix: x^2); the block's
weights sorted (stably, as glibc's qsort merges) and every split into three groups (-1, 0, 1)
scored exactly with both shifts (IQ1_M: each half's shift apart, from per-half prefix sums);
groups off the grid moved to their best listed neighbour (iq1_find_best_neighbour2) and the scale
refit; d = the largest block scale / 15 (IQ1_S stores d * 1.125; IQ1_M refits d over the whole
super-block with the chosen multiples and stores it * 1.1125). llama.cpp asserts an importance
matrix for IQ1_S (so does k2quant); llama-quantize refuses IQ1_M without one except for token_embd
and output (convert checks that).

`search=True` is iq_grid.search over the stored values (each group's shift kept, the multiples
0..7): llama.cpp's result is kept as a candidate; the lowest importance-weighted error wins per
256 weights. Rows run in parallel;
each row's bytes depend only on that row.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .iq4_kernel import _f16_bits, _round16
from .iq_grid import NUDGE, column_weights, grid_index, search, sigma2_of, tables

_EPS_S = np.float32(1e-12)  # GROUP_MAX_EPS_IQ1_S
_EPS_M = np.float32(1e-7)  # GROUP_MAX_EPS_IQ1_M
_DELTA = np.float32(0.125)  # IQ1S_DELTA = IQ1M_DELTA
_TWO = np.float32(2.0)  # d * (2 s + 1) = d * (0.5 + s) * 2, as iq_grid.search decodes a block
_XP = np.array([-1 + 0.125, 0.125, 1 + 0.125], dtype=np.float32)  # levels 0, 1, 2 shifted up
_XM = np.array([-1 - 0.125, -0.125, 1 - 0.125], dtype=np.float32)  # and down
_MASKS = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.int64)  # IQ1_M: the two groups' shift bits per case
NBYTES = {"IQ1_S": 50, "IQ1_M": 56}


# ---------------------------------------------------------------------------- llama.cpp's steps
@njit(cache=True)
def _neighbour(levels, offsets, nbrs, u, x, w, o, scale, xx):
    """iq1_find_best_neighbour2: of the grid points listed for lattice code u, the one nearest
    x[o:o+8] at `scale` with the shifted levels xx (weights w, not their square roots)."""
    best, gi = np.float32(3.4028235e38), -1
    for t in range(offsets[u], offsets[u + 1]):
        g = nbrs[t]
        d2 = np.float32(0.0)
        for i in range(8):
            diff = scale * xx[levels[g, i]] - x[o + i]
            d2 += w[o + i] * diff * diff
        if d2 < best:
            best, gi = d2, g
    return gi


@njit(cache=True)
def _splits(xb, order, w, n, L):
    """IQ1_S's split search over a block of n: every split of the sorted weights into levels 0 / 1 / 2
    scored with both shifts from prefix sums; L from the best; returns (scale, shift 1 / -1), or
    (0, 0) when no split scores."""
    sumx, sumw = np.zeros(n + 1, np.float32), np.zeros(n + 1, np.float32)
    for j in range(n):
        i = order[j]
        sumx[j + 1] = sumx[j] + w[i] * xb[i]
        sumw[j + 1] = sumw[j] + w[i]
    best, scale = np.float32(-3.4028235e38), np.float32(0.0)
    b1, b2, shift = -1, -1, 0
    for i1 in range(n + 1):
        for i2 in range(i1, n + 1):
            for s in range(2):
                xx = _XP if s == 0 else _XM
                sqx = (sumx[i1] - sumx[0]) * xx[0] + (sumx[i2] - sumx[i1]) * xx[1] + (sumx[n] - sumx[i2]) * xx[2]
                sq2 = (sumw[i1] - sumw[0]) * xx[0] * xx[0] + (sumw[i2] - sumw[i1]) * xx[1] * xx[1]
                sq2 += (sumw[n] - sumw[i2]) * xx[2] * xx[2]
                if sq2 > 0 and sqx * sqx > best * sq2:
                    scale = sqx / sq2
                    best = scale * sqx
                    b1, b2, shift = i1, i2, 1 if s == 0 else -1
    _assign(order, n, b1, b2, L)
    return scale, shift


@njit(cache=True)
def _assign(order, n, b1, b2, L):
    for j in range(n):
        L[order[j]] = 0 if j < b1 else (1 if j < b2 else 2)


@njit(cache=True)
def _splits_m(xb, order, w, L):
    """IQ1_M's split search over a block of 16 with each half's shift apart: (scale, case 0..3)
    (case: bit 1 = first half shifted down, bit 0 = second half), or (0, -1)."""
    n = 16
    px, pw = np.zeros((2, n + 1), np.float32), np.zeros((2, n + 1), np.float32)
    for j in range(n):
        i = order[j]
        h = 0 if i < 8 else 1
        px[h, j + 1] = px[h, j] + w[i] * xb[i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = pw[h, j] + w[i]
        pw[1 - h, j + 1] = pw[1 - h, j]
    p2, m2 = _XP[2], _XM[2]
    cp1 = _XP[0] * _XP[0] - _XP[1] * _XP[1]
    cp2 = _XP[1] * _XP[1] - _XP[2] * _XP[2]
    cm1 = _XM[0] * _XM[0] - _XM[1] * _XM[1]
    cm2 = _XM[1] * _XM[1] - _XM[2] * _XM[2]
    qxp, qxm = np.zeros(2, np.float32), np.zeros(2, np.float32)
    q2p, q2m = np.zeros(2, np.float32), np.zeros(2, np.float32)
    sqx, sq2 = np.zeros(4, np.float32), np.zeros(4, np.float32)
    best, scale = np.float32(-3.4028235e38), np.float32(0.0)
    b1, b2, bk = -1, -1, -1
    for i1 in range(n + 1):
        for i2 in range(i1, n + 1):
            for h in range(2):
                sx = px[h, i1] + px[h, i2]
                qxp[h] = px[h, n] * p2 - sx
                qxm[h] = px[h, n] * m2 - sx
                q2p[h] = pw[h, n] * p2 * p2 + pw[h, i1] * cp1 + pw[h, i2] * cp2
                q2m[h] = pw[h, n] * m2 * m2 + pw[h, i1] * cm1 + pw[h, i2] * cm2
            sqx[0], sqx[1], sqx[2], sqx[3] = qxp[0] + qxp[1], qxp[0] + qxm[1], qxm[0] + qxp[1], qxm[0] + qxm[1]
            sq2[0], sq2[1], sq2[2], sq2[3] = q2p[0] + q2p[1], q2p[0] + q2m[1], q2m[0] + q2p[1], q2m[0] + q2m[1]
            for k in range(4):
                if sq2[k] > 0 and sqx[k] * sqx[k] > best * sq2[k]:
                    scale = sqx[k] / sq2[k]
                    best = scale * sqx[k]
                    b1, b2, bk = i1, i2, k
    _assign(order, n, b1, b2, L)
    return scale, bk


@njit(cache=True)
def _block(levels, kmap, offsets, nbrs, xb, w, n, L, gidx, ib, neg, scale):
    """The block's groups onto the grid (each with its shift, neg[ib, k]) and the scale refit when
    one was off the grid; returns the scale."""
    on = True
    for k in range(n // 8):
        xx = _XM if neg[ib, k] else _XP
        gi = grid_index(levels, kmap, L, 8 * k)
        if gi < 0:
            on = False
            u = 0
            for i in range(8):
                u |= L[8 * k + i] << (2 * i)
            gi = _neighbour(levels, offsets, nbrs, u, xb, w, 8 * k, scale, xx)
        gidx[ib, k] = gi
    if not on:
        sqx, sq2 = np.float32(0.0), np.float32(0.0)
        for k in range(n // 8):
            xx = _XM if neg[ib, k] else _XP
            for j in range(8):
                wj = w[8 * k + j]
                q = xx[levels[gidx[ib, k], j]]
                sqx += wj * q * xb[8 * k + j]
                sq2 += wj * q * q
        if sqx > 0 and sq2 > 0:
            scale = sqx / sq2
    return scale


@njit(cache=True)
def _superblock(levels, kmap, offsets, nbrs, x, imp, has_imp, o, m, gidx, neg, scales):
    """llama.cpp's blocks of the super-block at o (IQ1_S: 8 of 32; IQ1_M, m: 16 of 16): grid indices,
    shifts and block scales; returns the largest block scale."""
    n = 16 if m else 32
    sigma2 = np.float32(2.0) * sigma2_of(x, o)
    w, xb, L = np.empty(n, np.float32), np.empty(n, np.float32), np.ones(n, np.int64)
    max_scale = np.float32(0.0)
    for ib in range(256 // n):
        scales[ib] = 0.0
        gidx[ib, :] = 0
        neg[ib, :] = 0
        mx = np.float32(0.0)
        for i in range(n):
            xb[i] = x[o + n * ib + i]
            w[i] = imp[o + n * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i]) if has_imp else xb[i] * xb[i]
            mx = max(mx, abs(xb[i]))
        if mx < (_EPS_M if m else _EPS_S):
            continue
        order = np.argsort(xb, kind="mergesort")
        if m:
            scale, case = _splits_m(xb, order, w, L)
            if case < 0:
                continue
        else:
            scale, shift = _splits(xb, order, w, n, L)
            if shift == 0:
                continue
            case = 0 if shift == 1 else 3
        if scale < 0:
            for i in range(n):
                L[i] = 2 - L[i]
            scale = -scale
            case = 3 - case
        neg[ib, 0] = case >> 1
        neg[ib, n // 8 - 1] = case & 1
        if not m:
            neg[ib, :] = case >> 1
        scales[ib] = _block(levels, kmap, offsets, nbrs, xb, w, n, L, gidx, ib, neg, scale)
        max_scale = max(max_scale, scales[ib])
    return max_scale


# ---------------------------------------------------------------------------- one row
@njit(cache=True)
def _row(mags, levels, kmap, offsets, nbrs, nudge, m, x, imp, has_imp, search_, out):
    nb, gpb, nbytes = (16, 2, 56) if m else (8, 4, 50)
    gidx, neg = np.zeros((nb, gpb), np.int64), np.zeros((nb, gpb), np.int64)
    unsigned, offs = np.zeros((nb, gpb), np.int64), np.zeros((nb, gpb), np.float32)
    scales, ls = np.zeros(nb, np.float32), np.zeros(nb, np.int64)
    for o in range(0, x.shape[0], 256):
        max_scale = _superblock(levels, kmap, offsets, nbrs, x, imp, has_imp, o, m, gidx, neg, scales)
        ob = o // 256 * nbytes
        for j in range(ob, ob + nbytes):
            out[j] = 0
        if not max_scale:
            continue
        d = max_scale / np.float32(15.0)
        inv = np.float32(1.0) / d
        for ib in range(nb):
            ls[ib] = max(0, min(7, np.int64(np.rint(np.float32(0.5) * (inv * scales[ib] - np.float32(1.0))))))
        if m:  # d refit over the super-block with the chosen multiples, grid points and shifts
            sqx, sq2 = np.float32(0.0), np.float32(0.0)
            sigma2 = np.float32(2.0) * sigma2_of(x, o)
            for ib in range(nb):
                q2l = np.float32(2 * ls[ib] + 1)
                for k in range(2):
                    xx = _XM if neg[ib, k] else _XP
                    for j in range(8):
                        p = o + 16 * ib + 8 * k + j
                        wj = imp[p] * np.sqrt(sigma2 + x[p] * x[p]) if has_imp else x[p] * x[p]
                        q = xx[levels[gidx[ib, k], j]] * q2l
                        sqx += wj * q * x[p]
                        sq2 += wj * q * q
            if sq2 > 0:
                d = sqx / sq2
            D = _round16(d * np.float32(1.1125))
        else:
            D = _round16(d * np.float32(1.125))
        if search_:  # iq_grid's search: unsigned values, each group's grid shifted by its +-1/8
            for ib in range(nb):
                for k in range(gpb):
                    offs[ib, k] = -_DELTA if neg[ib, k] else _DELTA
            D = search(mags, x, imp, o, D, _TWO, 7, ls, gidx, unsigned, offs, nudge)
        h = _f16_bits(D)
        if m:  # 32 low index bytes; per block of 16 the two high 3 bits and shift bits; 4 words of multiples
            for ib in range(16):
                out[ob + 2 * ib] = gidx[ib, 0] & 0xFF
                out[ob + 2 * ib + 1] = gidx[ib, 1] & 0xFF
                out[ob + 32 + ib] = (gidx[ib, 0] >> 8) | ((gidx[ib, 1] >> 8) << 4) | _MASKS[2 * neg[ib, 0] + neg[ib, 1]]
            for q in range(4):
                v = ls[4 * q] | (ls[4 * q + 1] << 3) | (ls[4 * q + 2] << 6) | (ls[4 * q + 3] << 9)
                v |= ((h >> (4 * q)) & 0xF) << 12
                out[ob + 48 + 2 * q], out[ob + 49 + 2 * q] = v & 0xFF, v >> 8
        else:  # fp16 d; 32 low index bytes; per block of 32 a word: 4 x 3 high bits, the multiple, the shift
            out[ob], out[ob + 1] = h & 0xFF, h >> 8
            for ib in range(8):
                v = (ls[ib] << 12) | (neg[ib, 0] << 15)
                for k in range(4):
                    out[ob + 2 + 4 * ib + k] = gidx[ib, k] & 0xFF
                    v |= (gidx[ib, k] >> 8) << (3 * k)
                out[ob + 34 + 2 * ib], out[ob + 35 + 2 * ib] = v & 0xFF, v >> 8


@njit(parallel=True, cache=True)
def _encode(mags, levels, kmap, offsets, nbrs, nudge, m, x, imp, has_imp, search_, out):
    for r in prange(x.shape[0]):
        _row(mags, levels, kmap, offsets, nbrs, nudge, m, x[r], imp, has_imp, search_, out[r])


def encode_iq1(x: np.ndarray, importance: np.ndarray | None, type_name: str, search: bool, threads: int) -> np.ndarray:
    """Rows of float32 weights (rows, cols) -> IQ1_S or IQ1_M blocks, uint8 (rows, row bytes).

    importance: float32 per column (llama-quantize's imatrix column weights); required for IQ1_S."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % 256:
        raise ValueError(f"{type_name} needs rows that are a multiple of 256 weights, got {cols}")
    if importance is None and type_name == "IQ1_S":
        raise ValueError(f"{type_name} needs an importance matrix (llama-quantize refuses it without one)")
    imp, has_imp = column_weights(importance, cols)
    out = np.zeros((rows, cols // 256 * NBYTES[type_name]), dtype=np.uint8)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _encode(*tables("IQ1_S"), NUDGE, type_name == "IQ1_M", x, imp, has_imp, search, out)
    return out
