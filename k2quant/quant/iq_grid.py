"""The lattice grids of ggml's i-quants (IQ1_S / IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), compiled (numba):
the tables llama.cpp's searches look points up in, the steps they share, and k2quant's search.

Each type stores a group of weights (8 for IQ2, 4 for IQ3) as an index into a grid of points of
magnitudes and a sign per weight; a point's coordinates are lattice levels l (0..2 for IQ2, 0..7
for IQ3) that llama.cpp's searches treat as the odd numbers 2l + 1, and that decode as the grid's
real magnitudes (gguf-py's, which k2quant decodes with; for IQ2 0x08 / 0x19 / 0x2b, not exactly
1 : 3 : 5). For every lattice point the rounding can reach, `tables` gives its grid index or, off
the grid, its neighbours: the grid points at the `NWANT` smallest squared distances, nearest first,
ties by grid index, as ggml's iq2xs_init_impl and iq3xs_init_impl list them.

The shared steps (`to_grid`: round a group to the lattice and move it onto the grid at its best
listed neighbour; `lattice_sums`: the weighted least-squares sums of the lattice values) are
llama.cpp's, in float32. `search` is k2quant's: it keeps llama.cpp's result as a candidate and
scores what is stored as it decodes, d * (0.5 + ls) * c1 per block times the grid's magnitudes
(c1 = 1/4 for IQ2, 1/2 for IQ3_XXS, 2 for IQ3_S and IQ1, whose grid values are shifted by +-1/8):
each block's multiple one step either way,
under the fp16 super-scale and under it nudged by +-0.5% / +-1%; then each group's point chosen
again among the whole grid at its block's decoded scale (signs fixed), and the multiples again.
The lowest importance-weighted error wins per 256 weights.
"""

from __future__ import annotations

import gguf
import numpy as np
from numba import njit

from .iq4_kernel import _round16

NUDGE = np.array([0.99, 0.995, 1.005, 1.01], dtype=np.float32)
CLASSES = {
    "IQ2_XXS": gguf.quants.IQ2_XXS,
    "IQ2_XS": gguf.quants.IQ2_XS,
    "IQ2_S": gguf.quants.IQ2_S,
    "IQ3_XXS": gguf.quants.IQ3_XXS,
    "IQ3_S": gguf.quants.IQ3_S,
    "IQ1_S": gguf.quants.IQ1_S,  # IQ1_M's too
}
NWANT = {"IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 1, "IQ3_XXS": 2, "IQ3_S": 3, "IQ1_S": 3}  # ggml's nwant per grid
_TABLES: dict[str, tuple] = {}


def grid(type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(magnitudes (G, group) float32 as gguf-py decodes them, their lattice levels (G, group) int64)."""
    cls = CLASSES[type_name]
    cls.init_grid()
    mags = np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32)
    return mags, np.searchsorted(np.array(cls.grid_map, dtype=np.float32), mags).astype(np.int64)


def _tables(type_name: str) -> tuple[np.ndarray, ...]:
    """grid(type_name), then kmap: the grid index of each lattice code (level i in bits `bits * i`) or
    -1, and for each code the rounding reaches and the grid lacks, its neighbours (offsets
    (len(kmap) + 1,) into one index array)."""
    mags, levels = grid(type_name)
    n, gs = levels.shape
    bits, top, size = (2, 3, 43692) if gs == 8 else (3, 8, 4096)  # ggml's kmap sizes
    shifts = bits * np.arange(gs)
    kmap = np.full(size, -1, dtype=np.int64)
    kmap[(levels << shifts).sum(1)] = np.arange(n)
    lv = (np.arange(size)[:, None] >> shifts) & ((1 << bits) - 1)
    off = np.flatnonzero((lv < top).all(1) & (kmap < 0))  # reachable (levels clamp to 0..top-1), off the grid
    g = 2 * levels + 1
    counts, lists = np.zeros(size, dtype=np.int64), []
    for c in range(0, len(off), 2048):
        p = 2 * lv[off[c : c + 2048]] + 1
        d2 = (p * p).sum(1)[:, None] + (g * g).sum(1)[None] - 2 * (p @ g.T)
        key = np.sort(d2 * n + np.arange(n), axis=1)  # by distance, then grid index
        dist = key // n
        firsts = np.concatenate([np.ones((len(p), 1), bool), dist[:, 1:] != dist[:, :-1]], 1)
        keep = np.cumsum(firsts, 1) <= NWANT[type_name]
        counts[off[c : c + 2048]] = keep.sum(1)
        lists.append((key % n)[keep])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return mags, levels, kmap, offsets, np.concatenate(lists).astype(np.int64)


def column_weights(importance: np.ndarray | None, cols: int) -> tuple[np.ndarray, bool]:
    """The importance as float32 (cols,) and whether there is one (ones without one)."""
    if importance is None:
        return np.ones(cols, np.float32), False
    return np.ascontiguousarray(importance, np.float32).reshape(cols), True


def tables(type_name: str) -> tuple[np.ndarray, ...]:
    """(mags, levels, kmap, offsets, neighbours) of the type's grid, built once per process (about a second)."""
    if type_name not in _TABLES:
        _TABLES[type_name] = _tables(type_name)
    return _TABLES[type_name]


# ---------------------------------------------------------------------------- llama.cpp's steps
@njit(cache=True)
def _best_neighbour(levels, offsets, nbrs, u, xv, wa, o, scale, L):
    """iq2/iq3_find_best_neighbour: of the grid points listed for lattice code u, the one nearest
    xv[o:o+group] (weights wa) at `scale`; its levels into L[o:o+group]; returns its grid index."""
    gs = levels.shape[1]
    best, gi = np.float32(np.inf), -1
    for t in range(offsets[u], offsets[u + 1]):
        g = nbrs[t]
        d2 = np.float32(0.0)
        for i in range(gs):
            diff = scale * np.float32(2 * levels[g, i] + 1) - xv[o + i]
            d2 += wa[o + i] * diff * diff
        if d2 < best:
            best, gi = d2, g
    for i in range(gs):
        L[o + i] = levels[gi, i]
    return gi


@njit(cache=True)
def to_grid(levels, kmap, offsets, nbrs, xv, wa, o, inv, scale, L):
    """Group xv[o:o+group] rounded to the lattice at 1/inv (levels clamped to the grid's range) and
    moved onto the grid: (its grid index, whether the rounded point was on the grid already)."""
    gs = levels.shape[1]
    bits, top = (2, 2) if gs == 8 else (3, 7)
    u = 0
    for i in range(gs):
        lv = max(0, min(top, np.int64(np.rint(np.float32(0.5) * (inv * xv[o + i] - np.float32(1.0))))))
        L[o + i] = lv
        u |= lv << (bits * i)
    gi = kmap[u]
    if gi >= 0:
        return gi, True
    return _best_neighbour(levels, offsets, nbrs, u, xv, wa, o, scale, L), False


@njit(cache=True)
def grid_index(levels, kmap, L, o):
    """The grid index of the levels L[o:o+group] (on the grid by construction)."""
    gs = levels.shape[1]
    bits = 2 if gs == 8 else 3
    u = 0
    for i in range(gs):
        u |= L[o + i] << (bits * i)
    return kmap[u]


@njit(cache=True)
def scan_scales(levels, kmap, offsets, nbrs, xv, w, wa, b, n, mx, top, step, span, scale0, L, La, on, on_aux):
    """llama.cpp's scan of the block xv[b:b+n] over the scales mx / (top + t * step), t in
    -span..span: at each, every group rounded to the lattice and moved onto the grid, and the
    least-squares scale kept when it explains more (its levels into L, which groups were on the grid
    already into `on`); returns that scale, or scale0 when none was kept."""
    gs = levels.shape[1]
    best, scale = np.float32(0.0), scale0
    for t in range(-span, span + 1):
        inv = (top + np.float32(t) * step) / mx
        this_scale = np.float32(1.0) / inv
        for k in range(n // gs):
            on_aux[k] = to_grid(levels, kmap, offsets, nbrs, xv, wa, b + gs * k, inv, this_scale, La)[1]
        sqx, sq2 = lattice_sums(La, xv, w, b, n)
        if sq2 > 0 and sqx * sqx > best * sq2:
            scale = sqx / sq2
            best = scale * sqx
            for i in range(b, b + n):
                L[i] = La[i]
            for k in range(n // gs):
                on[k] = on_aux[k]
    return scale


@njit(cache=True)
def refit(levels, kmap, offsets, nbrs, xv, w, wa, b, n, scale, L, on, every):
    """llama.cpp's last step for a block whose scan left a group off the grid: the groups that were
    off it (`every`: all of them) rounded again at the block's scale and moved onto the grid; returns
    the least-squares scale of the result."""
    gs = levels.shape[1]
    inv = np.float32(1.0) / scale
    for k in range(n // gs):
        if every or not on[k]:
            to_grid(levels, kmap, offsets, nbrs, xv, wa, b + gs * k, inv, scale, L)
    sqx, sq2 = lattice_sums(L, xv, w, b, n)
    return sqx / sq2 if sq2 > 0 else scale


@njit(cache=True)
def lattice_sums(L, xv, w, o, n):
    """sum w x q and sum w q^2 over [o, o+n) for the lattice values q = 2l + 1."""
    sqx, sq2 = np.float32(0.0), np.float32(0.0)
    for i in range(o, o + n):
        q = np.float32(2 * L[i] + 1)
        sqx += w[i] * xv[i] * q
        sq2 += w[i] * q * q
    return sqx, sq2


@njit(cache=True)
def multiples(scales, max_scale, ls):
    """The fp16-to-be super-scale max / 31 and each block's 4-bit multiple of it."""
    d = max_scale / np.float32(31.0)
    inv = np.float32(1.0) / d
    for ib in range(scales.shape[0]):
        ls[ib] = max(0, min(15, np.int64(np.rint(np.float32(0.5) * (inv * scales[ib] - np.float32(1.0))))))
    return d


@njit(cache=True)
def prepare(x, imp, has_imp, c0, o, b, n, sigma2, w, wa, xv, sbytes, parity):
    """Block x[o+b : o+b+n] as llama.cpp's lattice i-quants start it: importance weights
    w = imatrix * sqrt(sigma2 + x^2) (without one, c0 * sigma2 + x^2) and wa = sqrt(w); the
    magnitudes xv and, per 8 weights, the sign bits into sbytes (with `parity`, the count of minus
    signs made even by flipping the weight of least importance, as IQ2_XXS / IQ2_XS / IQ3_XXS
    store 7 of 8 signs); returns the largest magnitude."""
    for i in range(b, b + n):
        xi = x[o + i]
        w[i] = imp[o + i] * np.sqrt(sigma2 + xi * xi) if has_imp else c0 * sigma2 + xi * xi
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
        if parity and nflip % 2:
            imin = 0
            mn = w[g] * x[o + g] * x[o + g]
            for i in range(1, 8):
                ax = w[g + i] * x[o + g + i] * x[o + g + i]
                if ax < mn:
                    mn, imin = ax, i
            xv[g + imin] = -xv[g + imin]
            s ^= 1 << imin
        sbytes[k] = s
    mx = xv[b]
    for i in range(b + 1, b + n):
        mx = mx if mx > xv[i] else xv[i]
    return mx


@njit(cache=True)
def sigma2_of(x, o):
    """sum x^2 / 256 over the super-block at o, in float32 as ggml sums it."""
    s2 = np.float32(0.0)
    for i in range(256):
        s2 += x[o + i] * x[o + i]
    return s2 / np.float32(256.0)


# ---------------------------------------------------------------------------- k2quant's search
# gidx, signs, offs: (blocks, groups per block) grid indices, per-weight sign bits and the shift
# added to the grid's values (IQ1's +-1/8, else 0) of one 256-weight super-block; ls: each block's
# multiple (0..lmax) of the fp16 super-scale D; a block decodes at D * (0.5 + ls) * c1.
@njit(cache=True)
def _group_error(mags, x, mw, o, db, g, sign, off):
    """Weighted squared error of x[o:o+group] against grid point g (shifted by off) decoded at db
    with its sign bits."""
    err = 0.0
    for i in range(mags.shape[1]):
        v = db * (mags[g, i] + off)
        if (sign >> i) & 1:
            v = -v
        e = v - x[o + i]
        err += mw[o + i] * e * e
    return err


@njit(cache=True)
def _block_error(mags, x, mw, o, D, c1, ls, gidx, signs, offs, ib):
    gpb, gs = gidx.shape[1], mags.shape[1]
    db = D * (np.float32(0.5) + np.float32(ls)) * c1
    err = 0.0
    for k in range(gpb):
        err += _group_error(mags, x, mw, o + gs * (gpb * ib + k), db, gidx[ib, k], signs[ib, k], offs[ib, k])
    return err


@njit(cache=True)
def _best_multiples(mags, x, mw, o, D, c1, lmax, ls0, gidx, signs, offs, ls):
    """Each block's multiple under super-scale D, ls0 - 1, ls0 or ls0 + 1, the one of lowest error
    into ls; returns the total error."""
    total = 0.0
    for ib in range(gidx.shape[0]):
        be, bl = np.inf, 0
        for step in (-1, 0, 1):
            lc = min(lmax, max(0, ls0[ib] + step))
            e = _block_error(mags, x, mw, o, D, c1, lc, gidx, signs, offs, ib)
            if e < be:
                be, bl = e, lc
        ls[ib] = bl
        total += be
    return total


@njit(cache=True)
def _regrid(mags, x, mw, o, D, c1, ls, gidx, signs, offs):
    """Each group's grid point chosen again among all of them at its block's decoded scale."""
    gpb, gs = gidx.shape[1], mags.shape[1]
    for ib in range(gidx.shape[0]):
        db = D * (np.float32(0.5) + np.float32(ls[ib])) * c1
        for k in range(gpb):
            go = o + gs * (gpb * ib + k)
            be, bg = _group_error(mags, x, mw, go, db, gidx[ib, k], signs[ib, k], offs[ib, k]), gidx[ib, k]
            for g in range(mags.shape[0]):
                e = _group_error(mags, x, mw, go, db, g, signs[ib, k], offs[ib, k])
                if e < be:
                    be, bg = e, g
            gidx[ib, k] = bg


@njit(cache=True)
def search(mags, x, mw, o, D, c1, lmax, ls, gidx, signs, offs, nudge):
    """llama.cpp's (D, ls, gidx) improved against the values as they decode; returns the new D
    (ls and gidx changed in place). Never worse: each step keeps what it starts from as a candidate."""
    nb = gidx.shape[0]
    best = 0.0
    for ib in range(nb):
        best += _block_error(mags, x, mw, o, D, c1, ls[ib], gidx, signs, offs, ib)
    ls0, lc = ls.copy(), np.empty(nb, dtype=np.int64)
    for k in range(5):
        Dk = D if k == 0 else _round16(D * nudge[k - 1])
        e = _best_multiples(mags, x, mw, o, Dk, c1, lmax, ls0, gidx, signs, offs, lc)
        if e < best:
            best, D = e, Dk
            ls[:] = lc
    g0 = gidx.copy()
    _regrid(mags, x, mw, o, D, c1, ls, gidx, signs, offs)
    e = _best_multiples(mags, x, mw, o, D, c1, lmax, ls, gidx, signs, offs, lc)
    if e < best:
        ls[:] = lc
    else:
        gidx[:] = g0
    return D
