"""Fused INT4 group encoder: stored weight in, packed nibbles and bf16 scales out, one pass.

`encode_int4` reads the weight as it lies on disk (FP8 e4m3 codes with their float32
block scales, BF16 bits, or float32), decodes one row into a cache-sized float32 buffer,
and for each group finds the scale (round-to-nearest, or the clipping search and the
least-squares refinement of `int4.quantize_int4`), rounds, clamps and packs, with rows
spread over threads (numba `prange`, the GIL released). It replaces about ten full
float32 passes of elementwise torch per weight with one pass over the source bytes.

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
    imp = np.empty(0, np.float32) if importance is None else importance.to(torch.float32).contiguous().numpy()
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
# Written row-wise, each inner loop over one group with no calls or branches inside, so LLVM
# vectorizes them; reductions are integer maxima or sums over eight fixed float64 lanes.
@njit(cache=True, nogil=True, inline="always")
def _to_bf16(b):
    """float32 bits -> the bits of the nearest bf16 (ties to even) as float32 bits, as torch rounds."""
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN
        return np.uint32(0x7FC00000)
    return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << np.uint32(16)


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, inline="always")
def _lane_sum(e, o, gs):
    """Sum of e[o : o + gs] (float64) over eight lanes, in a fixed order."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    for j in range(o, o + gs, 8):
        a0 += e[j]
        a1 += e[j + 1]
        a2 += e[j + 2]
        a3 += e[j + 3]
        a4 += e[j + 4]
        a5 += e[j + 5]
        a6 += e[j + 6]
        a7 += e[j + 7]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, nogil=True)
def _finish_scales(sb, sc):
    """Candidate scales (float32, viewed as bits sb) rounded to bf16, 0 -> 1."""
    for k in range(sb.shape[0]):
        sb[k] = _to_bf16(sb[k])
    for k in range(sc.shape[0]):
        sc[k] = np.float32(1.0) if sc[k] == np.float32(0.0) else sc[k]


@njit(cache=True, nogil=True)
def _score(g, imp, gs, sc, zc, lo_q, e, errs, weighted, asym):
    """errs[k]: the squared (weighted) error of group k's levels round(g / s) (+ z), clamped, summed
    in float64. (Multiplying by 1/s instead of dividing moves levels at near-ties, and the
    refinement then drifts: measured 1e-5 worse per tensor, so the kernel divides, as the reference.)"""
    # one loop per case, with no branch inside, so each vectorizes (a flag tested per element does not)
    for k in range(errs.shape[0]):
        s, z = sc[k], zc[k]
        if asym:
            for j in range(k * gs, (k + 1) * gs):
                v = min(max(np.rint(g[j] / s) + z, lo_q), np.float32(7.0))
                d = np.float64((v - z) * s - g[j])
                e[j] = d * d
        else:
            for j in range(k * gs, (k + 1) * gs):
                v = min(max(np.rint(g[j] / s), lo_q), np.float32(7.0))
                d = np.float64(v * s - g[j])
                e[j] = d * d
    if weighted:
        for j in range(e.shape[0]):
            e[j] *= imp[j]
    for k in range(errs.shape[0]):
        errs[k] = _lane_sum(e, k * gs, gs)


@njit(cache=True, nogil=True)
def _keep_better(errs, sc, zc, best_err, best_s, best_z):
    """Per group, keep the candidate if its error is lower (ties: the earlier); branch-free."""
    for k in range(errs.shape[0]):
        better = errs[k] < best_err[k]
        best_err[k] = errs[k] if better else best_err[k]
        best_s[k] = sc[k] if better else best_s[k]
        best_z[k] = zc[k] if better else best_z[k]


@njit(cache=True, nogil=True)
def _nearest(g, gs, sc, zc, lo_q, q):
    """Levels of the row g for scales sc (zero points zc): g / s rounded (half to even), clamped,
    exactly as quantize_int4 computes them."""
    for k in range(sc.shape[0]):
        s, z = sc[k], zc[k]
        for j in range(k * gs, (k + 1) * gs):
            q[j] = min(max(np.rint(g[j] / s) + z, lo_q), np.float32(7.0))


@njit(cache=True, nogil=True, parallel=True)
def _encode(kind, codes, bscale, bits, f32, br, bc, lut, gs, qmax, symmetric, ratios, refine, imp,
            packed, scale, zero):  # fmt: skip
    rows = packed.shape[0]
    cols = packed.shape[1] * 8
    groups = cols // gs
    div = np.float32(7.5) if qmax == 8 else np.float32(qmax)
    lo_q = np.float32(-qmax) if symmetric else np.float32(-8.0)
    search = ratios.shape[0] > 1 or refine
    weighted = imp.shape[0] > 0
    asym = not symmetric
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for t in prange(tasks):
        g = np.empty(cols, np.float32)  # the decoded row
        gb = g.view(np.uint32)
        q = np.empty(cols, np.float32)  # levels
        e = np.empty(cols, np.float64)  # a candidate's error per element (and the refinement's sums)
        e2 = np.empty(cols, np.float64)
        lo = np.zeros(groups, np.float32)  # each group's range
        hi = np.empty(groups, np.float32)
        hb = hi.view(np.uint32)
        sc = np.empty(groups, np.float32)  # a candidate's scale (and its bits) and zero point
        sb = sc.view(np.uint32)
        zc = np.zeros(groups, np.float32)
        errs = np.empty(groups, np.float64)
        best_err = np.empty(groups, np.float64)
        best_s = np.empty(groups, np.float32)
        bsb = best_s.view(np.uint32)
        best_z = np.zeros(groups, np.float32)
        for r in range(t * ROWS_PER_TASK, min(rows, (t + 1) * ROWS_PER_TASK)):
            _decode_row(kind, codes, bscale, bits, f32, r, br, bc, lut, g)
            for k in range(groups):
                o = k * gs
                if symmetric:  # |max| as the integer maximum of the magnitude bits
                    m = np.uint32(0)
                    for j in range(o, o + gs):
                        m = max(m, gb[j] & np.uint32(0x7FFFFFFF))
                    hb[k] = m
                else:
                    a = g[o]
                    b = g[o]
                    for j in range(o + 1, o + gs):
                        a = min(a, g[j])
                        b = max(b, g[j])
                    lo[k] = min(a, np.float32(0.0))
                    hi[k] = max(b, np.float32(0.0))
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
                if asym:
                    for k in range(groups):
                        zc[k] = min(max(np.float32(-8.0) - np.rint(lo[k] * ratio / sc[k]), np.float32(-8.0)),
                                    np.float32(7.0))  # fmt: skip
                if not search:
                    best_s[:] = sc
                    best_z[:] = zc
                    break
                _score(g, imp, gs, sc, zc, lo_q, e, errs, weighted, asym)
                _keep_better(errs, sc, zc, best_err, best_s, best_z)
            if refine:  # the weighted least-squares scale for the chosen levels, requantized
                _nearest(g, gs, best_s, zc, lo_q, q)
                for j in range(cols):
                    wq = np.float64(q[j] * imp[j] if weighted else q[j])
                    e[j] = wq * g[j]
                    e2[j] = wq * q[j]
                for k in range(groups):
                    s_ls = np.float32(_lane_sum(e, k * gs, gs) / max(_lane_sum(e2, k * gs, gs), 1e-30))
                    sc[k] = s_ls if s_ls > np.float32(0.0) else best_s[k]
                _finish_scales(sb, sc)
                _score(g, imp, gs, sc, zc, lo_q, e, errs, weighted, False)
                _keep_better(errs, sc, zc, best_err, best_s, best_z)
            _nearest(g, gs, best_s, best_z, lo_q, q)
            for k in range(groups):
                scale[r, k] = np.uint16(bsb[k] >> np.uint32(16))
                zero[r, k] = np.int8(best_z[k])
            for w in range(cols // 8):  # eight nibbles per int32, element 0 lowest, each q + 8
                word = np.uint32(0)
                for j in range(8):
                    word |= np.uint32(np.int32(q[w * 8 + j]) + 8) << np.uint32(4 * j)
                packed[r, w] = np.int32(word)
