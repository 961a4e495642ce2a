"""Schemes by name: what a tensor becomes, how it is stored, how it reads back.

Names: int4-g{32,64,128} (symmetric, full -8..7 grid), int4-gN-r7 (symmetric -7..7, the
grid of K2-Thinking's QAT), int4-gN-asym (zero points), fp8-block (e4m3, 128x128 float32
scales), bf16, keep (as stored in the source). A scheme is pure: tensors in, stored parts
out (named by the compressed-tensors suffixes), and back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .forms import Stored, form
from .fp8 import DEFAULT_BLOCK, quantize_fp8_block, scale_shape
from .gptq import gptq_int4
from .int4 import pack_int4, pack_zero_point
from .int4_kernel import encode_int4, kernel_source

_INT4 = re.compile(r"^int4-g(32|64|128)(-asym|-r7)?$")


@dataclass(frozen=True)
class Scheme:
    name: str
    kind: str  # "int4" | "fp8" | "bf16" | "keep"
    group_size: int = 0
    symmetric: bool = True
    qmax: int = 8

    @property
    def ct_format(self) -> str | None:
        """compressed-tensors format of tensors in this scheme (None: stored unquantized)."""
        return {"int4": "pack-quantized", "fp8": "float-quantized"}.get(self.kind)

    def ct_weights(self) -> dict:
        """compressed-tensors QuantizationArgs for the weights, as a dict."""
        if self.kind == "int4":
            return {
                "num_bits": 4, "type": "int", "symmetric": self.symmetric, "strategy": "group",
                "group_size": self.group_size, "block_structure": None, "dynamic": False, "actorder": None,
                "observer": "minmax", "observer_kwargs": {},
            }  # fmt: skip
        if self.kind == "fp8":
            return {
                "num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                "block_structure": list(DEFAULT_BLOCK), "group_size": None, "dynamic": False, "actorder": None,
                "observer": "minmax", "observer_kwargs": {},
            }  # fmt: skip
        raise ValueError(f"scheme {self.name} is not quantized")

    def ct_input_activations(self) -> dict | None:
        if self.kind == "fp8":  # FP8_BLOCK preset: dynamic per-token-group activations
            return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group", "group_size": 128,
                    "dynamic": True, "observer": None, "observer_kwargs": {}, "block_structure": None,
                    "actorder": None}  # fmt: skip
        return None

    def applies_to(self, shape: tuple[int, ...]) -> str | None:
        """Why this scheme cannot store a tensor of `shape`, or None if it can."""
        if self.kind == "int4":
            if len(shape) != 2:
                return "int4 needs a 2-D weight"
            if shape[1] % self.group_size:
                return f"input width {shape[1]} is not a multiple of group size {self.group_size}"
        if self.kind == "fp8" and len(shape) != 2:
            return "fp8-block needs a 2-D weight"
        return None

    def quantize(
        self,
        w: torch.Tensor | Stored,
        importance: torch.Tensor | None = None,
        search: bool = True,
        hessian: torch.Tensor | None = None,
        act_order: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Stored parts for a weight (suffixes as compressed-tensors names them): a float tensor, or a
        checkpoint.StoredWeight, which int4 reads in its stored form (FP8 blocks need no float32 copy).

        search=False is plain round-to-nearest for int4 (no clipping search); a `hessian`
        (X^T X of the layer's inputs) makes int4 use GPTQ."""
        if self.kind == "int4":
            if hessian is not None:
                q, s, z = gptq_int4(_float(w), hessian, self.group_size, self.symmetric, self.qmax, act_order=act_order)
                packed = pack_int4(q)
            else:  # the fused kernel, reading the weight in its stored form
                packed, s, z = encode_int4(kernel_source(w), self.group_size, self.symmetric, self.qmax, importance,
                                           search)  # fmt: skip
            parts = {"weight_packed": packed, "weight_scale": s,
                     "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}  # fmt: skip
            if z is not None:
                parts["weight_zero_point"] = pack_zero_point(z)
            return parts
        w = _float(w)
        if self.kind == "fp8":
            q, s = quantize_fp8_block(w)
            return {"weight": q, "weight_scale": s}
        if self.kind == "bf16":
            return {"weight": w.to(torch.bfloat16).contiguous()}
        raise ValueError("keep is not a quantizer")

    @property
    def form(self) -> str:
        """The stored form (quant/forms.py) of what `quantize` returns."""
        return {"int4": "int4_pack", "fp8": "fp8_scaled"}.get(self.kind, "dense")

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return form(self.form).dequantize(parts, shape, DEFAULT_BLOCK if self.kind == "fp8" else None)

    def layout(self, shape: tuple[int, int]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The stored parts `quantize` returns for a weight of `shape`: (suffix, dtype, shape), in file order."""
        rows, cols = shape
        if self.kind == "int4":
            groups = cols // self.group_size
            parts = [("weight_packed", torch.int32, (rows, math.ceil(cols / 8))),
                     ("weight_scale", torch.bfloat16, (rows, groups))]  # fmt: skip
            if not self.symmetric:
                parts.append(("weight_zero_point", torch.int32, (math.ceil(rows / 8), groups)))
            return parts + [("weight_shape", torch.int64, (2,))]
        if self.kind == "fp8":
            return [("weight", torch.float8_e4m3fn, shape), ("weight_scale", torch.float32, scale_shape(shape))]
        return [("weight", torch.bfloat16, shape)]


def _float(w: torch.Tensor | Stored) -> torch.Tensor:
    """A float tensor from a tensor or a checkpoint.StoredWeight (decoded by its stored form)."""
    return w if isinstance(w, torch.Tensor) else w.dequantize()


def parse_scheme(name: str) -> Scheme:
    m = _INT4.match(name)
    if m:
        suffix = m.group(2) or ""
        return Scheme(name, "int4", int(m.group(1)), symmetric=suffix != "-asym", qmax=7 if suffix == "-r7" else 8)
    if name == "fp8-block":
        return Scheme(name, "fp8")
    if name in ("bf16", "keep"):
        return Scheme(name, name)
    raise ValueError(
        f"unknown scheme {name!r}: expected int4-g32|64|128 (optionally -asym or -r7), fp8-block, bf16 or keep"
    )
