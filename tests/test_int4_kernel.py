"""The fused INT4 encoder (quant/int4_kernel.py) against the torch reference (quant/int4.py).

Round-to-nearest must give the same bytes as quantize_int4 + pack_int4 from every stored
form the kernel reads; the search may pick another candidate only on near-ties, so its
(weighted) error per tensor must be no worse than the reference's; bytes must not depend
on the thread count.
"""

from __future__ import annotations

import pytest
import torch

from k2quant.checkpoint import open_checkpoint
from k2quant.quant.fp8 import dequantize_fp8_block, quantize_fp8_block
from k2quant.quant.int4 import dequantize_int4, pack_int4, pack_zero_point, quantize_int4
from k2quant.quant.int4_kernel import KernelSource, encode_int4, kernel_source, set_threads

GRIDS = [(True, 8), (True, 7), (False, 8)]  # symmetric full grid, K2-Thinking's -7..7, zero points


def _weight(rows: int = 200, cols: int = 384, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with outliers, an all-zero group, exact half-level ties and a constant group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, 5] *= 20  # an outlier channel
    w[0, :32] = 0
    w[1, :32] = torch.arange(32) * 0.25  # levels exactly half-way after scaling
    w[2, 32:64] = 0.5
    return w


def _sources(w: torch.Tensor):
    """The same weight as the kernel reads it from FP8 blocks (partial edge blocks), BF16 and float32,
    with the float32 tensor the reference quantizes."""
    q, s = quantize_fp8_block(w)
    f = dequantize_fp8_block(q, s)
    b = w.to(torch.bfloat16)
    return [
        ("fp8_block", KernelSource.from_fp8_block(q, s, (128, 128)), f),
        ("bf16", KernelSource.from_tensor(b), b.float()),
        ("f32", KernelSource.from_tensor(f), f),
    ]


def _reference(w, sym, qmax, imp, search):
    q, s, z = quantize_int4(w, 32, sym, qmax, imp, search)
    return pack_int4(q), s, None if z is None else pack_zero_point(z)


def _error(packed, s, z, w, imp):
    zp = None if z is None else (z if z.dtype == torch.int32 else pack_zero_point(z))
    d = (dequantize_int4(packed, s, tuple(w.shape), zp) - w).square()
    return float((d * imp).sum() if imp is not None else d.sum())


@pytest.mark.parametrize("sym,qmax", GRIDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_round_to_nearest_is_byte_identical_to_the_reference(sym, qmax, weighted):
    w = _weight()
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) if weighted else None
    for form, src, f in _sources(w):
        packed, s, z = encode_int4(src, 32, sym, qmax, imp, search=False)
        rp, rs, rz = _reference(f, sym, qmax, imp, False)
        assert torch.equal(packed, rp), form
        assert torch.equal(s.view(torch.int16), rs.view(torch.int16)), form
        if not sym:
            assert torch.equal(pack_zero_point(z), rz), form


@pytest.mark.parametrize("sym,qmax", GRIDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_search_error_no_worse_than_the_reference(sym, qmax, weighted):
    w = _weight(rows=256, cols=512, seed=2)
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) + 0.1 if weighted else None
    for form, src, f in _sources(w):
        packed, s, z = encode_int4(src, 32, sym, qmax, imp, search=True)
        rp, rs, rz = _reference(f, sym, qmax, imp, True)
        ours, ref = _error(packed, s, z, f, imp), _error(rp, rs, rz, f, imp)
        assert ours <= ref * (1 + 1e-6), (form, ours, ref)
        rtn = _error(*encode_int4(src, 32, sym, qmax, imp, search=False), f, imp)
        assert ours < 0.99 * rtn, (form, ours, rtn)  # the search is a search


def test_search_on_mini_k2_experts_no_worse_than_the_reference(mini_k2):
    ck = open_checkpoint(mini_k2["fp8"])
    for name in ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.3.mlp.experts.30.down_proj.weight",
                 "model.layers.2.mlp.shared_experts.up_proj.weight"):  # fmt: skip
        stored = ck.stored(name)
        f = stored.dequantize()
        ours = _error(*encode_int4(kernel_source(stored), 32, True, 8, None, True), f, None)
        ref = _error(*_reference(f, True, 8, None, True), f, None)
        assert ours <= ref * (1 + 1e-6), (name, ours, ref)


def test_bytes_do_not_depend_on_threads_or_runs():
    w = _weight(rows=300, cols=512, seed=4)
    src = _sources(w)[0][1]
    imp = torch.rand(512, generator=torch.Generator().manual_seed(5))
    outs = []
    for n in (1, 2, 1):
        set_threads(n)
        outs.append(encode_int4(src, 32, True, 8, imp, search=True))
    set_threads(2)
    for packed, s, _ in outs[1:]:
        assert torch.equal(packed, outs[0][0]) and torch.equal(s.view(torch.int16), outs[0][1].view(torch.int16))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of group size"):
        encode_int4(KernelSource.from_tensor(torch.zeros(4, 48)), 32)
    with pytest.raises(ValueError, match="importance has shape"):
        encode_int4(KernelSource.from_tensor(torch.zeros(4, 64)), 32, importance=torch.ones(32))
