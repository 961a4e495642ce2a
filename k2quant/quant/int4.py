"""INT4 group quantization in compressed-tensors' pack-quantized layout (K2-Thinking's form).

Eight consecutive input-dimension values share one int32, element 0 in the lowest nibble,
each stored as q + 8. Dequantization follows compressed-tensors exactly: (q - zp) is cast
to the scale's dtype and multiplied there (bf16 for K2), so our numbers equal what vLLM
and transformers compute from the same file.
"""

from __future__ import annotations

import math
import sys

import torch

_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [rows, cols] -> int32 [rows, ceil(cols / 8)], packed along dim 1.

    Two nibbles per byte (element 0 low), four bytes per little-endian int32: the same bits
    as compressed-tensors' pack_to_int32, with byte-wide operations only.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {q.dtype}")
    rows, cols = q.shape
    nib = (q + 8).view(torch.uint8)  # two's complement: q + 8 is in 0..15
    if cols % 8:
        nib = torch.nn.functional.pad(nib, (0, -cols % 8))
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return packed.contiguous().view(torch.int32) if _LITTLE_ENDIAN else _words_from_bytes(packed)


def _words_from_bytes(b: torch.Tensor) -> torch.Tensor:
    w = b.to(torch.int64).view(b.shape[0], -1, 4)
    words = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [rows, ceil(cols / 8)] -> int8 values in [-8, 7], [rows, cols]."""
    rows = packed.shape[0]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF
    return (nib.view(rows, -1)[:, :cols] - 8).to(torch.int8)


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: tuple[int, int],
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 weight [out, in] from packed values, per-group scales [out, in / g], optional zero points.

    `zero_point` is the packed int32 tensor as stored (packed along dim 0, [ceil(out / 8), groups]).
    """
    rows, cols = shape
    groups = scale.shape[1]
    group_size = math.ceil(cols / groups)
    q = unpack_int4(packed, cols)
    vals = q.to(scale.dtype)
    if zero_point is not None:
        zp = unpack_int4(zero_point.t().contiguous(), rows).t()
        vals = vals - zp.to(scale.dtype).repeat_interleave(group_size, dim=1)[:, :cols]
    return (vals * scale.repeat_interleave(group_size, dim=1)[:, :cols]).to(torch.float32)


# ---------------------------------------------------------------------------- quantize
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(7))  # 1.00 .. 0.70 of the group's range
ROW_CHUNK = 256  # rows quantized at a time: bounds the temporaries and keeps them cache-sized


def quantize_int4(
    w: torch.Tensor,
    group_size: int = 32,
    symmetric: bool = True,
    qmax: int = 8,
    importance: torch.Tensor | None = None,
    search: bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise INT4 of w [out, in] -> (q int8 [out, in], scale [out, groups], zero_point int8 | None).

    Symmetric: q in [-8, 7] for qmax=8 (the full grid; scale = clip * amax / 7.5), or
    [-7, 7] with qmax=7 (K2-Thinking's QAT grid; scale = clip * amax / 7). Asymmetric: q in [-8, 7] with an
    int zero point. With `search`, each group tries clipping ratios and keeps the one with
    the least squared error, weighted per input channel by `importance` (e.g. an imatrix:
    the mean squared activation) when given; symmetric groups then also try the weighted
    least-squares scale for the chosen levels (as llama.cpp's make_qx_quants refines).
    Scales are rounded to `scale_dtype` before q is computed, so dequantize(q) is exactly
    what a reader of the file computes.
    """
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"input width {cols} is not a multiple of group size {group_size}")
    if importance is not None and importance.shape != (cols,):
        raise ValueError(f"importance has shape {list(importance.shape)}, expected [{cols}]")
    q_out = torch.empty(rows, cols, dtype=torch.int8)
    s_out = torch.empty(rows, cols // group_size, dtype=scale_dtype)
    z_out = None if symmetric else torch.empty(rows, cols // group_size, dtype=torch.int8)
    imp = None if importance is None else importance.to(torch.float32).view(1, -1, group_size)
    for r0 in range(0, rows, ROW_CHUNK):
        g = w[r0 : r0 + ROW_CHUNK].to(torch.float32).view(-1, cols // group_size, group_size)
        if not search:
            best_q, best_s, best_z = _int4_candidate(g, 1.0, symmetric, qmax, scale_dtype)
        else:
            best = None
            for ratio in CLIP_RATIOS:
                best = _keep_better(best, _int4_candidate(g, ratio, symmetric, qmax, scale_dtype), g, imp)
            if symmetric:  # then the weighted least-squares scale for the chosen levels, requantized
                _, q, _, _ = best
                qf = q.to(torch.float32)
                wq = qf if imp is None else qf * imp
                s_ls = (wq * g).sum(-1) / (wq * qf).sum(-1).clamp(min=1e-30)
                s_ls = torch.where(s_ls > 0, s_ls, best[2].to(torch.float32)).to(scale_dtype)
                q_ls = torch.div(g, s_ls.to(torch.float32)[..., None]).round_().clamp_(-qmax, 7).to(torch.int8)
                best = _keep_better(best, (q_ls, s_ls, None), g, imp)
            _, best_q, best_s, best_z = best
        n = best_q.shape[0]
        q_out[r0 : r0 + n] = best_q.view(n, cols)
        s_out[r0 : r0 + n] = best_s
        if z_out is not None:
            z_out[r0 : r0 + n] = best_z
    return q_out, s_out, z_out


def _keep_better(best, cand, g: torch.Tensor, imp: torch.Tensor | None):
    """Per group, (err, q, s, z) of whichever of `best` and the candidate (q, s, z) has the lower
    (weighted) squared error."""
    q, s, z = cand
    deq = q.to(torch.float32)
    if z is not None:
        deq -= z.to(torch.float32)[..., None]
    err = (deq.mul_(s.to(torch.float32)[..., None]) - g).square_()
    err = (err * imp if imp is not None else err).sum(-1)
    if best is None:
        return err, q, s, z
    b_err, b_q, b_s, b_z = best
    better = err < b_err
    return (
        torch.where(better, err, b_err),
        torch.where(better[..., None], q, b_q),
        torch.where(better, s, b_s),
        None if z is None else torch.where(better, z, b_z),
    )


def _int4_candidate(g: torch.Tensor, ratio: float, symmetric: bool, qmax: int, scale_dtype: torch.dtype):
    if symmetric:
        lo, hi = torch.aminmax(g, dim=-1)
        amax = torch.maximum(hi, lo.neg_())
        if ratio != 1.0:
            amax *= ratio
        # full grid: amax / 7.5 as compressed-tensors' minmax observer; the +-7 grid: amax / 7
        s = amax.div_(7.5 if qmax == 8 else float(qmax)).to(scale_dtype)
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.div(g, s.to(torch.float32)[..., None]).round_().clamp_(-qmax, 7)
        return q.to(torch.int8), s, None
    lo = g.amin(-1).clamp(max=0) * ratio
    hi = g.amax(-1).clamp(min=0) * ratio
    s = ((hi - lo) / 15).to(scale_dtype)
    s = torch.where(s == 0, torch.ones_like(s), s)
    sf = s.to(torch.float32)
    z = (-8 - torch.round(lo / sf)).clamp(-8, 7)
    q = torch.div(g, sf[..., None]).round_().add_(z[..., None]).clamp_(-8, 7)
    return q.to(torch.int8), s, z.to(torch.int8)


def pack_zero_point(z: torch.Tensor) -> torch.Tensor:
    """int8 zero points [out, groups] -> int32 packed along dim 0 [ceil(out / 8), groups], as compressed-tensors."""
    return pack_int4(z.t().contiguous()).t().contiguous()
