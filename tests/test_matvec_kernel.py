"""The CPU's FP8 kernels (quant/matvec_kernel.py) against torch's decoding of the same codes, and the
runner's use of them (runner/kernels.py FP8CPU, StoredHeads) against the dense forms they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k2quant.checkpoint import StoredWeight
from k2quant.model import DenseHeads
from k2quant.quant import matvec_kernel as K
from k2quant.quant.fp8 import dequantize_fp8_block, quantize_fp8_block
from k2quant.runner import kernels
from k2quant.runner.kernels import FP8_MATVEC_ROWS, StoredHeads, make_linear


def _every_code(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """n x k e4m3 weights holding every finite code (subnormals, both zeros) in random places."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # not the NaNs
    idx = torch.randint(0, codes.numel(), (n * k,), generator=g)
    idx[: codes.numel()] = torch.arange(codes.numel())
    return codes[idx[torch.randperm(n * k, generator=g)]].view(n, k).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((200, 300), (128, 128)), ((37, 61), (5, 7)),
                                         ((64, 96), None)])  # fmt: skip
def test_decode_is_torchs_dequantization_rounded_to_bf16(shape, block):
    g = torch.Generator().manual_seed(0)
    w = _every_code(*shape, g)
    n, k = shape
    bs = block or (n, k)
    scale = torch.rand(-(-n // bs[0]), -(-k // bs[1]), generator=g) * 1e-2 + 1e-5
    codes = K.Codes.from_fp8(w, scale if block else scale.reshape(()), block)
    ref = dequantize_fp8_block(w, scale, bs)
    assert torch.equal(K.decode_bf16(codes).view(torch.int16), ref.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("rows", [1, 3, FP8_MATVEC_ROWS])
def test_matvec_and_vecmat_match_float64(rows):
    g = torch.Generator().manual_seed(1)
    n, k, blk = 258, 300, (128, 128)  # partial blocks at both edges, rows not a multiple of 4
    q, s = quantize_fp8_block(torch.randn(n, k, generator=g), blk)
    codes = K.Codes.from_fp8(q, s, blk)
    w = dequantize_fp8_block(q, s, blk).double()
    x = torch.randn(rows, 1, k, generator=g)
    y = K.matvec(codes, x)
    ref = x[:, 0].double() @ w.T
    assert ((y[:, 0].double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
    # per group: head h reads rows h*86+10 .. +70 (absorbed attention's W_vb) and h*86 .. +40 (W_kb)
    xh = torch.randn(rows, 3, k, generator=g)
    yh = K.matvec(codes, xh, groups=3, stride=86, offset=10, rows=70)
    refh = torch.stack([xh[:, h].double() @ w[h * 86 + 10 : h * 86 + 80].T for h in range(3)], 1)
    assert ((yh.double() - refh).abs().max() / refh.abs().max()).item() < 1e-6
    xv = torch.randn(rows, 3, 40, generator=g)
    yv = K.vecmat(codes, xv, stride=86)
    refv = torch.stack([xv[:, h].double() @ w[h * 86 : h * 86 + 40] for h in range(3)], 1)
    assert ((yv.double() - refv).abs().max() / refv.abs().max()).item() < 1e-6


def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(2)
    q, s = quantize_fp8_block(torch.randn(512, 1024, generator=g))
    codes = K.Codes.from_fp8(q, s, (128, 128))
    x, xv = torch.randn(2, 1, 1024, generator=g), torch.randn(2, 4, 64, generator=g)
    got, saved = [], torch.get_num_threads()
    for threads in (1, 2):  # the kernels run on torch's thread count
        torch.set_num_threads(threads)
        got.append((K.matvec(codes, x), K.vecmat(codes, xv, stride=128), K.decode_bf16(codes)))
    torch.set_num_threads(saved)
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)


def test_bad_scales_are_refused():
    q = torch.zeros(256, 256).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="does not match 256x256 in 128x128 blocks"):
        K.Codes.from_fp8(q, torch.ones(3, 2), (128, 128))
    with pytest.raises(ValueError, match="fits no channel or tensor"):
        K.Codes.from_fp8(q, torch.ones(7), None)
    with pytest.raises(ValueError, match="not finite"):
        K.Codes.from_fp8(q, torch.full((2, 2), 1e3), (128, 128))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        K.Codes.from_fp8(torch.zeros(4, 4), torch.ones(1), None)


@pytest.mark.parametrize("tokens", [1, 3, 5, 40])  # matvec up to FP8_MATVEC_ROWS, decoded in chunks past it
def test_runner_fp8_linear_is_the_stored_weights_product(tokens, monkeypatch):
    monkeypatch.setattr(kernels, "FP8_CHUNK_BYTES", 100 * 512 * 2)  # 100 rows a chunk: four chunks, the last short
    g = torch.Generator().manual_seed(3)
    w = torch.randn(384, 512, generator=g) * 0.05
    q, s = quantize_fp8_block(w)
    st = StoredWeight("w", "fp8_block", (384, 512), {"weight": q, "weight_scale_inv": s}, (128, 128))
    fast = make_linear(st, "cpu", "fast")
    assert fast.kernel == "k2quant fp8 matvec (numba)"
    assert fast.nbytes == q.numel() + s.numel() * 4  # the codes and scales as stored: nothing decoded kept
    x = torch.randn(tokens, 512, generator=g)
    ref = F.linear(x.double(), dequantize_fp8_block(q, s).double())
    y = fast(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, 384)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1.5e-2


def test_stored_heads_match_the_dense_split_of_kv_b():
    g = torch.Generator().manual_seed(4)
    heads, nope, v, rank = 4, 128, 128, 512  # K2's per-head shapes, four heads
    q, s = quantize_fp8_block(torch.randn(heads * (nope + v), rank, generator=g) * 0.05)
    q_nope, o_lat = torch.randn(2, heads, 3, nope, generator=g), torch.randn(2, heads, 3, rank, generator=g)
    kv_b = dequantize_fp8_block(q, s)
    for codes, w in ((K.Codes.from_fp8(q, s, (128, 128)), kv_b), (K.Codes.from_bf16(kv_b.bfloat16()),
                                                                  kv_b.bfloat16().float())):  # fmt: skip
        w = w.view(heads, nope + v, rank)
        dense, stored = DenseHeads(w[:, :nope], w[:, nope:]), StoredHeads(codes, heads, nope)
        for a, b in ((stored.keys(q_nope), dense.keys(q_nope)), (stored.values(o_lat), dense.values(o_lat))):
            assert a.shape == b.shape and a.dtype == torch.float32
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_bf16_matvec_and_the_runners_dense_kernel():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(203, 300, generator=g).bfloat16()  # rows not a multiple of 8
    for rows in (1, 2):
        x = torch.randn(rows, 300, generator=g)
        ref = x.double() @ w.double().T
        assert ((K.matvec_bf16(w, x).double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
    dense = make_linear(StoredWeight("w", "dense", (203, 300), {"weight": w}), "cpu", "fast")
    for rows in (1, 2, 5):  # the matvec up to BF16_MATVEC_ROWS, F.linear past it
        x = torch.randn(rows, 300, generator=g)
        y, ref = dense(x.bfloat16()), x.double() @ w.double().T
        assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1.5e-2
    with pytest.raises(ValueError, match="contiguous 2-D bf16 weight"):
        K.matvec_bf16(w.t(), torch.randn(1, 203))
    with pytest.raises(ValueError, match="does not fit a weight"):
        K.matvec(K.Codes.from_bf16(w), torch.randn(1, 2, 300), groups=2, stride=150, offset=0, rows=60)
