"""FP8 e4m3 with one float32 scale per block (DeepSeek / Kimi K2 release format).

DeepSeek names the scale `weight_scale_inv`, but it multiplies: w = q * s, with s about
amax(block) / 448. compressed-tensors' float-quantized format stores the same numbers as
`weight_scale`. Edge blocks that do not fill 128x128 are scaled by their own amax.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Repeat a per-block scale to one value per element, cropped to `shape`."""
    s = scale.repeat_interleave(block[0], dim=0)[: shape[0]]
    return s.repeat_interleave(block[1], dim=1)[:, : shape[1]]


def dequantize_fp8_block(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> torch.Tensor:
    """float32 weight from e4m3 values and their per-block float32 scales.

    One block-row at a time, scales broadcast over whole blocks: each element is converted
    and multiplied once, while its block-row is still in cache.
    """
    rows, cols = weight.shape
    br, bc = block
    full = cols - cols % bc
    out = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(scale.shape[0]):
        r0, r1 = i * br, min((i + 1) * br, rows)
        s = scale[i].to(torch.float32)
        part = weight[r0:r1].to(torch.float32)
        if full:
            view = part[:, :full].view(r1 - r0, full // bc, bc)
            out[r0:r1, :full] = (view * s[: full // bc, None]).view(r1 - r0, full)
        if full < cols:  # a partial block at the right edge
            out[r0:r1, full:] = part[:, full:] * s[-1]
    return out


def quantize_fp8_block(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale [ceil(r/b0), ceil(c/b1)]) with s = amax / 448."""
    rows, cols = weight.shape
    w = weight.to(torch.float32)
    pr, pc = -rows % block[0], -cols % block[1]
    padded = torch.nn.functional.pad(w, (0, pc, 0, pr))
    nb_r, nb_c = padded.shape[0] // block[0], padded.shape[1] // block[1]
    blocks = padded.view(nb_r, block[0], nb_c, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn).contiguous()
    return q, scale.contiguous()
