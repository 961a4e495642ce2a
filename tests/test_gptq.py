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
from k2quant.quant import gptq
from k2quant.quant.gptq import gptq_int4
from k2quant.quant.int4 import dequantize_int4, pack_int4, pack_zero_point, quantize_int4

from .conftest import assert_peak_rss_independent_of_size


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


def _torch_gptq(W, H, group_size, symmetric, act_order, qmax=8, damp=0.01, block=128):
    """GPTQ's column loop written plainly in torch (what quant/gptq.py ran before its compiled block):
    each group's scales by quantize_int4 on the updated weights, or up front with act-order."""
    rows, cols = W.shape
    W = W.to(torch.float32).clone()
    dead, diag, perm, U = gptq._factor(H, damp, act_order)
    W[:, dead] = 0.0
    scales = torch.empty(rows, cols // group_size, dtype=torch.bfloat16)
    zeros = None if symmetric else torch.empty(rows, cols // group_size, dtype=torch.int8)
    if act_order:
        _, scales, zeros = quantize_int4(W, group_size, symmetric, qmax, diag.float(), True)
    W = W[:, perm]
    Q = torch.empty(rows, cols, dtype=torch.int8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, E, U1 = W[:, i1:i2].T.contiguous(), torch.zeros(i2 - i1, rows), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            orig = int(perm[i1 + i])
            g = orig // group_size
            if not act_order and orig % group_size == 0:
                grp = W1[i : i + group_size].T.contiguous()
                _, s, z = quantize_int4(grp, group_size, symmetric, qmax, diag[orig : orig + group_size].float(), True)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            s, x = scales[:, g].to(torch.float32), W1[i]
            zf = torch.zeros(rows) if zeros is None else zeros[:, g].to(torch.float32)
            q = torch.clamp(torch.round(x / s) + zf, -qmax if symmetric else -8, 7)
            Q[:, i1 + i] = q.to(torch.int8)
            err = (x - (q - zf) * s) / U1[i, i]
            W1[i:] -= U1[i, i:, None] * err[None, :]
            E[i] = err
        W[:, i2:] -= E.T @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], scales, zeros


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_compiled_column_loop_matches_the_torch_loop(symmetric, act_order):
    """The compiled block (int4_kernel.gptq_block) does the torch loop's float32 operations in its order: the
    same bytes with act-order (scales fixed up front); with scales chosen per group the search sums its errors
    in float64, so a near-tie may pick another scale: then the output error agrees to 1e-4."""
    X, W, H = _problem(3, rows=64, cols=384)
    want, got = _torch_gptq(W, H, 32, symmetric, act_order), gptq_int4(W, H, 32, symmetric, act_order=act_order)
    if act_order:
        assert torch.equal(want[0], got[0]) and torch.equal(want[1].view(torch.int16), got[1].view(torch.int16))
        assert symmetric or torch.equal(want[2], got[2])
    assert (want[0] != got[0]).float().mean() < 1e-3
    assert _output_error(X, W, *got) == pytest.approx(_output_error(X, W, *want), rel=1e-4)


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


def test_float32_factor_where_safe_float64_otherwise():
    """The Cholesky work runs in float32 unless the diagonal spans more than 1e8; both compensate."""
    X, W, H = _problem(2)
    rtn = _output_error(X, W, *quantize_int4(W, 32, True, 8, None, False))
    before = dict(gptq.FACTORED)
    got32 = _output_error(X, W, *gptq_int4(W, H))
    assert gptq.FACTORED["float32"] == before["float32"] + 1
    Xw = X.clone()
    Xw[:, 7] *= 1e5  # one channel 1e10 times another's energy: float32 is not trusted
    Hw = Xw.T.double() @ Xw.double()
    got64 = _output_error(Xw, W, *gptq_int4(W, Hw))
    assert gptq.FACTORED["float64"] == before["float64"] + 1
    assert got32 < 0.5 * rtn and got64 < _output_error(Xw, W, *quantize_int4(W, 32, True, 8, None, False))
    # the float32 and float64 factors of a well-conditioned Hessian give almost the same GPTQ
    gptq._LAST.clear()
    gptq.DIAG_SPAN_F32, span = 0.0, gptq.DIAG_SPAN_F32
    try:
        ref = _output_error(X, W, *gptq_int4(W, H))
    finally:
        gptq.DIAG_SPAN_F32 = span
        gptq._LAST.clear()
    assert abs(got32 - ref) < 0.02 * ref, (got32, ref)


@pytest.fixture(scope="module")
def gptq_runs(mini_k2, tmp_path_factory):
    """calibrate --hessian + convert --method gptq --calib, and the layer-streamed convert on the same text."""
    tmp = tmp_path_factory.mktemp("gptq")
    src, calib = str(mini_k2["bf16"]), tmp / "calib"
    r = CliRunner().invoke(main, ["calibrate", src, "--out", str(calib), "--tokens", "2048", "--ctx", "256",
                                  "--hessian", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    runs = {"calibrate": json.loads(r.output), "calib": calib, "tmp": tmp}
    streamed = ["--calib-tokens", "2048", "--calib-ctx", "256"]
    for name, args in [("stored", ["--calib", str(calib)]), ("streamed", streamed)]:
        r = CliRunner().invoke(main, ["convert", src, str(tmp / name), "--preset", "k2-int4", "--method", "gptq",
                                      *args, "--json"])  # fmt: skip
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(r.output)
    return runs


def test_calibrate_hessian_and_convert_gptq(mini_k2, gptq_runs, tmp_path):
    s = gptq_runs["calibrate"]
    assert s["files"]["hessians"] == "hessians.safetensors"  # in OUT (calibration.json names its files relatively)
    ck = open_checkpoint(mini_k2["bf16"])
    with safe_open(str(gptq_runs["calib"] / s["files"]["hessians"]), "pt") as f:
        keys = set(f.keys())
        h = f.get_tensor("model.layers.1.mlp.experts.0.down_proj.hessian")
    assert h.shape == (ck.config.moe_intermediate_size,) * 2 and torch.allclose(h, h.T)
    assert "model.layers.0.self_attn.q_a_proj.hessian" in keys
    out = gptq_runs["tmp"] / "stored"
    fb = gptq_runs["stored"]["gptq_fallbacks"]
    # 2048 tokens over 32 experts, 4 per token: the coldest experts get under GPTQ_MIN_TOKENS rows and fall back
    assert fb and all(".mlp.experts." in m for m in fb) and len(fb) < 3 * 32 * 3
    w = open_checkpoint(out).tensor("model.layers.1.mlp.experts.0.up_proj.weight")
    ref = ck.tensor("model.layers.1.mlp.experts.0.up_proj.weight")
    assert ((w - ref).norm() / ref.norm()) < 0.2
    r = CliRunner().invoke(main, ["convert", str(mini_k2["bf16"]), str(tmp_path / "x"), "--preset", "k2-int4",
                                  "--method", "gptq", "--calib", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 1 and "calibrate --hessian" in r.output and "hessians.safetensors" in r.output
    r = CliRunner().invoke(main, ["convert", str(mini_k2["bf16"]), str(tmp_path / "y"), "--preset", "k2-int4",
                                  "--method", "gptq", "--calib", str(gptq_runs["calib"]), "--propagate"])  # fmt: skip
    assert r.exit_code == 1 and "--propagate applies to the layer-streamed GPTQ" in r.output
    text = tmp_path / "t.txt"
    text.write_text("calibration text")
    r = CliRunner().invoke(main, ["convert", str(mini_k2["bf16"]), str(tmp_path / "z"), "--preset", "k2-int4",
                                  "--calib-data", str(text)])  # fmt: skip
    assert r.exit_code == 2 and "--calib-data feeds --method gptq" in r.output
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_streamed_gptq_equals_stored_hessians(mini_k2, gptq_runs):
    """Calibrating layer by layer inside convert gives the same bytes as calibrate --hessian + convert,
    while holding one expert's Hessians instead of all of them."""
    tmp, s = gptq_runs["tmp"], gptq_runs["streamed"]
    files = sorted(p.name for p in (tmp / "stored").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp / "streamed").glob("*.safetensors"))
    for f in files:
        assert (tmp / "stored" / f).read_bytes() == (tmp / "streamed" / f).read_bytes(), f
    assert s["gptq_fallbacks"] == gptq_runs["stored"]["gptq_fallbacks"]
    assert not (tmp / "streamed" / ".gptq-spool").exists()
    g, cfg = s["gptq_stream"], open_checkpoint(mini_k2["bf16"]).config
    assert g["layers_quantized"] == 3 and g["gptq_modules"] + len(s["gptq_fallbacks"]) == 3 * 32 * 3
    one_expert = 8 * (cfg.hidden_size**2 + cfg.moe_intermediate_size**2)  # gate/up share theirs; f64
    with safe_open(str(gptq_runs["calib"] / "hessians.safetensors"), "pt") as f:
        stored = sum(8 * f.get_slice(k).get_shape()[0] ** 2 for k in f.keys() if ".experts." in k)  # held as f64
    assert 0 < g["peak_hessian_bytes"] <= one_expert < stored / 20


@pytest.mark.parametrize("propagate", [False, True])
def test_streamed_gptq_resumes_after_interruption(mini_k2, gptq_runs, tmp_path, monkeypatch, propagate):
    """Killed in layer 2: layer 1's spool is kept, and the resumed run writes the same bytes as an
    uninterrupted one (with --propagate too, whose reused layers must then run quantized)."""
    from k2quant.convert import convert
    from k2quant.gptq_stream import SpoolSink
    from k2quant.recipe import build_recipe

    kw = dict(method="gptq", calib_tokens=2048, calib_ctx=256, progress=False, propagate=propagate)
    if propagate:
        ref = tmp_path / "ref"
        s_ref = convert(mini_k2["bf16"], ref, build_recipe("k2-int4"), **kw)
    else:
        ref, s_ref = gptq_runs["tmp"] / "streamed", gptq_runs["streamed"]
    done = SpoolSink.layer_done

    def crash(self, stats, layer):
        if layer == 2:
            raise KeyboardInterrupt
        done(self, stats, layer)

    out = tmp_path / "o"
    monkeypatch.setattr(SpoolSink, "layer_done", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(mini_k2["bf16"], out, build_recipe("k2-int4"), **kw)
    spool = sorted(p.name for p in (out / ".gptq-spool").iterdir())
    assert spool == ["layer-001.fallbacks.json", "layer-001.safetensors"]  # layer 2's unfinished file is gone
    assert not list(out.glob("*.safetensors"))
    monkeypatch.setattr(SpoolSink, "layer_done", done)
    s = convert(mini_k2["bf16"], out, build_recipe("k2-int4"), resume=True, **kw)
    assert s["gptq_stream"]["layers_reused"] == 1 and s["gptq_stream"]["layers_quantized"] == 2
    for p in sorted(ref.glob("*.safetensors")):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert s["gptq_fallbacks"] == s_ref["gptq_fallbacks"]
    if propagate:  # layer 1 is the first INT4 layer: same inputs either way; later layers see its rounding
        plain = open_checkpoint(gptq_runs["tmp"] / "streamed")
        prop = open_checkpoint(out)
        name = "model.layers.{}.mlp.experts.0.down_proj.weight"
        assert torch.equal(prop.tensor(name.format(1)), plain.tensor(name.format(1)))
        assert not torch.equal(prop.tensor(name.format(3)), plain.tensor(name.format(3)))


RSS_SCRIPT = r"""
import sys
from k2quant.convert import convert
from k2quant.recipe import build_recipe
recipe = build_recipe("k2-int4", None, [r"experts\.\d+\.(gate|up)_proj=keep"])  # down_proj: enough to stream
convert(sys.argv[1], sys.argv[2], recipe, method="gptq", calib_tokens=1024, calib_ctx=128, progress=False)
from k2quant.memory import peak_rss
print(peak_rss())
"""


def test_streamed_gptq_peak_rss_does_not_grow_with_model_size(two_sizes, tmp_path):
    """Hidden states, one layer's weights, one expert's Hessians: nothing grows with the layer count.

    glibc's dynamic mmap threshold is pinned here: at these small dimensions (2 MB experts) it
    lets the heap fragment by some 5-10 MB per layer of transient quantizer buffers, which
    says nothing about what k2quant holds; K2's 58 MB experts are always mmapped."""
    assert_peak_rss_independent_of_size(two_sizes, RSS_SCRIPT, tmp_path, env={"MALLOC_MMAP_THRESHOLD_": "262144"})
