"""Linear kernels per (stored form, device, mode), over weights that stay in their stored form.

`make_linear(stored, device, mode)` returns a callable `y = x W^T` that holds the packed
parts on `device` and nothing dequantized between calls. Two modes:

- `exact`: float32 compute with the stored form's own decoding (quant/forms.py, i.e.
  compressed-tensors' bf16 product for INT4): the same numbers as `open_model`, for checks.
  Every form, every device: the weight is decoded per call (a transient, dropped after).
- `fast`: bf16 compute. Kernels by form and device:
  - `int4_pack` (symmetric, group 32/64/128/256, rows a multiple of 16) on the CPU:
    torch's `_weight_int4pack_mm_for_cpu` (tinygemm; compressed-tensors' nibbles q + 8 are
    its unsigned values as they are, zero point 0, the bf16 scales), repacked once at load
    into torch's ISA-specific layout (never persisted);
  - `fp8_block` / `fp8_scaled` (e4m3, per block, channel or tensor scales) on the CPU:
    k2quant's matvec from the codes (quant/matvec_kernel.py) for up to FP8_MATVEC_ROWS rows of
    x (decoding, small batches: float32 sums, one pass over the codes), for longer inputs
    (prompts) the weight decoded to bf16 a chunk of rows at a time (an 8 MiB transient) and
    F.linear per chunk;
  - `dense` bf16 / f16: F.linear on the stored tensor (no copy); on the CPU, a bf16 weight and
    up to BF16_MATVEC_ROWS rows of x (decoding) take k2quant's bf16 matvec (float32 sums), 1.3x
    torch's bf16 F.linear here;
  - everything else (FP8 on CUDA, asymmetric INT4, every GGML type, INT4 on CUDA):
    decoded per call into bf16 (`DequantLinear`), then F.linear.

`fuse_rows` stacks an expert's gate and up projections into one matrix (one kernel call
instead of two) where their forms allow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from k2quant.checkpoint import StoredWeight
from k2quant.quant import matvec_kernel
from k2quant.quant.forms import form
from k2quant.quant.int4 import unpack_int4

MODES = ("exact", "fast")
_INT4PACK_GROUPS = (32, 64, 128, 256)
# rows of x up to which the FP8 matvec (one pass over the codes per row of x) beats decoding to bf16 in
# chunks and F.linear (bench/matvec.py's crossover table)
FP8_MATVEC_ROWS = 2
FP8_CHUNK_BYTES = 8 << 20  # the bf16 rows an FP8 weight is decoded into per step for longer inputs
# the same for a bf16 weight against torch's F.linear: 16384x7168, 2 rows 8.5 vs 10.3 ms, 3 rows 10.2 vs 10.1
BF16_MATVEC_ROWS = 2


def compute_dtype(mode: str) -> torch.dtype:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return torch.float32 if mode == "exact" else torch.bfloat16


class Linear:
    """y = x W^T with W held in stored form on `device`; `nbytes` is what it holds there."""

    kernel = ""
    device: torch.device
    nbytes: int
    shape: tuple[int, int]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _move(parts: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The parts on `device`, as tensors of their own (a memory map's pages are not kept alive)."""
    out = {}
    for k, v in parts.items():
        if k == "weight_shape":
            continue
        t = v.to(device)
        out[k] = t.clone() if t.data_ptr() == v.data_ptr() else t
    return out


class DequantLinear(Linear):
    """Any stored form: decoded per call into the compute dtype, then F.linear."""

    kernel = "dequantize per call"

    def __init__(self, stored: StoredWeight, device: torch.device, dtype: torch.dtype):
        self.format, self.block, self.shape = stored.format, stored.block, tuple(stored.shape)
        self.device, self.dtype = torch.device(device), dtype
        self.parts = _move(stored.parts, self.device)
        self.nbytes = sum(t.nbytes for t in self.parts.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = form(self.format).dequantize(self.parts, self.shape, self.block).to(self.dtype)
        return F.linear(x.to(self.dtype), w)


class DenseLinear(Linear):
    """A bf16 / f16 / f32 weight used as stored (computed in the compute dtype); a bf16 weight on the
    CPU in fast mode multiplies up to BF16_MATVEC_ROWS rows of x by quant/matvec_kernel's matvec."""

    kernel = "F.linear on the stored tensor"

    def __init__(self, weight: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.weight = _move({"weight": weight}, self.device)["weight"]
        self.shape = tuple(self.weight.shape)
        self.nbytes = self.weight.nbytes
        self.matvec = (dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and self.device.type == "cpu"
                       and self.weight.dim() == 2)  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.matvec and x.numel() <= BF16_MATVEC_ROWS * self.shape[1]:
            y = matvec_kernel.matvec_bf16(self.weight, x.reshape(-1, self.shape[1])).to(torch.bfloat16)
            return y.view(*x.shape[:-1], self.shape[0])
        return F.linear(x.to(self.dtype), self.weight.to(self.dtype))


class Int4PackCPU(Linear):
    """compressed-tensors symmetric INT4 through torch's CPU tinygemm (bf16 activations and scales)."""

    kernel = "torch _weight_int4pack_mm_for_cpu"

    def __init__(self, stored: StoredWeight):
        p = stored.parts
        n, k = stored.shape
        scale = p["weight_scale"]
        self.group = k // scale.shape[1]
        self.device, self.shape = torch.device("cpu"), (n, k)
        u = unpack_int4(p["weight_packed"], k).to(torch.int32) + 8  # the nibbles as stored
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        sz = torch.zeros(scale.shape[1], n, 2, dtype=torch.bfloat16)
        sz[..., 0] = scale.to(torch.bfloat16).t()
        self.scale_zeros = sz.contiguous()
        self.nbytes = self.packed.nbytes + self.scale_zeros.nbytes

    @staticmethod
    def supports(stored: StoredWeight) -> bool:
        p = stored.parts
        if stored.format != "int4_pack" or "weight_zero_point" in p or len(stored.shape) != 2:
            return False
        n, k = stored.shape
        groups = p["weight_scale"].shape[1]
        return k % groups == 0 and k // groups in _INT4PACK_GROUPS and n % 16 == 0 and k % 2 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed,
                                                        self.group, self.scale_zeros)  # fmt: skip
        return y.view(*shape[:-1], self.shape[0])


class FP8CPU(Linear):
    """FP8 e4m3 codes and their scales on the CPU: quant/matvec_kernel's matvec for a few rows of x,
    the weight decoded to bf16 per call (a transient) for more."""

    kernel = "k2quant fp8 matvec (numba)"

    def __init__(self, stored: StoredWeight):
        p = stored.parts
        scale = p["weight_scale_inv"] if stored.format == "fp8_block" else p["weight_scale"]
        own = _move({"weight": p["weight"], "scale": scale}, torch.device("cpu"))
        self.codes = matvec_kernel.Codes.from_fp8(own["weight"], own["scale"], stored.block)
        self.device, self.shape = torch.device("cpu"), tuple(stored.shape)
        self.nbytes = self.codes.nbytes

    @staticmethod
    def supports(stored: StoredWeight) -> bool:
        return (stored.format in ("fp8_block", "fp8_scaled") and len(stored.shape) == 2
                and stored.parts["weight"].dtype == torch.float8_e4m3fn)  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.shape[1])
        y = self.matvec(x2) if x2.shape[0] <= FP8_MATVEC_ROWS else self.decoded_linear(x2)
        return y.view(*x.shape[:-1], self.shape[0])

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, k] W^T from the codes, float32 sums, bf16 out."""
        return matvec_kernel.matvec(self.codes, x[:, None]).view(-1, self.shape[0]).to(torch.bfloat16)

    def decoded_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, k] W^T by F.linear in bf16, over the weight decoded a chunk of rows at a time into one
        FP8_CHUNK_BYTES buffer (no weight-sized transient)."""
        (n, k), xb = self.shape, x.to(torch.bfloat16)
        y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        step = max(1, FP8_CHUNK_BYTES // (2 * k))
        buf = torch.empty(min(step, n), k, dtype=torch.bfloat16)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            y[:, r0:r1] = F.linear(xb, matvec_kernel.decode_bf16(self.codes, r0, r1, buf))
        return y


class StoredHeads:
    """Absorbed attention's products with an FP8 or bf16 kv_b_proj on the CPU (model.HeadProducts), from
    the weight as stored: W_kb by quant/matvec_kernel's vecmat, W_vb by its matvec per head; float32 in
    and out (no float32 copy of kv_b per step)."""

    def __init__(self, codes: matvec_kernel.Codes, heads: int, nope: int):
        self.codes, self.nope = codes, nope
        self.per_head = codes.shape[0] // heads  # nope + v rows per head

    def keys(self, q_nope: torch.Tensor) -> torch.Tensor:
        b, h, t, _ = q_nope.shape
        y = matvec_kernel.vecmat(self.codes, q_nope.transpose(1, 2).reshape(b * t, h, self.nope), self.per_head)
        return y.view(b, t, h, -1).transpose(1, 2)

    def values(self, o_lat: torch.Tensor) -> torch.Tensor:
        b, h, t, width = o_lat.shape
        y = matvec_kernel.matvec(self.codes, o_lat.transpose(1, 2).reshape(b * t, h, width), groups=h,
                                 stride=self.per_head, offset=self.nope, rows=self.per_head - self.nope)  # fmt: skip
        return y.view(b, t, h, -1).transpose(1, 2)


def make_linear(stored: StoredWeight, device: str | torch.device, mode: str) -> Linear:
    """The kernel for one stored weight on one device (see the module docstring for the table)."""
    device = torch.device(device)
    dtype = compute_dtype(mode)
    if stored.format == "dense":
        return DenseLinear(stored.parts[next(iter(stored.parts))], device, dtype)
    if mode == "fast" and device.type == "cpu" and Int4PackCPU.supports(stored):
        return Int4PackCPU(stored)
    if mode == "fast" and device.type == "cpu" and FP8CPU.supports(stored):
        return FP8CPU(stored)
    return DequantLinear(stored, device, dtype)


def fuse_rows(a: StoredWeight, b: StoredWeight) -> StoredWeight | None:
    """[a; b] stacked by rows in stored form (gate and up of one expert), or None where the forms differ."""
    if a.format != b.format or a.shape[1:] != b.shape[1:] or a.block != b.block:
        return None
    if a.format == "dense" or (a.format == "int4_pack" and "weight_zero_point" not in a.parts):
        keys = [k for k in a.parts if k != "weight_shape"]
        if any(a.parts[k].shape[1:] != b.parts[k].shape[1:] or a.parts[k].dtype != b.parts[k].dtype for k in keys):
            return None
        parts = {k: torch.cat([a.parts[k], b.parts[k]]) for k in keys}
        return StoredWeight(f"{a.name}+{b.name}", a.format, (a.shape[0] + b.shape[0], *a.shape[1:]), parts)
    return None


@dataclass
class ExpertKernels:
    """One routed (or shared) expert: gate and up (fused where possible), down."""

    gate_up: Linear | None
    gate: Linear | None
    up: Linear | None
    down: Linear
    width: int  # moe_intermediate_size

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in (self.gate_up, self.gate, self.up, self.down) if k is not None)

    @property
    def device(self) -> torch.device:
        return self.down.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).split(self.width, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return self.down(F.silu(gate) * up)


def make_expert(gate: StoredWeight, up: StoredWeight, down: StoredWeight, device: str | torch.device,
                mode: str) -> ExpertKernels:  # fmt: skip
    fused = fuse_rows(gate, up)
    if fused is not None:
        return ExpertKernels(make_linear(fused, device, mode), None, None, make_linear(down, device, mode),
                             gate.shape[0])  # fmt: skip
    return ExpertKernels(None, make_linear(gate, device, mode), make_linear(up, device, mode),
                         make_linear(down, device, mode), gate.shape[0])  # fmt: skip
