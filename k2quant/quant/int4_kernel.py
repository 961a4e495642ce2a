"""Fused INT4 group encoder: stored weight in, packed nibbles and bf16 scales out, one pass.

`encode_int4` reads the weight as it lies on disk (FP8 e4m3 codes with their float32
block scales, BF16 bits, or float32), decodes one row into a cache-sized float32 buffer,
and for each group finds the scale (round-to-nearest, or the clipping search and the
least-squares refinement of `int4.quantize_int4`), rounds, clamps and packs, with rows
spread over threads (numba `prange`, the GIL released). It replaces about ten full
float32 passes of elementwise torch per weight with one pass over the source bytes. Each row is
laid out one group per SIMD lane (`_decode_row_t`), and the functions are compiled with numpy's
error model (no per-element division check: a scale is never 0), so every loop vectorizes:
on this machine's AVX-512 cores about 0.8 G weights/s per thread for round-to-nearest and 0.2 for
the search (`bench/int4_speed.py`, one 2048x7168 FP8 expert; before, 0.4 and 0.05).

Bits: every element-wise step is the same IEEE float32 operation as `quantize_int4`'s
torch code (FP8 decode times the block scale, amax / 7.5, round-to-nearest-even to bf16,
division, round half to even, clamp), so round-to-nearest (`search=False`) gives
byte-identical output. The search scores candidates by their squared error summed in
float64 over eight fixed lanes, and the least-squares scale from float64 sums (torch sums
float32 in an order of its own), so on near-ties it may keep another candidate of equal
error; the order is fixed in the code, so the bytes do not depend on the CPU, the thread
count or the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange

from .forms import Stored
from .int4 import CLIP_RATIOS

ROWS_PER_TASK = 16  # rows a thread takes at a time: one row buffer per task, enough tasks to balance 2-64 threads
SRC_FP8, SRC_BF16, SRC_F32 = 0, 1, 2
_FP8_TO_F32 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()


@dataclass
class KernelSource:
    """A 2-D weight as the kernel reads it: `kind` SRC_FP8 (`data` uint8 codes, `scale` float32
    per `block`), SRC_BF16 (`data` uint16 bits) or SRC_F32 (`data` float32)."""

    kind: int
    data: np.ndarray
    scale: np.ndarray | None = None
    block: tuple[int, int] = (128, 128)

    @classmethod
    def from_tensor(cls, w: torch.Tensor) -> KernelSource:
        """A dense float tensor: BF16 read as its bits, any other float dtype as float32."""
        w = w.detach().contiguous()
        if w.dtype == torch.bfloat16:
            return cls(SRC_BF16, w.view(torch.uint16).numpy())
        return cls(SRC_F32, w.to(torch.float32).numpy())

    @classmethod
    def from_fp8_block(cls, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> KernelSource:
        """FP8 e4m3 codes with one float32 scale per block (DeepSeek's release form)."""
        return cls(SRC_FP8, weight.contiguous().view(torch.uint8).numpy(), scale.to(torch.float32).contiguous().numpy(),
                   tuple(block))  # fmt: skip


def kernel_source(w: torch.Tensor | Stored) -> KernelSource:
    """The kernel's view of a weight: a float tensor, or a checkpoint.StoredWeight read in its stored
    form (FP8 blocks and dense BF16 directly; any other form decoded to float32 first)."""
    if isinstance(w, torch.Tensor):
        return KernelSource.from_tensor(w)
    if w.format == "fp8_block" and len(w.shape) == 2:
        return KernelSource.from_fp8_block(w.parts["weight"], w.parts["weight_scale_inv"], w.block)
    if w.format == "dense":
        return KernelSource.from_tensor(w.parts["weight"])
    return KernelSource.from_tensor(w.dequantize())


def set_threads(n: int) -> None:
    """Threads the kernel uses (at most the number numba started with: the machine's cores)."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def encode_int4(
    src: KernelSource,
    group_size: int = 32,
    symmetric: bool = True,
    qmax: int = 8,
    importance: torch.Tensor | None = None,
    search: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed int32 [out, in / 8], bf16 scale [out, groups], int8 zero point [out, groups] | None).

    The same quantization as `int4.quantize_int4` followed by `int4.pack_int4`, from the stored
    form. `importance` (per input channel) weights the search's error."""
    rows, cols = src.data.shape
    if cols % group_size or group_size % 8:
        raise ValueError(f"input width {cols} is not a multiple of group size {group_size} (a multiple of 8)")
    if importance is not None and tuple(importance.shape) != (cols,):
        raise ValueError(f"importance has shape {list(importance.shape)}, expected [{cols}]")
    groups = cols // group_size
    # the importance transposed as the kernel lays out a row (imp[j, k]: element j of group k); ones when
    # unweighted, so one loop serves both (x * 1.0 is x)
    imp = (np.ones((group_size, groups), np.float32) if importance is None else
           np.ascontiguousarray(importance.to(torch.float32).numpy().reshape(groups, group_size).T))  # fmt: skip
    empty_u8, empty_u16 = np.empty((0, 0), np.uint8), np.empty((0, 0), np.uint16)
    empty_f32 = np.empty((0, 0), np.float32)
    codes = src.data if src.kind == SRC_FP8 else empty_u8
    bits = src.data if src.kind == SRC_BF16 else empty_u16
    f32 = src.data if src.kind == SRC_F32 else empty_f32
    bscale = src.scale if src.kind == SRC_FP8 else empty_f32
    ratios = np.array(CLIP_RATIOS if search else (1.0,), dtype=np.float32)
    packed = np.empty((rows, cols // 8), np.int32)
    scale = np.empty((rows, groups), np.uint16)
    zero = np.empty((rows, groups), np.int8)
    _encode(src.kind, codes, bscale, bits, f32, src.block[0], src.block[1], _FP8_TO_F32, group_size, qmax,
            symmetric, ratios, search and symmetric, imp, packed, scale, zero)  # fmt: skip
    return (torch.from_numpy(packed), torch.from_numpy(scale).view(torch.bfloat16),
            None if symmetric else torch.from_numpy(zero))  # fmt: skip


# ---------------------------------------------------------------------------- the kernel
# A row is decoded, then transposed so that t[j, k] is element j of group k: every loop then
# runs across the row's groups (one group per SIMD lane), with no reduction and no branch inside,
# and LLVM vectorizes it. (A loop within one group of 32 does not vectorize: its trip count is
# below the vector width times LLVM's interleave, so it runs in the scalar remainder.) Each
# group's sums keep the order of eight fixed float64 lanes, element j in lane j % 8.
@njit(cache=True, error_model="numpy", nogil=True, inline="always")
def _to_bf16(b):
    """float32 bits -> the bits of the nearest bf16 (ties to even) as float32 bits, as torch rounds."""
    rounded = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << np.uint32(16)
    return np.uint32(0x7FC00000) if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded  # NaN


@njit(cache=True, error_model="numpy", nogil=True)
def _decode_row(kind, codes, bscale, bits, f32, r, br, bc, lut, g):
    """Row r of the weight as float32 into g: FP8 code times its block's scale, BF16 bits, or float32."""
    cols = g.shape[0]
    if kind == SRC_FP8:
        row = codes[r]
        sr = r // br
        for b0 in range(0, cols, bc):
            bs = bscale[sr, b0 // bc]
            for j in range(b0, min(cols, b0 + bc)):
                g[j] = lut[row[j]] * bs
    elif kind == SRC_BF16:
        row16 = bits[r]
        gb = g.view(np.uint32)
        for j in range(cols):
            gb[j] = np.uint32(row16[j]) << np.uint32(16)
    else:
        g[:] = f32[r]


@njit(cache=True, error_model="numpy", nogil=True)
def _decode_row_t(kind, codes, bscale, bits, f32, r, br, bc, lut, g, gscale, t):
    """Row r decoded as `_decode_row` does, into t transposed: t[j, k] = element k * gs + j. FP8 rows
    whose groups each lie in one scale block, BF16 and float32 rows are read straight into t (g and
    gscale are scratch)."""
    gs, groups = t.shape
    if kind == SRC_FP8 and bc % gs == 0:
        row = codes[r]
        for k in range(groups):
            gscale[k] = bscale[r // br, (k * gs) // bc]
        for j in range(gs):
            tj = t[j]
            for k in range(groups):
                tj[k] = lut[row[k * gs + j]] * gscale[k]
    elif kind == SRC_BF16:
        row16 = bits[r]
        tb = t.view(np.uint32)
        for j in range(gs):
            tj = tb[j]
            for k in range(groups):
                tj[k] = np.uint32(row16[k * gs + j]) << np.uint32(16)
    elif kind == SRC_F32:
        row32 = f32[r]
        for j in range(gs):
            tj = t[j]
            for k in range(groups):
                tj[k] = row32[k * gs + j]
    else:
        _decode_row(kind, codes, bscale, bits, f32, r, br, bc, lut, g)
        for j in range(gs):
            tj = t[j]
            for k in range(groups):
                tj[k] = g[k * gs + j]


@njit(cache=True, error_model="numpy", nogil=True)
def _finish_scales(sb, sc):
    """Candidate scales (float32, viewed as bits sb) rounded to bf16, 0 -> 1."""
    for k in range(sb.shape[0]):
        sb[k] = _to_bf16(sb[k])
    for k in range(sc.shape[0]):
        sc[k] = np.float32(1.0) if sc[k] == np.float32(0.0) else sc[k]


@njit(cache=True, error_model="numpy", nogil=True)
def _lanes_total(acc, out):
    """out[k]: group k's eight lane sums added pairwise, ((0+1)+(2+3))+((4+5)+(6+7))."""
    for k in range(out.shape[0]):
        low = (acc[0, k] + acc[1, k]) + (acc[2, k] + acc[3, k])
        out[k] = low + ((acc[4, k] + acc[5, k]) + (acc[6, k] + acc[7, k]))


@njit(cache=True, error_model="numpy", nogil=True)
def _score(t, imp, sc, zc, lo_q, acc, errs):
    """errs[k]: the weighted squared error of group k's levels round(t / s) + z, clamped, summed in
    float64 (imp is all ones when unweighted: x * 1.0 is x). (Multiplying by 1/s instead of dividing
    moves levels at near-ties, and the refinement then drifts: measured 1e-5 worse per tensor, so the
    kernel divides, as the reference.)"""
    gs, groups = t.shape
    acc[:] = 0.0
    for j in range(gs):
        a = acc[j % 8]
        for k in range(groups):
            s, z = sc[k], zc[k]
            v = min(max(np.rint(t[j, k] / s) + z, lo_q), np.float32(7.0))
            d = np.float64((v - z) * s - t[j, k])
            a[k] += d * d * imp[j, k]
    _lanes_total(acc, errs)


@njit(cache=True, error_model="numpy", nogil=True)
def _keep_better(errs, sc, zc, best_err, best_s, best_z):
    """Per group, keep the candidate if its error is lower (ties: the earlier); branch-free."""
    for k in range(errs.shape[0]):
        better = errs[k] < best_err[k]
        best_err[k] = errs[k] if better else best_err[k]
        best_s[k] = sc[k] if better else best_s[k]
        best_z[k] = zc[k] if better else best_z[k]


@njit(cache=True, error_model="numpy", nogil=True)
def _nearest(t, sc, zc, lo_q, q):
    """Levels for scales sc (zero points zc): t / s rounded (half to even), plus z, clamped, exactly
    as quantize_int4 computes them."""
    gs, groups = t.shape
    for j in range(gs):
        for k in range(groups):
            q[j, k] = min(max(np.rint(t[j, k] / sc[k]) + zc[k], lo_q), np.float32(7.0))


@njit(cache=True, error_model="numpy", nogil=True)
def _scratch(gs, groups):
    """The search's working arrays for one row of `groups` groups of gs: levels, two sets of eight
    lane sums, each group's range, a candidate's scale and zero point, errors and the best error."""
    return (np.empty((gs, groups), np.float32), np.empty((8, groups), np.float64), np.empty((8, groups), np.float64),
            np.zeros(groups, np.float32), np.empty(groups, np.float32), np.empty(groups, np.float32),
            np.zeros(groups, np.float32), np.empty(groups, np.float64), np.empty(groups, np.float64),
            np.empty(groups, np.float64))  # fmt: skip


@njit(cache=True, error_model="numpy", nogil=True)
def choose_scales(t, imp, ratios, refine, qmax, symmetric, scratch, best_s, best_z):
    """Each group's scale (and zero point) for the row t laid out one group per lane (t[j, k]:
    element j of group k), as quantize_int4 chooses it: the range (|max| symmetric, min and max
    widened to 0 asymmetric) clipped by each ratio, rounded to bf16, kept where its weighted
    error is lowest; with `refine` the weighted least-squares scale for the chosen levels is tried
    too. One ratio (1.0) without `refine` is round-to-nearest. imp[j, k] weights element j of
    group k (all ones when unweighted). Writes best_s (float32 values of bf16 scales) and best_z."""
    gs, groups = t.shape
    q, acc, acc2, lo, hi, sc, zc, errs, errs2, best_err = scratch
    hb, sb = hi.view(np.uint32), sc.view(np.uint32)
    tb = t.view(np.uint32)
    div = np.float32(7.5) if qmax == 8 else np.float32(qmax)
    lo_q = np.float32(-qmax) if symmetric else np.float32(-8.0)
    search = ratios.shape[0] > 1 or refine
    if symmetric:  # |max| as the integer maximum of the magnitude bits
        hb[:] = 0
        for j in range(gs):
            for k in range(groups):
                hb[k] = max(hb[k], tb[j, k] & np.uint32(0x7FFFFFFF))
    else:  # min and max taken in the element order, then widened to include 0
        lo[:] = t[0]
        hi[:] = t[0]
        for j in range(1, gs):
            for k in range(groups):
                lo[k] = min(lo[k], t[j, k])
                hi[k] = max(hi[k], t[j, k])
        for k in range(groups):
            lo[k] = min(lo[k], np.float32(0.0))
            hi[k] = max(hi[k], np.float32(0.0))
    zc[:] = 0.0
    best_z[:] = 0.0
    best_err[:] = np.inf
    for c in range(ratios.shape[0]):  # candidate scales: the range clipped by each ratio
        ratio = ratios[c]
        if symmetric:  # as quantize_int4: amax * ratio / 7.5 (or / 7), rounded to bf16 (x * 1.0 is x)
            for k in range(groups):
                sc[k] = hi[k] * ratio / div
        else:
            for k in range(groups):
                sc[k] = (hi[k] * ratio - lo[k] * ratio) / np.float32(15.0)
        _finish_scales(sb, sc)
        if not symmetric:
            for k in range(groups):
                zc[k] = min(max(np.float32(-8.0) - np.rint(lo[k] * ratio / sc[k]), np.float32(-8.0)), np.float32(7.0))
        if not search:
            best_s[:] = sc
            best_z[:] = zc
            return
        _score(t, imp, sc, zc, lo_q, acc, errs)
        _keep_better(errs, sc, zc, best_err, best_s, best_z)
    if refine:  # the weighted least-squares scale for the chosen levels, requantized
        _nearest(t, best_s, zc, lo_q, q)
        acc[:] = 0.0
        acc2[:] = 0.0
        for j in range(gs):
            a, a2 = acc[j % 8], acc2[j % 8]
            for k in range(groups):
                wq = np.float64(q[j, k] * imp[j, k])
                a[k] += wq * t[j, k]
                a2[k] += wq * q[j, k]
        _lanes_total(acc, errs)
        _lanes_total(acc2, errs2)
        for k in range(groups):
            s_ls = np.float32(errs[k] / max(errs2[k], 1e-30))
            sc[k] = s_ls if s_ls > np.float32(0.0) else best_s[k]
        _finish_scales(sb, sc)
        _score(t, imp, sc, zc, lo_q, acc, errs)
        _keep_better(errs, sc, zc, best_err, best_s, best_z)


@njit(cache=True, error_model="numpy", nogil=True, parallel=True)
def _encode(kind, codes, bscale, bits, f32, br, bc, lut, gs, qmax, symmetric, ratios, refine, imp,
            packed, scale, zero):  # fmt: skip
    rows = packed.shape[0]
    cols = packed.shape[1] * 8
    groups = cols // gs
    words = gs // 8  # int32 words per group
    lo_q = np.float32(-qmax) if symmetric else np.float32(-8.0)
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        g = np.empty(cols, np.float32)  # the decoded row (where it cannot be decoded in place)
        gscale = np.empty(groups, np.float32)  # each group's FP8 block scale
        t = np.empty((gs, groups), np.float32)  # the row transposed: t[j, k] is element j of group k
        q = np.empty((gs, groups), np.float32)  # levels, transposed
        scratch = _scratch(gs, groups)
        best_s = np.empty(groups, np.float32)
        bsb = best_s.view(np.uint32)
        best_z = np.zeros(groups, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _decode_row_t(kind, codes, bscale, bits, f32, r, br, bc, lut, g, gscale, t)
            choose_scales(t, imp, ratios, refine, qmax, symmetric, scratch, best_s, best_z)
            _nearest(t, best_s, best_z, lo_q, q)
            for k in range(groups):
                scale[r, k] = np.uint16(bsb[k] >> np.uint32(16))
                zero[r, k] = np.int8(best_z[k])
            prow = packed[r]
            for w in range(words):  # eight nibbles per int32, element 0 lowest, each q + 8
                for k in range(groups):
                    word = np.uint32(0)
                    for i in range(8):
                        word |= np.uint32(np.int32(q[w * 8 + i, k]) + 8) << np.uint32(4 * i)
                    prow[k * words + w] = np.int32(word)


@njit(cache=True, error_model="numpy", nogil=True)
def gptq_block(W1, U1, orig, diag, gs, qmax, symmetric, ratios, choose, scales, zeros, Qt, E):
    """One block of GPTQ's column loop (quant/gptq.py), columns as rows: W1[i] is column orig[i] of
    the weight over its rows (updated in place), U1 the block's part of the inverse Hessian's
    upper Cholesky factor. For each column: when `choose` and a group starts there, the group's
    scales from the updated weights W1[i : i + gs] (choose_scales, importance = the Hessian
    diagonal `diag`); then the levels (scales[g], zeros[g]: group g's per-row scale and zero
    point, float32), the error divided by the pivot into E[i], and that error pushed onto the
    block's later columns. The same float32 operations, in the same order, as the torch loop."""
    cols, rows = W1.shape
    lo_q = np.float32(-qmax) if symmetric else np.float32(-8.0)
    scratch = _scratch(gs, rows)
    imp = np.empty((gs, rows), np.float32)
    for i in range(cols):
        c = orig[i]
        g = c // gs
        if choose and c % gs == 0:
            for j in range(gs):
                imp[j, :] = np.float32(diag[c + j])
            choose_scales(W1[i : i + gs], imp, ratios, symmetric, qmax, symmetric, scratch, scales[g], zeros[g])
        s, z, x, e, d = scales[g], zeros[g], W1[i], E[i], U1[i, i]
        qt = Qt[i]
        for k in range(rows):
            q = min(max(np.rint(x[k] / s[k]) + z[k], lo_q), np.float32(7.0))
            qt[k] = np.int8(q)
            e[k] = (x[k] - (q - z[k]) * s[k]) / d
        for j in range(i, cols):
            u = U1[i, j]
            wj = W1[j]
            for k in range(rows):
                wj[k] -= u * e[k]
