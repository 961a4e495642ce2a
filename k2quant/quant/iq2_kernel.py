"""IQ2_XXS, IQ2_XS and IQ2_S encoders, compiled (numba): llama.cpp's lattice search in float32, then k2quant's.

Each stores a group of 8 weights as an index into a grid of 8 magnitudes (each 0x08, 0x19 or 0x2b;
256 points for IQ2_XXS, 512 for IQ2_XS, 1024 for IQ2_S), its signs, and a 4-bit multiple per block
under one fp16 scale per 256 weights: value = d * (0.5 + s) / 4 * grid * sign. IQ2_XXS: blocks of
32, 7 sign bits per group (the 8th makes the count of minus signs even), 66 bytes per 256 (2.06
bpw); IQ2_XS: blocks of 16, the same signs, 74 bytes (2.31 bpw); IQ2_S: blocks of 16, all 8 signs,
a 10-bit index, 82 bytes (2.56 bpw). The grids and their neighbour tables are `iq_grid`'s.

quantize_row_iq2_xxs_impl, quantize_row_iq2_xs_impl and quantize_row_iq2_s_impl (ggml-quants.c),
step for step in float32: importance weights imatrix * sqrt(sigma2 + x^2) (IQ2_S without an
imatrix: sigma2 / 4 + x^2); magnitudes (IQ2_XXS / IQ2_XS: the sign parity fixed by flipping the
weight of least importance); a start scale (make_qp_quants' for IQ2_XXS, max / 5 for the others);
13 (19) scales tried, each weight rounded to the lattice (1, 3, 5) and each group moved to its best
listed grid neighbour; the scale refit; the fp16 super-scale from the largest block scale / 31
(IQ2_S stores it times 0.9875) and a 4-bit multiple per block. llama.cpp refuses IQ2_XXS and
IQ2_XS without an importance matrix (its code asserts one), and so does k2quant; llama-quantize
also refuses IQ2_S without one except for token_embd and output, which convert checks.

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
from .kquant_kernel import make_qp

_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_EPS_S = np.float32(1e-8)  # GROUP_MAX_EPS_IQ2_S
_QUARTER = np.float32(0.25)
_FIVE, _TENTH = np.float32(5.0), np.float32(0.1)  # the scan's centre (2 kMaxQ - 1) and step
KINDS = {"IQ2_XXS": 0, "IQ2_XS": 1, "IQ2_S": 2}
_LAYOUT = {0: (8, 4, 66), 1: (16, 2, 74), 2: (16, 2, 82)}  # blocks, groups per block, bytes per 256


# ---------------------------------------------------------------------------- llama.cpp's rows
@njit(cache=True)
def _finish(levels, kmap, L, b, gpb, signs, gidx, ib, scale, nbits):
    """The block's grid indices from its levels; a negative scale made positive, its signs flipped."""
    if scale < 0:  # as the C code guards it (it does not happen)
        scale = -scale
        for k in range(gpb):
            signs[ib, k] = (~signs[ib, k]) & ((1 << nbits) - 1)
    for k in range(gpb):
        gidx[ib, k] = grid_index(levels, kmap, L, b + 8 * k)
    return scale


@njit(cache=True)
def _xxs_blocks(levels, kmap, offsets, nbrs, x, imp, o, w, wa, xv, L, La, gidx, signs, scales):
    """quantize_row_iq2_xxs_impl for the super-block at o: 8 blocks of 32; returns the largest scale."""
    sigma2 = sigma2_of(x, o)
    max_scale = np.float32(0.0)
    on, on_aux = np.ones(4, dtype=np.bool_), np.ones(4, dtype=np.bool_)  # unused: every group is rounded again
    qp_levels = np.empty(32, np.int64)
    for ib in range(8):
        b = 32 * ib
        scales[ib] = 0.0
        gidx[ib, :] = 0
        mx = prepare(x, imp, True, 0.0, o, b, 32, sigma2, w, wa, xv, signs[ib], True)
        if mx < _EPS:
            signs[ib, :] = 0
            continue
        scale = make_qp(xv, w, b, 32, 4, qp_levels)
        eff_max = scale * np.float32(3.0)
        if eff_max <= 0:
            signs[ib, :] = 0
            continue
        scale = scan_scales(levels, kmap, offsets, nbrs, xv, w, wa, b, 32, eff_max, _FIVE, _TENTH, 6, scale, L, La,
                            on, on_aux)  # fmt: skip
        if scale > 0:
            scale = refit(levels, kmap, offsets, nbrs, xv, w, wa, b, 32, scale, L, on, True)
        scales[ib] = _finish(levels, kmap, L, b, 4, signs, gidx, ib, scale, 8)
        max_scale = max(max_scale, scales[ib])
    return max_scale


@njit(cache=True)
def _xs_blocks(levels, kmap, offsets, nbrs, x, imp, has_imp, o, w, wa, xv, L, La, gidx, signs, scales, kind):
    """quantize_row_iq2_xs_impl (kind 1) or quantize_row_iq2_s_impl (kind 2) for the super-block
    at o: 16 blocks of 16; returns the largest scale."""
    sigma2 = sigma2_of(x, o)
    if kind == 2:
        sigma2 = np.float32(2.0) * sigma2
    eps = _EPS if kind == 1 else _EPS_S
    max_scale = np.float32(0.0)
    on, on_aux = np.ones(2, dtype=np.bool_), np.ones(2, dtype=np.bool_)
    for ib in range(16):
        b = 16 * ib
        scales[ib] = 0.0
        gidx[ib, :] = 0
        mx = prepare(x, imp, has_imp, _QUARTER, o, b, 16, sigma2, w, wa, xv, signs[ib], kind == 1)
        for i in range(b, b + 16):
            L[i] = 0
        if mx < eps:
            signs[ib, :] = 0
            continue
        on[:] = True
        scale = scan_scales(levels, kmap, offsets, nbrs, xv, w, wa, b, 16, mx, _FIVE, _TENTH, 9, mx / _FIVE, L, La,
                            on, on_aux)  # fmt: skip
        if (not on[0] or not on[1]) and scale > 0:
            scale = refit(levels, kmap, offsets, nbrs, xv, w, wa, b, 16, scale, L, on, False)
        scales[ib] = _finish(levels, kmap, L, b, 2, signs, gidx, ib, scale, 8)
        max_scale = max(max_scale, scales[ib])
    return max_scale


# ---------------------------------------------------------------------------- one row
@njit(cache=True)
def _row(mags, levels, kmap, offsets, nbrs, nudge, kind, x, imp, has_imp, search_, out):
    n = x.shape[0]
    nb, gpb, nbytes = (8, 4, 66) if kind == 0 else (16, 2, 74 if kind == 1 else 82)
    w, wa, xv = np.empty(256, np.float32), np.empty(256, np.float32), np.empty(256, np.float32)
    L, La = np.zeros(256, np.int64), np.zeros(256, np.int64)
    gidx, signs = np.zeros((nb, gpb), np.int64), np.zeros((nb, gpb), np.int64)
    offs = np.zeros((nb, gpb), np.float32)  # the grid is not shifted
    scales, ls = np.zeros(nb, np.float32), np.zeros(nb, np.int64)
    for o in range(0, n, 256):
        if kind == 0:
            max_scale = _xxs_blocks(levels, kmap, offsets, nbrs, x, imp, o, w, wa, xv, L, La, gidx, signs, scales)
        else:
            max_scale = _xs_blocks(levels, kmap, offsets, nbrs, x, imp, has_imp, o, w, wa, xv, L, La, gidx, signs,
                                   scales, kind)  # fmt: skip
        ob = o // 256 * nbytes
        if not max_scale:
            for j in range(nbytes):
                out[ob + j] = 0
            continue
        d = multiples(scales, max_scale, ls)
        D = _round16(d * np.float32(0.9875)) if kind == 2 else _round16(d)
        if search_:  # the multiples, then the grid points, against the values as they decode
            D = search(mags, x, imp, o, D, _QUARTER, 15, ls, gidx, signs, offs, nudge)
        h = _f16_bits(D)
        out[ob], out[ob + 1] = h & 0xFF, h >> 8
        if kind == 2:  # 32 low index bytes, 32 sign bytes, the indices' top 2 bits, the multiples
            for j in range(ob + 2, ob + 82):
                out[j] = 0
            for ib in range(16):
                for k in range(2):
                    i8 = 2 * ib + k
                    out[ob + 2 + i8] = gidx[ib, k] & 0xFF
                    out[ob + 34 + i8] = signs[ib, k]
                    out[ob + 66 + i8 // 4] |= (gidx[ib, k] >> 8) << (2 * (i8 % 4))
            for j in range(8):
                out[ob + 74 + j] = ls[2 * j] | (ls[2 * j + 1] << 4)
        elif kind == 1:  # per 16 weights: two (9-bit index | 7 signs << 9); then the 4-bit multiples
            for ib in range(16):
                for k in range(2):
                    q = gidx[ib, k] | ((signs[ib, k] & 127) << 9)
                    p = ob + 2 + 4 * ib + 2 * k
                    out[p], out[p + 1] = q & 0xFF, q >> 8
            for j in range(8):
                out[ob + 66 + j] = ls[2 * j] | (ls[2 * j + 1] << 4)
        else:  # per 32 weights: four 8-bit indices; then 4 x 7 signs and the multiple in the top 4 bits
            for ib in range(8):
                q0 = gidx[ib, 0] | (gidx[ib, 1] << 8) | (gidx[ib, 2] << 16) | (gidx[ib, 3] << 24)
                q1 = (signs[ib, 0] & 127) | ((signs[ib, 1] & 127) << 7) | ((signs[ib, 2] & 127) << 14)
                q1 |= ((signs[ib, 3] & 127) << 21) | (ls[ib] << 28)
                p = ob + 2 + 8 * ib
                for j in range(4):
                    out[p + j] = (q0 >> (8 * j)) & 0xFF
                    out[p + 4 + j] = (q1 >> (8 * j)) & 0xFF


@njit(parallel=True, cache=True)
def _encode(mags, levels, kmap, offsets, nbrs, nudge, kind, x, imp, has_imp, search_, out):
    for r in prange(x.shape[0]):
        _row(mags, levels, kmap, offsets, nbrs, nudge, kind, x[r], imp, has_imp, search_, out[r])


def encode_iq2(x: np.ndarray, importance: np.ndarray | None, type_name: str, search: bool, threads: int) -> np.ndarray:
    """Rows of float32 weights (rows, cols) -> IQ2_XXS, IQ2_XS or IQ2_S blocks, uint8 (rows, row bytes).

    importance: float32 per column (llama-quantize's imatrix column weights); required for IQ2_XXS
    and IQ2_XS. Without one, IQ2_S runs llama.cpp's no-imatrix weights and scores plain error."""
    kind = KINDS[type_name]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % 256:
        raise ValueError(f"{type_name} needs rows that are a multiple of 256 weights, got {cols}")
    if importance is None and kind != 2:
        raise ValueError(f"{type_name} needs an importance matrix (llama-quantize refuses it without one)")
    imp, has_imp = column_weights(importance, cols)
    out = np.zeros((rows, cols // 256 * _LAYOUT[kind][2]), dtype=np.uint8)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _encode(*tables(type_name), NUDGE, kind, x, imp, has_imp, search, out)
    return out
