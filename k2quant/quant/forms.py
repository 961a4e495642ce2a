"""Stored forms: one registered codec per way a weight lies on disk.

A stored form names a set of parts (compressed-tensors suffixes for safetensors, `data`
for GGML rows) and knows how they decode to float and how to take rows of them without
decoding. Everything that reads a weight (checkpoint.StoredWeight, schemes, the runner's
kernels, keyed by the same names in k2quant/runner/kernels.py) dispatches through `form()`,
so a new quant type is one class here and its kernels there (gguf-py registers one class
per quant type the same way).

Names: `dense` (BF16 / F16 / F32 `weight`), `fp8_block` (e4m3 `weight` + float32
`weight_scale_inv` per block: DeepSeek's release), `fp8_scaled` (e4m3 `weight` +
`weight_scale`, per block, channel or tensor: compressed-tensors float-quantized),
`int4_pack` (compressed-tensors pack-quantized: `weight_packed`, `weight_scale`,
`weight_shape`, optional `weight_zero_point`), and `ggml:<TYPE>` for every GGML type
k2quant decodes (`data`: uint8 rows of ggml blocks).
"""

from __future__ import annotations

from typing import Protocol

import torch

from . import ggml
from .fp8 import dequantize_fp8_block
from .int4 import dequantize_int4

Parts = dict[str, torch.Tensor]
Block = tuple[int, int] | None


class Stored(Protocol):
    """A weight in its stored form, as checkpoint.StoredWeight holds it (what quantizers may read directly)."""

    format: str
    shape: tuple[int, ...]
    parts: Parts
    block: Block

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


class StoredForm:
    """How one stored form decodes (`dequantize`) and slices by rows (`rows`, r0 a multiple of 128)."""

    name: str = ""

    def dequantize(self, parts: Parts, shape: tuple[int, ...], block: Block) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, parts: Parts, shape: tuple[int, ...], block: Block, r0: int, r1: int) -> Parts:
        p = dict(parts)
        p["weight"] = p["weight"][r0:r1]
        return p


FORMS: dict[str, StoredForm] = {}


def register(f: StoredForm) -> StoredForm:
    FORMS[f.name] = f
    return f


def form(name: str) -> StoredForm:
    try:
        return FORMS[name]
    except KeyError:
        raise ValueError(f"unknown stored form {name!r} (known: {', '.join(sorted(FORMS))})") from None


class Dense(StoredForm):
    name = "dense"

    def dequantize(self, parts, shape, block):
        return parts[next(iter(parts))].to(torch.float32)

    def rows(self, parts, shape, block, r0, r1):
        return {k: v[r0:r1] for k, v in parts.items()}


class FP8Block(StoredForm):
    name = "fp8_block"

    def dequantize(self, parts, shape, block):
        return dequantize_fp8_block(parts["weight"], parts["weight_scale_inv"], block)

    def rows(self, parts, shape, block, r0, r1):
        p = super().rows(parts, shape, block, r0, r1)
        p["weight_scale_inv"] = parts["weight_scale_inv"][r0 // block[0] : -(-r1 // block[0])]
        return p


class FP8Scaled(StoredForm):
    name = "fp8_scaled"

    def dequantize(self, parts, shape, block):
        s = parts["weight_scale"]
        if block is not None:
            return dequantize_fp8_block(parts["weight"], s, block)
        return parts["weight"].to(torch.float32) * s.to(torch.float32)  # channel / tensor scales

    def rows(self, parts, shape, block, r0, r1):
        p = super().rows(parts, shape, block, r0, r1)
        s = parts["weight_scale"]
        if s.dim() >= 2 and block is not None:
            p["weight_scale"] = s[r0 // block[0] : -(-r1 // block[0])]
        elif s.dim() >= 2 and s.shape[0] == shape[0]:
            p["weight_scale"] = s[r0:r1]  # per-channel scales
        return p


class Int4Pack(StoredForm):
    name = "int4_pack"

    def dequantize(self, parts, shape, block):
        return dequantize_int4(parts["weight_packed"], parts["weight_scale"], shape, parts.get("weight_zero_point"))

    def rows(self, parts, shape, block, r0, r1):
        p = {"weight_packed": parts["weight_packed"][r0:r1], "weight_scale": parts["weight_scale"][r0:r1]}
        if "weight_zero_point" in parts:
            p["weight_zero_point"] = parts["weight_zero_point"][r0 // 8 : -(-r1 // 8)]
        return p


class GGML(StoredForm):
    """Rows of ggml blocks of one type (a GGUF tensor, or one expert of a stacked one)."""

    def __init__(self, type_name: str):
        self.type_name = type_name
        self.name = f"ggml:{type_name}"

    def dequantize(self, parts, shape, block):
        return ggml.dequantize(parts["data"], self.type_name, shape[-1]).reshape(shape)

    def rows(self, parts, shape, block, r0, r1):
        return {"data": parts["data"][r0:r1]}


for _f in (Dense(), FP8Block(), FP8Scaled(), Int4Pack(), *(GGML(t) for t in ggml.TYPES)):
    register(_f)
