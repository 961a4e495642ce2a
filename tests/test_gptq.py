"""GPTQ: error compensation beats rounding on correlated inputs; calibrate --hessian and
convert --method gptq end to end, with fallbacks for thinly calibrated experts."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from k2quant import open_checkpoint
from k2quant.cli import main
from k2quant.quant.gptq import gptq_int4
from k2quant.quant.int4 import dequantize_int4, pack_int4, pack_zero_point, quantize_int4


def _problem(seed=0, rows=96, cols=256):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.1 + torch.eye(cols))
    X[:, :4] *= 10  # a few dominant input channels, as activations have
    W = torch.randn(rows, cols, generator=g) * 0.02
    return X, W, X.T.double() @ X.double()


def _output_error(X, W, q, s, z):
    packed = pack_int4(q)
    d = dequantize_int4(packed, s, W.shape, None if z is None else pack_zero_point(z))
    return ((X @ (d - W).T) ** 2).mean().item()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_output_error(symmetric, act_order):
    X, W, H = _problem()
    rtn = _output_error(X, W, *quantize_int4(W, 32, symmetric, 8, None, False))
    searched = _output_error(X, W, *quantize_int4(W, 32, symmetric, 8, (X**2).mean(0), True))
    q, s, z = gptq_int4(W, H, 32, symmetric, act_order=act_order)
    assert q.dtype == torch.int8 and s.shape == (96, 8) and (z is None) == symmetric
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    got = _output_error(X, W, q, s, z)
    assert got < 0.5 * searched < rtn, (got, searched, rtn)


def test_gptq_is_deterministic_and_checks_shapes():
    X, W, H = _problem(1)
    a, b = gptq_int4(W, H), gptq_int4(W, H)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2], strict=True))
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq_int4(W, H[:10, :10])
    dead = H.clone()
    dead[5, :] = dead[:, 5] = 0  # an input channel that never fired
    q, _, _ = gptq_int4(W, dead)
    assert (q[:, 5] == 0).all()


def test_calibrate_hessian_and_convert_gptq(mini_k2, tmp_path):
    calib = tmp_path / "calib"
    r = CliRunner().invoke(main, ["calibrate", str(mini_k2["bf16"]), "--out", str(calib), "--tokens", "2048",
                                  "--ctx", "256", "--hessian", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["files"]["hessians"].endswith("hessians.safetensors")
    ck = open_checkpoint(mini_k2["bf16"])
    with safe_open(s["files"]["hessians"], "pt") as f:
        keys = set(f.keys())
        h = f.get_tensor("model.layers.1.mlp.experts.0.down_proj.hessian")
    assert h.shape == (ck.config.moe_intermediate_size,) * 2 and torch.allclose(h, h.T)
    assert "model.layers.0.self_attn.q_a_proj.hessian" in keys
    out = tmp_path / "gptq"
    r = CliRunner().invoke(main, ["convert", str(mini_k2["bf16"]), str(out), "--preset", "k2-int4", "--method",
                                  "gptq", "--calib", str(calib), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    fb = summary["gptq_fallbacks"]
    # 2048 tokens over 32 experts, 4 per token: the coldest experts get under GPTQ_MIN_TOKENS rows and fall back
    assert fb and all(".mlp.experts." in m for m in fb) and len(fb) < 3 * 32 * 3
    w = open_checkpoint(out).tensor("model.layers.1.mlp.experts.0.up_proj.weight")
    ref = ck.tensor("model.layers.1.mlp.experts.0.up_proj.weight")
    assert ((w - ref).norm() / ref.norm()) < 0.2
    r = CliRunner().invoke(main, ["convert", str(mini_k2["bf16"]), str(tmp_path / "x"), "--preset", "k2-int4",
                                  "--method", "gptq"])  # fmt: skip
    assert r.exit_code == 1 and "calibrate --hessian" in r.output
