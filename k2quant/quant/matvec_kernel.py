"""CPU products straight from stored weights: the runner's decode kernels for FP8 and BF16.

Kimi K2 ships its attention, shared experts and dense MLP as FP8 e4m3 with one float32 scale
per 128x128 block (K2-Thinking: BF16). A decoding token reads each of those weights once, so
its speed is the speed of one pass over the stored bytes: these kernels make that pass
without a float copy of the weight. Every function takes a `Codes` (FP8: the e4m3 codes,
row-major [n, k], and the scales per (br, bc) block, any block shape: DeepSeek's 128x128, per
channel (1, k), per tensor (n, k); BF16: the bits); activations are float32, results float32.

- `matvec(w, x, groups, stride, offset, rows)`: y = x W^T for a few rows of x (decode),
  optionally per group of rows (absorbed attention's W_vb: head h reads rows
  h*stride + offset ...);
  also for a bf16 weight (lm_head, K2-Thinking's attention; `matvec_bf16` for a tensor);
- `vecmat(w, x, stride)`: y = x W over the first rows of each group (absorbed attention's
  W_kb: q_nope of head h through rows h*stride ...), vectorized along the columns;
- `decode_bf16(w, r0, r1, out)`: rows of the FP8 weight in bf16 (round to nearest even,
  exactly torch's `.to(torch.bfloat16)` of the float32 dequantization), for the matmuls of
  long prompts, a chunk of rows at a time into one reused buffer.

The matvecs sum eight rows at a time, sharing each load of x, every stored value widened in
the register that multiplies it (`_dot8`). Widening an e4m3 code is two integer operations:
its byte, sign-extended to 32 bits and shifted left by 20, masked to the sign and the low 7
bits, is the float32 whose value is the code's times 2^-120 (exponent and mantissa land in
float32's fields; e4m3 subnormals become float32 subnormals, exactly). The 2^120 is folded
into the block scale, so the decoded value times the scale is the stored weight; the NaN
codes (0x7f, 0xff), which no quantizer writes, decode to +-480. A bf16 value is its bits
shifted left by 16. Compiled with fastmath (the sums may be reassociated at compile time),
each output element is summed by one thread in a fixed order: the result does not depend on
the thread count or the run. On this machine's AVX-512 cores, 2 threads, K2's layer shapes
from RAM: the FP8 matvec streams 19 GB/s of codes, 2.0x the weights per second of torch's bf16
F.linear on the same weights; the bf16 matvec 1.3x torch's (`bench/matvec.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange

UNSCALE = np.float32(2.0**120)  # decoded value = code value * 2^-120; folded into the scales
_MASK = np.int32(np.uint32(0x87F00000).view(np.int32))  # float32 sign and the 7 bits of exponent and mantissa
ROWS = 8  # rows a matvec task sums together, sharing each load of x


@dataclass(frozen=True)
class Codes:
    """A weight as the kernels read it: `codes` [n, k] (int8 e4m3 codes, or uint16 bf16 bits), `scale`
    float32 [ceil(n / br), ceil(k / bc)] (for FP8 times 2^120; 1 for bf16), `block` (br, bc)."""

    codes: np.ndarray
    scale: np.ndarray
    block: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.codes.dtype == np.uint16

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> Codes:
        """From a float8_e4m3fn weight and its scale: per block (`block` given), per channel ([n, 1] or
        [n]) or per tensor (one value). The codes are shared with `weight`, never copied."""
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise ValueError(f"FP8 kernels need a 2-D float8_e4m3fn weight, not {weight.dtype} {tuple(weight.shape)}")
        n, k = weight.shape
        s = scale.to(torch.float32)
        if block is None:
            if s.numel() == 1:
                s, block = s.reshape(1, 1), (n, k)
            elif s.numel() == n:
                s, block = s.reshape(n, 1), (1, k)
            else:
                raise ValueError(f"FP8 scale of shape {tuple(scale.shape)} fits no channel or tensor of {n}x{k}")
        br, bc = block
        if tuple(s.shape) != (-(-n // br), -(-k // bc)):
            raise ValueError(f"FP8 scale of shape {tuple(scale.shape)} does not match {n}x{k} in {br}x{bc} blocks")
        scaled = s * float(UNSCALE)
        if not bool(torch.isfinite(scaled).all()):
            raise ValueError("FP8 scale has a value that is not finite, or over 2^8 (the kernels scale it by 2^120)")
        codes = weight.contiguous().view(torch.int8).numpy()
        return cls(codes, scaled.contiguous().numpy(), (int(br), int(bc)))

    @classmethod
    def from_bf16(cls, weight: torch.Tensor) -> Codes:
        """From a contiguous 2-D bf16 weight, shared, never copied."""
        if weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
            raise ValueError(f"bf16 kernels need a contiguous 2-D bf16 weight, not {weight.dtype} "
                             f"{tuple(weight.shape)}")  # fmt: skip
        return cls(weight.view(torch.int16).numpy().view(np.uint16), np.ones((1, 1), np.float32), tuple(weight.shape))

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes


def warm() -> None:
    """Run every kernel once on tiny weights of both kinds, so that their compiled code is loaded from
    numba's cache (about 0.3 s; compiled on first use ever, about 10 s) before anything is timed."""
    w = torch.ones(8, 16)
    for codes in (Codes.from_bf16(w.bfloat16()), Codes.from_fp8(w.to(torch.float8_e4m3fn), torch.ones(1), None)):
        matvec(codes, torch.ones(1, 1, 16))
        vecmat(codes, torch.ones(1, 2, 4), 4)
    decode_bf16(codes)


def set_threads(n: int) -> None:
    """Threads the kernels use (at most the number numba started with: the machine's cores)."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _follow_torch() -> None:
    """Every call runs on as many threads as torch does (the runner's --threads)."""
    set_threads(torch.get_num_threads())


@njit(cache=True, fastmath=True, error_model="numpy", nogil=True, inline="always")
def _code(code):
    """The float32 of an e4m3 code (int8) times 2^-120."""
    return np.int32(np.int32(np.int32(code) << np.int32(20)) & _MASK).view(np.float32)


@njit(cache=True, fastmath=True, error_model="numpy", nogil=True, inline="always")
def _bf16(bits):
    """The float32 of a bf16 value's bits (uint16)."""
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@njit(cache=True, fastmath=True, error_model="numpy", nogil=True, inline="always")
def _rows(w, r0, last):
    """Rows r0 .. r0 + 7 of w, each past `last` replaced by row `last` (computed, never written)."""
    return (w[r0], w[min(r0 + 1, last)], w[min(r0 + 2, last)], w[min(r0 + 3, last)], w[min(r0 + 4, last)],
            w[min(r0 + 5, last)], w[min(r0 + 6, last)], w[min(r0 + 7, last)])  # fmt: skip


@njit(cache=True, fastmath=True, error_model="numpy", nogil=True, inline="always")
def _dot8(w, x, c0, n, decode):
    """The eight sums over columns c0 .. c0 + n of decode(w[r]) * x (indices unsigned: no negative-index
    wraparound, so the loop vectorizes; each value decoded in the register that multiplies it)."""
    w0, w1, w2, w3, w4, w5, w6, w7 = w
    u = np.uint64(c0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for j in range(n):
        i = u + np.uint64(j)
        xj = x[i]
        a0 += decode(w0[i]) * xj
        a1 += decode(w1[i]) * xj
        a2 += decode(w2[i]) * xj
        a3 += decode(w3[i]) * xj
        a4 += decode(w4[i]) * xj
        a5 += decode(w5[i]) * xj
        a6 += decode(w6[i]) * xj
        a7 += decode(w7[i]) * xj
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(cache=True, fastmath=True, error_model="numpy", nogil=True, parallel=True)
def _matvec(codes, scale, br, bc, x, groups, stride, offset, out, bf16):
    """out[m, g, j] = sum_c x[m, g, c] W[g * stride + offset + j, c], for j < out.shape[2].

    Eight rows at a time, each code decoded in the register that multiplies it (indices unsigned:
    no negative-index wraparound, so the loops vectorize); per block of columns, eight float32 sums
    times each row's block scale."""
    n_rows = out.shape[2]
    k = codes.shape[1]
    m_rows = x.shape[0] // groups
    tasks = -(-n_rows // ROWS)
    for task in prange(groups * tasks):
        g, j0 = task // tasks, (task % tasks) * ROWS
        nr = min(ROWS, n_rows - j0)
        r0 = g * stride + offset + j0
        last = r0 + nr - 1
        w = _rows(codes, r0, last)
        tot = np.zeros(ROWS, np.float32)
        for m in range(m_rows):
            xm = x[m * groups + g]
            tot[:] = 0.0
            for c0 in range(0, k, bc):
                n = min(bc, k - c0)
                sums = _dot8(w, xm, c0, n, _bf16) if bf16 else _dot8(w, xm, c0, n, _code)
                cb = c0 // bc
                for r in range(ROWS):
                    tot[r] += sums[r] * scale[min(r0 + r, last) // br, cb]
            for r in range(nr):
                out[m, g, j0 + r] = tot[r]


@njit(cache=True, fastmath=True, error_model="numpy", nogil=True, parallel=True)
def _vecmat(codes, scale, br, bc, x, stride, out, bf16):
    """out[m, g, c] = sum_r x[m, g, r] W[g * stride + r, c], for r < x.shape[2]."""
    m_rows, groups, n_in = x.shape
    k = codes.shape[1]
    for g in prange(groups):
        bf = np.empty(k, np.float32)
        acc = np.zeros((m_rows, k), np.float32)
        for r in range(n_in):
            row = codes[g * stride + r]
            srow = scale[(g * stride + r) // br]
            if bf16:
                for j in range(k):
                    bf[j] = _bf16(row[j])
            else:
                for j in range(k):
                    bf[j] = _code(row[j])
            for c0 in range(0, k, bc):
                s, u = srow[c0 // bc], np.uint64(c0)
                for j in range(min(bc, k - c0)):
                    bf[u + np.uint64(j)] *= s
            for m in range(m_rows):
                xr = x[m, g, r]
                for j in range(k):
                    acc[m, j] += xr * bf[j]
        for m in range(m_rows):
            for j in range(k):
                out[m, g, j] = acc[m, j]


@njit(cache=True, error_model="numpy", nogil=True, parallel=True)
def _decode_bf16(codes, scale, br, bc, r0, out):
    n, k = out.shape
    for r in prange(n):
        row, orow, srow = codes[r0 + r], out[r], scale[(r0 + r) // br]
        for c0 in range(0, k, bc):
            s, u = srow[c0 // bc], np.uint64(c0)
            for j in range(min(bc, k - c0)):
                i = u + np.uint64(j)
                b = np.float32(_code(row[i]) * s).view(np.uint32)  # round to nearest even (finite values)
                orow[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).contiguous().numpy()


def matvec(w: Codes, x: torch.Tensor, groups: int = 1, stride: int = 0, offset: int = 0,
           rows: int | None = None) -> torch.Tensor:  # fmt: skip
    """float32 y [m, groups, rows] = x [m, groups, k] times the rows g*stride+offset .. +rows of W,
    transposed (groups=1: y [m, 1, n] = x W^T)."""
    m, g, k = x.shape
    rows = w.shape[0] if rows is None else rows
    if k != w.shape[1] or g != groups or (g - 1) * stride + offset + rows > w.shape[0]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit a weight {w.shape} in {groups} groups of "
                         f"{rows} rows")  # fmt: skip
    out = np.empty((m, g, rows), np.float32)
    _follow_torch()
    _matvec(w.codes, w.scale, w.block[0], w.block[1], _f32(x).reshape(m * g, k), groups, stride, offset, out, w.bf16)
    return torch.from_numpy(out)


def matvec_bf16(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float32 y [m, n] = x [m, k] W^T for a contiguous bf16 W [n, k]."""
    return matvec(Codes.from_bf16(w), x[:, None])[:, 0]


def vecmat(w: Codes, x: torch.Tensor, stride: int) -> torch.Tensor:
    """float32 y [m, groups, k] = x [m, groups, r] times the rows g*stride .. g*stride+r of W."""
    m, g, r = x.shape
    if (g - 1) * stride + r > w.shape[0]:
        raise ValueError(f"x of shape {tuple(x.shape)} reaches past the {w.shape[0]} rows of a weight")
    out = np.empty((m, g, w.shape[1]), np.float32)
    _follow_torch()
    _vecmat(w.codes, w.scale, w.block[0], w.block[1], _f32(x), stride, out, w.bf16)
    return torch.from_numpy(out)


def decode_bf16(w: Codes, r0: int = 0, r1: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0..r1 of an FP8 weight in bf16, rounded as torch rounds the float32 dequantization (into
    `out`, a contiguous bf16 tensor of at least that many rows, when given)."""
    if w.bf16:
        raise ValueError("decode_bf16 decodes FP8 codes; a bf16 weight is used as stored")
    r1 = w.shape[0] if r1 is None else r1
    if out is None:
        out = torch.empty(r1 - r0, w.shape[1], dtype=torch.bfloat16)
    out = out[: r1 - r0]
    _follow_torch()
    _decode_bf16(w.codes, w.scale, w.block[0], w.block[1], r0, out.view(torch.int16).numpy().view(np.uint16))
    return out
