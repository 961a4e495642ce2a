"""INT4 group quantization in compressed-tensors' pack-quantized layout (K2-Thinking's form).

Eight consecutive input-dimension values share one int32, element 0 in the lowest nibble,
each stored as q + 8. Dequantization follows compressed-tensors exactly: (q - zp) is cast
to the scale's dtype and multiplied there (bf16 for K2), so our numbers equal what vLLM
and transformers compute from the same file.
"""

from __future__ import annotations

import math

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [rows, cols] -> int32 [rows, ceil(cols / 8)], packed along dim 1."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {q.dtype}")
    rows, cols = q.shape
    nib = (q.to(torch.int32) + 8) & 0xF
    nib = torch.nn.functional.pad(nib, (0, -cols % 8)).view(rows, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    words = (nib << shifts).sum(dim=-1, dtype=torch.int64)
    # values above 2^31 wrap to the negative int32 with the same bits
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
