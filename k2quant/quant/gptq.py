"""GPTQ for group-wise INT4 (Frantar et al., 2022), in k2quant's INT4 layout.

Columns are quantized in order (or by decreasing Hessian diagonal with act-order); each
column's rounding error is pushed onto the columns not yet quantized through the inverse
Hessian's Cholesky factor, so later columns compensate earlier ones. Group scales come
from k2quant's INT4 scale search (clipping ratios weighted by the Hessian diagonal, i.e.
the mean squared activation): computed on the partly updated weights when a group starts,
or up front from the original weights with act-order (static groups, so each group still
has one scale). The result has the same form as quantize_int4's, so it is stored, read and
dequantized identically. Each block of 128 columns runs compiled (int4_kernel.gptq_block: the
torch loop's float32 operations in its order, the group scales by the fused encoder's search);
the update of the later columns between blocks is one matrix product.
"""

from __future__ import annotations

import torch

from .int4 import CLIP_RATIOS, quantize_int4
from .int4_kernel import gptq_block

_LAST: dict = {}  # the last Hessian factored, and its factor


DIAG_SPAN_F32 = 1e8  # a Hessian diagonal spanning more than this is factored in float64


def _factor(hessian: torch.Tensor, damp: float, act_order: bool):
    """(dead channels, Hessian diagonal, column order, upper Cholesky factor of the damped inverse).

    The Cholesky work of a 7168-wide Hessian is most of GPTQ's time for one K2 expert. It runs
    in float32 (about twice float64's speed), and in float64 when float32 is not safe: the live
    diagonal spans more than DIAG_SPAN_F32, or a float32 factorization fails. An expert's gate
    and up share their input and so their Hessian: the last factor is kept and reused when the
    next Hessian is equal (compared by value, so nothing depends on how the caller holds it)."""
    key = (damp, act_order)
    if _LAST.get("key") == key and _LAST["h"].shape == hessian.shape and torch.equal(_LAST["h"], hessian):
        return _LAST["factor"]
    H = hessian.to(torch.float64).clone()
    cols = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.diag(H).clone()
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(cols)
    H = H[perm][:, perm]
    H += damp * diag.mean() * torch.eye(cols, dtype=torch.float64)
    live = diag[~dead]
    span = float(live.max() / live.min()) if live.numel() else 1.0
    U = _inverse_cholesky(H.to(torch.float32)) if span <= DIAG_SPAN_F32 else None
    precision = "float32"
    if U is None:
        U = _inverse_cholesky(H)
        if U is None:
            raise ValueError("the damped Hessian is not positive definite (raise the damping)")
        U, precision = U.to(torch.float32), "float64"
    FACTORED[precision] += 1
    _LAST.update(key=key, h=hessian.clone(), factor=(dead, diag, perm, U))
    return _LAST["factor"]


FACTORED = {"float32": 0, "float64": 0}  # Hessians factored in each precision (reported by the benches)


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of H^-1 in H's dtype, or None when a factorization fails or is not finite."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item():
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() or not torch.isfinite(U).all():
        return None
    return U


def gptq_int4(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 32,
    symmetric: bool = True,
    qmax: int = 8,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [out, in], hessian X^T X [in, in] (any positive scale) -> (q int8, scale [out, groups], zero | None)."""
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian has shape {list(hessian.shape)}, expected [{cols}, {cols}]")
    if cols % group_size or block % group_size:
        raise ValueError(f"input width {cols} and block {block} must be multiples of group size {group_size}")
    if scale_dtype != torch.bfloat16:
        raise ValueError(f"GPTQ's scales are bfloat16 (as K2's INT4 release), not {scale_dtype}")
    W = w.to(torch.float32).clone()
    dead, diag, perm, U = _factor(hessian, damp, act_order)
    W[:, dead] = 0.0
    groups = cols // group_size
    # each group's per-row scale and zero point as float32 values, [groups, rows] (a group's row of
    # scales is contiguous for the kernel); bf16 values when the scale dtype is bf16
    scales_f = torch.zeros(groups, rows, dtype=torch.float32)
    zeros_f = torch.zeros(groups, rows, dtype=torch.float32)
    if act_order:
        _, s, z = quantize_int4(W, group_size, symmetric, qmax, diag.float(), True, scale_dtype)
        scales_f.copy_(s.to(torch.float32).T)
        if z is not None:
            zeros_f.copy_(z.to(torch.float32).T)
    W = W[:, perm]
    Qt = torch.empty(cols, rows, dtype=torch.int8)  # levels, columns as rows
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32).numpy()
    diag32 = diag.to(torch.float32).numpy()
    for i1 in range(0, cols, block):  # columns as rows (transposed blocks): every column op is contiguous
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].T.contiguous()
        E = torch.empty(i2 - i1, rows)
        U1 = U[i1:i2, i1:i2].contiguous()
        gptq_block(W1.numpy(), U1.numpy(), perm[i1:i2].numpy(), diag32, group_size, qmax, symmetric, ratios,
                   not act_order, scales_f.numpy(), zeros_f.numpy(), Qt[i1:i2].numpy(), E.numpy())  # fmt: skip
        W[:, i2:] -= E.T @ U[i1:i2, i2:]
    scales = scales_f.T.to(scale_dtype).contiguous()
    zeros = None if symmetric else zeros_f.T.to(torch.int8).contiguous()
    return Qt.T[:, torch.argsort(perm)].contiguous(), scales, zeros
