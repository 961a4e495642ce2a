"""IQ3_XXS and IQ3_S encoders, compiled (numba): llama.cpp's lattice search in float32, then k2quant's.

Both store each group of 4 weights as an index into a grid of 4 magnitudes on the odd lattice
(1, 3, ..., 15; 256 points for IQ3_XXS, whose top level decodes as 15.5, 512 for IQ3_S), a sign per
weight, and a 4-bit multiple per block of 32 under one fp16 scale per 256 weights. IQ3_XXS: value =
d * (0.5 + s) / 2 * grid * sign, 7 sign bits per 8 weights (the 8th makes the count of minus signs
even), 98 bytes per 256 (3.06 bpw); IQ3_S: value = d * (1 + 2s) * grid * sign, all 8 signs, a
9-bit index, 110 bytes (3.44 bpw). The grids and their neighbour tables are `iq_grid`'s.

quantize_row_iq3_xxs_impl and quantize_row_iq3_s_impl (ggml-quants.c), step for step in float32:
importance weights imatrix * sqrt(sigma2 + x^2), without an imatrix x^2 (sigma2 = 2 sum x^2 / 256);
magnitudes (IQ3_XXS: the sign parity fixed by flipping the weight of least importance); start scale
max / 15; 31 (IQ3_S: 19) scales tried, each weight rounded to the lattice and each group moved to
its best listed grid neighbour; the scale refit (IQ3_XXS: the groups that were off the grid; IQ3_S:
all of them); the fp16 super-scale from the largest block scale / 31, stored times 1.0125 (IQ3_S:
1.033), and a 4-bit multiple per block. llama-quantize refuses IQ3_XXS without an importance matrix
except for token_embd and output (convert checks that); IQ3_S needs none. One difference, on
purpose: llama.cpp's IQ3_S writer does not move past an all-zero block of 32, so the next blocks'
indices and signs land one block early; k2quant writes every block in its place.

`search=True` is iq_grid.search over the stored values. Rows run in parallel; each row's bytes
depend only on that row.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .iq4_kernel import _f16_bits, _round16
from .iq_grid import (
    NUDGE,
    column_weights,
    grid_index,
    multiples,
    prepare,
    refit,
    scan_scales,
    search,
    sigma2_of,
    tables,
)

_EPS_XXS = np.float32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
_ZERO = np.float32(0.0)
_FUDGE = (np.float32(1.033), np.float32(1.0125))  # IQ3_S, IQ3_XXS: llama.cpp's stored-scale factors
_C1 = (np.float32(2.0), np.float32(0.5))  # a block decodes at d * (0.5 + s) * c1
NBYTES = {"IQ3_XXS": 98, "IQ3_S": 110}


@njit(cache=True)
def _blocks(levels, kmap, offsets, nbrs, x, imp, has_imp, o, w, wa, xv, sb, L, La, gidx, signs, scales, xxs):
    """One super-block at o: 8 blocks of 32, 8 groups of 4 each; returns the largest block scale."""
    sigma2 = np.float32(2.0) * sigma2_of(x, o)
    max_scale = _ZERO
    on, on_aux = np.ones(8, dtype=np.bool_), np.ones(8, dtype=np.bool_)
    for ib in range(8):
        b = 32 * ib
        scales[ib] = 0.0
        gidx[ib, :] = 0
        mx = prepare(x, imp, has_imp, _ZERO, o, b, 32, sigma2, w, wa, xv, sb[ib], xxs)
        for i in range(b, b + 32):
            L[i] = 0
        if (xxs and mx < _EPS_XXS) or (not xxs and mx == 0):
            sb[ib, :] = 0
            signs[ib, :] = 0
            continue
        for k in range(8):
            signs[ib, k] = (sb[ib, k // 2] >> (4 * (k % 2))) & 15
        on[:] = xxs
        scale = scan_scales(levels, kmap, offsets, nbrs, xv, w, wa, b, 32, mx, np.float32(15.0), np.float32(0.2),
                            15 if xxs else 9, mx / np.float32(15.0), L, La, on, on_aux)  # fmt: skip
        if not on.all() and scale > 0:  # IQ3_S rounds every group again at the refit scale
            scale = refit(levels, kmap, offsets, nbrs, xv, w, wa, b, 32, scale, L, on, not xxs)
        if scale < 0:  # as the C code guards it (it does not happen)
            scale = -scale
            for j in range(4):
                sb[ib, j] = (~sb[ib, j]) & 0xFF
            for k in range(8):
                signs[ib, k] = (~signs[ib, k]) & 15
        for k in range(8):
            gidx[ib, k] = grid_index(levels, kmap, L, b + 4 * k)
        scales[ib] = scale
        max_scale = max(max_scale, scale)
    return max_scale


@njit(cache=True)
def _row(mags, levels, kmap, offsets, nbrs, nudge, xxs, x, imp, has_imp, search_, out):
    n = x.shape[0]
    nbytes = 98 if xxs else 110
    w, wa, xv = np.empty(256, np.float32), np.empty(256, np.float32), np.empty(256, np.float32)
    L, La = np.zeros(256, np.int64), np.zeros(256, np.int64)
    gidx, signs, sb = np.zeros((8, 8), np.int64), np.zeros((8, 8), np.int64), np.zeros((8, 4), np.int64)
    offs = np.zeros((8, 8), np.float32)  # the grid is not shifted
    scales, ls = np.zeros(8, np.float32), np.zeros(8, np.int64)
    for o in range(0, n, 256):
        max_scale = _blocks(levels, kmap, offsets, nbrs, x, imp, has_imp, o, w, wa, xv, sb, L, La, gidx, signs,
                            scales, xxs)  # fmt: skip
        ob = o // 256 * nbytes
        for j in range(ob, ob + nbytes):
            out[j] = 0
        if not max_scale:
            continue
        d = multiples(scales, max_scale, ls)
        D = _round16(d * _FUDGE[1 if xxs else 0])
        if search_:  # the multiples, then the grid points, against the values as they decode
            D = search(mags, x, imp, o, D, _C1[1 if xxs else 0], 15, ls, gidx, signs, offs, nudge)
        h = _f16_bits(D)
        out[ob], out[ob + 1] = h & 0xFF, h >> 8
        if xxs:  # 64 index bytes; per 32 weights a word of 4 x 7 signs with the multiple in the top 4 bits
            for ib in range(8):
                for k in range(8):
                    out[ob + 2 + 8 * ib + k] = gidx[ib, k]
                q = (sb[ib, 0] & 127) | ((sb[ib, 1] & 127) << 7) | ((sb[ib, 2] & 127) << 14)
                q |= ((sb[ib, 3] & 127) << 21) | (ls[ib] << 28)
                for j in range(4):
                    out[ob + 66 + 4 * ib + j] = (q >> (8 * j)) & 0xFF
        else:  # 64 low index bytes, the indices' 9th bits, 32 sign bytes, the multiples two a byte
            for ib in range(8):
                for k in range(8):
                    out[ob + 2 + 8 * ib + k] = gidx[ib, k] & 0xFF
                    out[ob + 66 + ib] |= (gidx[ib, k] >> 8) << k
                for j in range(4):
                    out[ob + 74 + 4 * ib + j] = sb[ib, j]
            for j in range(4):
                out[ob + 106 + j] = ls[2 * j] | (ls[2 * j + 1] << 4)


@njit(parallel=True, cache=True)
def _encode(mags, levels, kmap, offsets, nbrs, nudge, xxs, x, imp, has_imp, search_, out):
    for r in prange(x.shape[0]):
        _row(mags, levels, kmap, offsets, nbrs, nudge, xxs, x[r], imp, has_imp, search_, out[r])


def encode_iq3(x: np.ndarray, importance: np.ndarray | None, type_name: str, search: bool, threads: int) -> np.ndarray:
    """Rows of float32 weights (rows, cols) -> IQ3_XXS or IQ3_S blocks, uint8 (rows, row bytes).

    importance: float32 per column (llama-quantize's imatrix column weights) or None (llama.cpp's
    no-imatrix weights; the search then scores plain squared error)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % 256:
        raise ValueError(f"{type_name} needs rows that are a multiple of 256 weights, got {cols}")
    imp, has_imp = column_weights(importance, cols)
    out = np.zeros((rows, cols // 256 * NBYTES[type_name]), dtype=np.uint8)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _encode(*tables(type_name), NUDGE, type_name == "IQ3_XXS", x, imp, has_imp, search, out)
    return out
