"""IQ2_XXS and IQ2_XS encoders, compiled (numba): llama.cpp's lattice search in float32, then k2quant's.

Both store each group of 8 weights as an index into a grid of 8 magnitudes (each 0x08, 0x19 or
0x2b; 256 points for IQ2_XXS, 512 for IQ2_XS), 7 sign bits (the 8th makes the count of minus
signs even), and a 4-bit multiple per block under one fp16 scale per 256 weights:
value = d * (0.5 + s) / 4 * grid * sign. IQ2_XXS: blocks of 32, 66 bytes per 256 (2.06 bpw);
IQ2_XS: blocks of 16, 74 bytes (2.31 bpw). The grids are ggml's (taken from gguf-py, which
decodes with them); a lattice point is on the grid or not, and for those that are not, the
nearest grid points (the two smallest squared distances on the lattice of 1, 3, 5) are listed
once (`_tables`), as ggml's iq2xs_init_impl lists them.

quantize_row_iq2_xxs_impl and quantize_row_iq2_xs_impl (ggml-quants.c), step for step in
float32: importance weights imatrix * sqrt(sigma2 + x^2); magnitudes with the sign parity fixed
by flipping the weight of least importance; a start scale (make_qp_quants' for IQ2_XXS, max / 5
for IQ2_XS); 13 (19) scales tried, each weight rounded to the lattice (1, 3, 5) and each group
moved to its best listed grid neighbour; the scale refit; the fp16 super-scale from the largest
block scale / 31 and a 4-bit multiple per block. llama.cpp refuses both without an importance
matrix, and so does k2quant.

`search=True` keeps llama.cpp's result as a candidate and scores what it stores as it decodes
(the grid's real magnitudes, 8 / 25 / 43, are not exactly the lattice's 1 : 3 : 5): each block's
4-bit multiple one step either way, under the fp16 super-scale and under it nudged by +-0.5% /
+-1%; then each group's grid point chosen again against the decoded scale among the whole grid
(signs fixed) and the multiples again. The lowest importance-weighted error wins per 256 weights.
Rows run in parallel; each row's bytes depend only on that row.
"""

from __future__ import annotations

import gguf
import numba
import numpy as np
from numba import njit, prange

from .iq4_kernel import _f16_bits, _round16

_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_NUDGE = np.array([0.99, 0.995, 1.005, 1.01], dtype=np.float32)
KMAP_SIZE = 43692  # 8 lattice levels of 2 bits with each level at most 2: u < 2 * (4^8 - 1) / 3 + 2


def grid(cls=gguf.quants.IQ2_XXS) -> tuple[np.ndarray, np.ndarray]:
    """(magnitudes (G, 8) float32 as gguf-py decodes them, their lattice levels (G, 8) int64 in 0..2)."""
    cls.init_grid()
    mags = np.ascontiguousarray(cls.grid.reshape(-1, 8), dtype=np.float32)
    return mags, np.searchsorted(np.array(cls.grid_map, dtype=np.float32), mags).astype(np.int64)


def _tables(cls=gguf.quants.IQ2_XXS, nwant: int = 2) -> tuple[np.ndarray, ...]:
    """grid(cls), then kmap (KMAP_SIZE,): the grid index of each lattice point or -1, and for the
    points off the grid their neighbours (offsets (KMAP_SIZE + 1,) into one index array): the grid
    points at the `nwant` smallest squared distances, nearest first, ties by grid index."""
    mags, levels = grid(cls)
    code = (levels << (2 * np.arange(8))).sum(1)
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int64)
    kmap[code] = np.arange(len(code))
    pts = 2 * ((np.arange(KMAP_SIZE)[:, None] >> (2 * np.arange(8))) & 3) + 1  # lattice points, levels 1..7
    g = 2 * levels + 1
    dot = (pts.astype(np.float64) @ g.T.astype(np.float64)).astype(np.int64)  # exact: small integers
    d2 = (pts**2).sum(1)[:, None] + (g**2).sum(1)[None] - 2 * dot
    key = np.sort(d2 * len(code) + np.arange(len(code)), axis=1)  # by distance, then grid index
    dist = key // len(code)
    firsts = np.concatenate([np.ones((KMAP_SIZE, 1), bool), dist[:, 1:] != dist[:, :-1]], 1)
    keep = (np.cumsum(firsts, 1) <= nwant) & (kmap < 0)[:, None]  # the nwant nearest distances, off-grid points
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
    return mags, levels, kmap, offsets, (key % len(code))[keep].astype(np.int64)


_TABLES: dict[str, tuple] = {}
CLASSES = {"IQ2_XXS": gguf.quants.IQ2_XXS, "IQ2_XS": gguf.quants.IQ2_XS}


def tables(type_name: str) -> tuple[np.ndarray, ...]:
    """_tables of the type's grid, built once per process (about a second)."""
    if type_name not in _TABLES:
        _TABLES[type_name] = _tables(CLASSES[type_name])
    return _TABLES[type_name]


# ---------------------------------------------------------------------------- llama.cpp's steps
@njit(cache=True)
def _make_qp(x, w, o, n, nmax):
    """make_qp_quants' scale for x[o:o+n] (levels 0..nmax, weights w). The levels are kept as the
    C code keeps them, in bytes, so a negative level reads back as 256 + level."""
    mx = np.float32(0.0)
    for i in range(o, o + n):
        mx = mx if mx > x[i] else x[i]
    if mx < _EPS:
        return np.float32(0.0)
    fn = np.float32(nmax)
    iscale = fn / mx
    L = np.empty(n, dtype=np.int64)
    scale = np.float32(1.0) / iscale
    best = np.float32(0.0)
    for i in range(n):
        L[i] = np.int64(np.rint(iscale * x[o + i])) & 0xFF
        diff = x[o + i] - scale * np.float32(L[i])
        best += w[o + i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        isc = (np.float32(0.1) * np.float32(s) + fn) / mx
        sc = np.float32(1.0) / isc
        mse = np.float32(0.0)
        for i in range(n):
            lv = min(nmax, np.int64(np.rint(isc * x[o + i])))
            diff = x[o + i] - sc * np.float32(lv)
            mse += w[o + i] * diff * diff
        if mse < best:
            best, iscale = mse, isc
    slx, sl2 = np.float32(0.0), np.float32(0.0)
    for i in range(n):
        lv = min(nmax, np.int64(np.rint(iscale * x[o + i])))
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
                nl = min(nmax, np.int64(np.rint(xi * b / a)))
                if nl != L[i]:
                    a += wi * xi * np.float32(nl)
                    b += wi * np.float32(nl) * np.float32(nl)
                    if a * a * sl2 > slx * slx * b:
                        L[i], slx, sl2 = nl & 0xFF, a, b
                        changed += 1
        if not changed:
            break
    return slx / sl2 if sl2 > 0 else np.float32(0.0)


@njit(cache=True)
def _best_neighbour(levels, offsets, nbrs, u, xv, wa, o, scale, L):
    """iq2_find_best_neighbour: of the grid points listed for lattice point u, the one nearest
    xv[o:o+8] (weights wa) at `scale`; its levels into L[o:o+8]; returns its grid index."""
    best, gi = np.float32(np.inf), -1
    for t in range(offsets[u], offsets[u + 1]):
        g = nbrs[t]
        d2 = np.float32(0.0)
        for i in range(8):
            diff = scale * np.float32(2 * levels[g, i] + 1) - xv[o + i]
            d2 += wa[o + i] * diff * diff
        if d2 < best:
            best, gi = d2, g
    for i in range(8):
        L[o + i] = levels[gi, i]
    return gi


@njit(cache=True)
def _to_grid(levels, kmap, offsets, nbrs, xv, wa, o, inv, scale, L):
    """Group xv[o:o+8] rounded to the lattice at 1/inv and moved onto the grid: (its grid index,
    whether the rounded point was on the grid already)."""
    u = 0
    for i in range(8):
        lv = max(0, min(2, np.int64(np.rint(np.float32(0.5) * (inv * xv[o + i] - np.float32(1.0))))))
        L[o + i] = lv
        u |= lv << (2 * i)
    gi = kmap[u]
    if gi >= 0:
        return gi, True
    return _best_neighbour(levels, offsets, nbrs, u, xv, wa, o, scale, L), False


@njit(cache=True)
def _sums(L, xv, w, o, n):
    sqx, sq2 = np.float32(0.0), np.float32(0.0)
    for i in range(o, o + n):
        q = np.float32(2 * L[i] + 1)
        sqx += w[i] * xv[i] * q
        sq2 += w[i] * q * q
    return sqx, sq2


# ---------------------------------------------------------------------------- k2quant's search
# gidx, signs: (blocks, groups per block) grid indices and 8-bit signs of one 256-weight super-block;
# ls: each block's 4-bit multiple of the fp16 super-scale D; a block decodes at D * (0.5 + ls) / 4.
@njit(cache=True)
def _group_error(mags, x, mw, o, db, g, sign):
    """Weighted squared error of x[o:o+8] against grid point g decoded at db with 8 sign bits."""
    err = 0.0
    for i in range(8):
        v = db * mags[g, i]
        if (sign >> i) & 1:
            v = -v
        e = v - x[o + i]
        err += mw[o + i] * e * e
    return err


@njit(cache=True)
def _block_error(mags, x, mw, o, D, ls, gidx, signs, ib):
    gpb = gidx.shape[1]
    db = D * (np.float32(0.5) + np.float32(ls)) * np.float32(0.25)
    err = 0.0
    for k in range(gpb):
        err += _group_error(mags, x, mw, o + 8 * (gpb * ib + k), db, gidx[ib, k], signs[ib, k])
    return err


@njit(cache=True)
def _best_multiples(mags, x, mw, o, D, ls0, gidx, signs, ls):
    """Each block's multiple under super-scale D, ls0 - 1, ls0 or ls0 + 1, the one of lowest error
    into ls; returns the total error."""
    total = 0.0
    for ib in range(gidx.shape[0]):
        be, bl = np.inf, 0
        for step in (-1, 0, 1):
            lc = min(15, max(0, ls0[ib] + step))
            e = _block_error(mags, x, mw, o, D, lc, gidx, signs, ib)
            if e < be:
                be, bl = e, lc
        ls[ib] = bl
        total += be
    return total


@njit(cache=True)
def _regrid(mags, x, mw, o, D, ls, gidx, signs):
    """Each group's grid point chosen again among all of them at its block's decoded scale."""
    gpb = gidx.shape[1]
    for ib in range(gidx.shape[0]):
        db = D * (np.float32(0.5) + np.float32(ls[ib])) * np.float32(0.25)
        for k in range(gpb):
            go = o + 8 * (gpb * ib + k)
            be, bg = _group_error(mags, x, mw, go, db, gidx[ib, k], signs[ib, k]), gidx[ib, k]
            for g in range(mags.shape[0]):
                e = _group_error(mags, x, mw, go, db, g, signs[ib, k])
                if e < be:
                    be, bg = e, g
            gidx[ib, k] = bg


@njit(cache=True)
def _search(mags, x, mw, o, D, ls, gidx, signs, nudge):
    """llama.cpp's (D, ls, gidx) improved against the values as they decode; returns the new D
    (ls and gidx changed in place). Never worse: each step keeps what it starts from as a candidate."""
    nb = gidx.shape[0]
    best = 0.0
    for ib in range(nb):
        best += _block_error(mags, x, mw, o, D, ls[ib], gidx, signs, ib)
    ls0, lc = ls.copy(), np.empty(nb, dtype=np.int64)
    for k in range(5):
        Dk = D if k == 0 else _round16(D * nudge[k - 1])
        e = _best_multiples(mags, x, mw, o, Dk, ls0, gidx, signs, lc)
        if e < best:
            best, D = e, Dk
            ls[:] = lc
    g0 = gidx.copy()
    _regrid(mags, x, mw, o, D, ls, gidx, signs)
    e = _best_multiples(mags, x, mw, o, D, ls, gidx, signs, lc)
    if e < best:
        ls[:] = lc
    else:
        gidx[:] = g0
    return D


# ---------------------------------------------------------------------------- llama.cpp's rows
@njit(cache=True)
def _prepare(x, imp, o, b, n, sigma2, w, wa, xv, signs, ib):
    """Block x[o+b : o+b+n]: importance weights w = imatrix * sqrt(sigma2 + x^2) and wa = sqrt(w);
    magnitudes xv with each group of 8's sign parity made even by flipping its least important
    weight (its 8 sign bits into signs[ib]); returns the largest magnitude."""
    for i in range(b, b + n):
        xi = x[o + i]
        w[i] = imp[o + i] * np.sqrt(sigma2 + xi * xi)
        wa[i] = np.sqrt(w[i])
    for k in range(n // 8):
        g = b + 8 * k
        nflip, s = 0, 0
        for i in range(8):
            xi = x[o + g + i]
            if xi >= 0:
                xv[g + i] = xi
            else:
                xv[g + i] = -xi
                nflip += 1
                s |= 1 << i
        if nflip % 2:
            imin = 0
            mn = w[g] * x[o + g] * x[o + g]
            for i in range(1, 8):
                ax = w[g + i] * x[o + g + i] * x[o + g + i]
                if ax < mn:
                    mn, imin = ax, i
            xv[g + imin] = -xv[g + imin]
            s ^= 1 << imin
        signs[ib, k] = s  # all 8 bits: an even count, so the 7 stored give the 8th
    mx = xv[b]
    for i in range(b + 1, b + n):
        mx = mx if mx > xv[i] else xv[i]
    return mx


@njit(cache=True)
def _sigma2(x, o):
    s2 = np.float32(0.0)
    for i in range(256):
        s2 += x[o + i] * x[o + i]
    return s2 / np.float32(256.0)


@njit(cache=True)
def _finish(levels, kmap, L, b, gpb, signs, gidx, ib, scale):
    """The block's grid indices from its levels; a negative scale made positive, its signs flipped."""
    if scale < 0:  # as the C code guards it (it does not happen)
        scale = -scale
        for k in range(gpb):
            signs[ib, k] = (~signs[ib, k]) & 0xFF
    for k in range(gpb):
        u = 0
        for i in range(8):
            u |= L[b + 8 * k + i] << (2 * i)
        gidx[ib, k] = kmap[u]
    return scale


@njit(cache=True)
def _multiples(scales, max_scale, ls):
    """The fp16-to-be super-scale max / 31 and each block's 4-bit multiple of it."""
    d = max_scale / np.float32(31.0)
    inv = np.float32(1.0) / d
    for ib in range(scales.shape[0]):
        ls[ib] = max(0, min(15, np.int64(np.rint(np.float32(0.5) * (inv * scales[ib] - np.float32(1.0))))))
    return d


@njit(cache=True)
def _xxs_blocks(levels, kmap, offsets, nbrs, x, imp, o, w, wa, xv, L, La, gidx, signs, scales):
    """quantize_row_iq2_xxs_impl for the super-block at o: 8 blocks of 32; returns the largest scale."""
    sigma2 = _sigma2(x, o)
    max_scale = np.float32(0.0)
    for ib in range(8):
        b = 32 * ib
        scales[ib] = 0.0
        gidx[ib, :] = 0
        mx = _prepare(x, imp, o, b, 32, sigma2, w, wa, xv, signs, ib)
        if mx < _EPS:
            signs[ib, :] = 0
            continue
        scale = _make_qp(xv, w, b, 32, 4)
        eff_max = scale * np.float32(3.0)
        if eff_max <= 0:
            signs[ib, :] = 0
            continue
        best = np.float32(0.0)
        for t in range(-6, 7):
            inv = (np.float32(5.0) + np.float32(t) * np.float32(0.1)) / eff_max
            this_scale = np.float32(1.0) / inv
            for k in range(4):
                _to_grid(levels, kmap, offsets, nbrs, xv, wa, b + 8 * k, inv, this_scale, La)
            sqx, sq2 = _sums(La, xv, w, b, 32)
            if sq2 > 0 and sqx * sqx > best * sq2:
                scale = sqx / sq2
                best = scale * sqx
                for i in range(b, b + 32):
                    L[i] = La[i]
        if scale > 0:
            inv = np.float32(1.0) / scale
            for k in range(4):
                _to_grid(levels, kmap, offsets, nbrs, xv, wa, b + 8 * k, inv, scale, L)
            sqx, sq2 = _sums(L, xv, w, b, 32)
            if sq2 > 0:
                scale = sqx / sq2
        scales[ib] = _finish(levels, kmap, L, b, 4, signs, gidx, ib, scale)
        max_scale = max(max_scale, scales[ib])
    return max_scale


@njit(cache=True)
def _xs_blocks(levels, kmap, offsets, nbrs, x, imp, o, w, wa, xv, L, La, gidx, signs, scales):
    """quantize_row_iq2_xs_impl for the super-block at o: 16 blocks of 16; returns the largest scale."""
    sigma2 = _sigma2(x, o)
    max_scale = np.float32(0.0)
    on, on_aux = np.ones(2, dtype=np.bool_), np.ones(2, dtype=np.bool_)
    for ib in range(16):
        b = 16 * ib
        scales[ib] = 0.0
        gidx[ib, :] = 0
        mx = _prepare(x, imp, o, b, 16, sigma2, w, wa, xv, signs, ib)
        for i in range(b, b + 16):
            L[i] = 0
        if mx < _EPS:
            signs[ib, :] = 0
            continue
        best = np.float32(0.0)
        scale = mx / np.float32(5.0)
        on[:] = True
        for t in range(-9, 10):
            inv = (np.float32(5.0) + np.float32(t) * np.float32(0.1)) / mx
            this_scale = np.float32(1.0) / inv
            for k in range(2):
                on_aux[k] = _to_grid(levels, kmap, offsets, nbrs, xv, wa, b + 8 * k, inv, this_scale, La)[1]
            sqx, sq2 = _sums(La, xv, w, b, 16)
            if sq2 > 0 and sqx * sqx > best * sq2:
                scale = sqx / sq2
                best = scale * sqx
                for i in range(b, b + 16):
                    L[i] = La[i]
                on[:] = on_aux
        if (not on[0] or not on[1]) and scale > 0:
            inv = np.float32(1.0) / scale
            for k in range(2):
                if not on[k]:
                    _to_grid(levels, kmap, offsets, nbrs, xv, wa, b + 8 * k, inv, scale, L)
            sqx, sq2 = _sums(L, xv, w, b, 16)
            if sq2 > 0:
                scale = sqx / sq2
        scales[ib] = _finish(levels, kmap, L, b, 2, signs, gidx, ib, scale)
        max_scale = max(max_scale, scales[ib])
    return max_scale


# ---------------------------------------------------------------------------- one row
@njit(cache=True)
def _row(mags, levels, kmap, offsets, nbrs, nudge, xs, x, imp, search, out):
    n = x.shape[0]
    nb, gpb, nbytes = (16, 2, 74) if xs else (8, 4, 66)
    w, wa, xv = np.empty(256, np.float32), np.empty(256, np.float32), np.empty(256, np.float32)
    L, La = np.zeros(256, np.int64), np.zeros(256, np.int64)
    gidx, signs = np.zeros((nb, gpb), np.int64), np.zeros((nb, gpb), np.int64)
    scales, ls = np.zeros(nb, np.float32), np.zeros(nb, np.int64)
    for o in range(0, n, 256):
        if xs:
            max_scale = _xs_blocks(levels, kmap, offsets, nbrs, x, imp, o, w, wa, xv, L, La, gidx, signs, scales)
        else:
            max_scale = _xxs_blocks(levels, kmap, offsets, nbrs, x, imp, o, w, wa, xv, L, La, gidx, signs, scales)
        ob = o // 256 * nbytes
        if not max_scale:
            for j in range(nbytes):
                out[ob + j] = 0
            continue
        D = _round16(_multiples(scales, max_scale, ls))
        if search:  # the multiples, then the grid points, against the values as they decode
            D = _search(mags, x, imp, o, D, ls, gidx, signs, nudge)
        h = _f16_bits(D)
        out[ob], out[ob + 1] = h & 0xFF, h >> 8
        if xs:  # per 16 weights: two (9-bit index | 7 signs << 9); then the 4-bit multiples, two a byte
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
def _encode(mags, levels, kmap, offsets, nbrs, nudge, xs, x, imp, search, out):
    for r in prange(x.shape[0]):
        _row(mags, levels, kmap, offsets, nbrs, nudge, xs, x[r], imp, search, out[r])


def encode_iq2(x: np.ndarray, importance: np.ndarray, type_name: str, search: bool, threads: int) -> np.ndarray:
    """Rows of float32 weights (rows, cols) -> IQ2_XXS or IQ2_XS blocks, uint8 (rows, row bytes).

    importance: float32 per column (llama-quantize's imatrix column weights), required."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % 256:
        raise ValueError(f"{type_name} needs rows that are a multiple of 256 weights, got {cols}")
    xs = type_name == "IQ2_XS"
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(cols)
    out = np.zeros((rows, cols // 256 * (74 if xs else 66)), dtype=np.uint8)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _encode(*tables(type_name), _NUDGE, xs, x, imp, search, out)
    return out
