"""k2quant calibrate: statistics equal a plain forward's, coverage top-up leaves outputs alone, imatrix GGUF."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import gguf
import torch
from click.testing import CliRunner

from k2quant import open_checkpoint
from k2quant.calib.collect import collect
from k2quant.calib.resume import STATE_DIR, CalibrationState
from k2quant.cli import main
from k2quant.formats.imatrix import importance, read_imatrix
from k2quant.model import K2Model, open_model

from .conftest import wait_for_state


def _model(path) -> K2Model:
    return open_model(path)


def _seqs(n=6, t=64):
    return torch.randint(0, 3800, (n, t), generator=torch.Generator().manual_seed(5))


def test_statistics_equal_a_plain_forward(mini_k2):
    seqs = _seqs()
    stats = collect(_model(mini_k2["fp8"]), seqs, batch=4, progress=False)
    ref: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    m = _model(mini_k2["fp8"])

    def obs(name, x):
        if x.dim() == 4:  # per-head inputs of attn_k_b / attn_v_b: per-head sums
            ref[name] = ref.get(name, 0) + x.double().pow(2).sum((0, 2))
            rows[name] = rows.get(name, 0) + x.shape[0] * x.shape[2]
            return
        x = x.reshape(-1, x.shape[-1]).double()
        ref[name] = ref.get(name, 0) + x.pow(2).sum(0)
        rows[name] = rows.get(name, 0) + x.shape[0]

    m.observer = obs
    m.logits(seqs)
    ref.pop("lm_head")
    assert set(stats.in_sum2) == set(ref)
    for name in ref:
        assert stats.counts[name] == rows[name], name
        assert torch.allclose(stats.in_sum2[name], ref[name], rtol=1e-5), name
    c = m.config
    assert stats.counts["model.layers.0.self_attn.q_a_proj"] == seqs.numel()
    assert stats.in_sum2["model.layers.0.self_attn.attn_k_b"].shape == (c.num_attention_heads, c.qk_nope_head_dim)
    assert stats.in_sum2["model.layers.0.self_attn.attn_v_b"].shape == (c.num_attention_heads, c.kv_lora_rank)
    for n in stats.routed.values():
        assert int(n.sum()) == seqs.numel() * c.num_experts_per_tok


def test_coverage_top_up_changes_statistics_not_outputs(mini_k2):
    seqs = _seqs()
    plain = collect(_model(mini_k2["fp8"]), seqs, batch=4, progress=False)
    topped = collect(_model(mini_k2["fp8"]), seqs, batch=4, min_expert_tokens=100, progress=False)
    c = open_checkpoint(mini_k2["fp8"]).config
    for layer in c.moe_layers:
        # every expert now has at least 100 rows of statistics
        for e in range(c.n_routed_experts):
            assert topped.counts[f"model.layers.{layer}.mlp.experts.{e}.up_proj"] >= 100
        assert torch.equal(plain.routed[layer], topped.routed[layer])
        assert int(topped.topped_up[layer].sum()) > 0
    # the inputs of every later non-expert linear are bit-identical: the top-up did not touch the outputs
    for name, s in plain.in_sum2.items():
        if ".experts." not in name:
            assert torch.equal(s, topped.in_sum2[name]), name


def test_cli_writes_imatrix_gguf_and_hotness(mini_k2, tmp_path):
    r = CliRunner().invoke(main, ["calibrate", str(mini_k2["fp8"]), "--out", str(tmp_path), "--tokens", "2048",
                                  "--ctx", "128", "--min-expert-tokens", "32", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    c = open_checkpoint(mini_k2["fp8"]).config
    assert summary["tokens"] == 2048 and summary["sequences"] == 16
    assert all(v["min_after_top_up"] >= 32 for v in summary["coverage"].values())
    reader = gguf.GGUFReader(str(tmp_path / "imatrix.gguf"))
    assert "general.architecture" not in reader.fields
    t = {x.name: x for x in reader.tensors}
    exps = t["blk.1.ffn_down_exps.weight.in_sum2"]
    assert list(exps.shape) == [c.moe_intermediate_size, c.n_routed_experts]  # ggml ne {n_in, n_expert}
    assert list(t["blk.1.ffn_down_exps.weight.counts"].shape) == [1, c.n_routed_experts]
    assert list(t["blk.0.attn_q_a.weight.in_sum2"].shape) == [c.hidden_size, 1]
    # llama.cpp's absorbed-MLA matrices (per-head inputs): as llama-imatrix stores a dense 3-D weight,
    # one row of heads x d and one count
    h = c.num_attention_heads
    assert list(t["blk.1.attn_k_b.weight.in_sum2"].shape) == [c.qk_nope_head_dim * h, 1]
    assert list(t["blk.1.attn_v_b.weight.in_sum2"].shape) == [c.kv_lora_rank * h, 1]
    assert list(t["blk.1.attn_k_b.weight.counts"].shape) == [1, 1]
    # as llama.cpp's save_imatrix: weights in sorted order, each as in_sum2 then counts
    names = [x.name for x in reader.tensors]
    weights = [n.removesuffix(".in_sum2") for n in names[0::2]]
    assert weights == sorted(weights) and names[1::2] == [w + ".counts" for w in weights]
    in_sum2, counts = read_imatrix(tmp_path / "imatrix.gguf")
    assert counts["model.layers.0.self_attn.q_a_proj"] == 2048
    assert counts["model.layers.2.mlp.experts.5.gate_proj"] >= 32
    imp = importance(in_sum2, counts)
    assert imp["model.layers.2.mlp.experts.5.down_proj"].shape == (c.moe_intermediate_size,)
    hot = json.loads((tmp_path / "hotness.json").read_text())
    for layer in c.moe_layers:
        h = hot[str(layer)]
        assert sum(h["routed_tokens"]) == 2048 * c.num_experts_per_tok
        assert abs(sum(h["frequency"]) - 1) < 1e-9 and len(h["mean_weight"]) == c.n_routed_experts


def test_convert_with_imatrix_lowers_importance_weighted_error(mini_k2, tmp_path):
    CliRunner().invoke(main, ["calibrate", str(mini_k2["fp8"]), "--out", str(tmp_path / "cal"), "--tokens", "4096",
                              "--ctx", "128", "--min-expert-tokens", "32"])  # fmt: skip
    outs = {}
    for name, extra in (("plain", []), ("imatrix", ["--calib", str(tmp_path / "cal")])):
        r = CliRunner().invoke(main, ["convert", str(mini_k2["bf16"]), str(tmp_path / name), "--preset", "k2-int4",
                                      "--json", *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        outs[name] = open_checkpoint(tmp_path / name)
    imp = importance(*read_imatrix(tmp_path / "cal" / "imatrix.gguf"))
    ref = open_checkpoint(mini_k2["bf16"])
    err = {"plain": 0.0, "imatrix": 0.0}
    for layer in ref.config.moe_layers:
        for e in range(0, ref.config.n_routed_experts, 4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                n = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                w = ref.tensor(n)
                for k in err:
                    err[k] += ((outs[k].tensor(n) - w).pow(2) * imp[n.removesuffix(".weight")]).sum().item()
    assert err["imatrix"] < 0.97 * err["plain"], err


def test_default_calibration_set_is_mixed_deterministic_and_renders_tool_calls():
    from k2quant.calib.datasets import bundled_documents
    from k2quant.calib.generated import agentic_documents, code_documents, math_documents

    docs = bundled_documents()
    assert docs == bundled_documents()
    size = sum(len(d.encode()) for d in docs)
    assert 250_000 < size < 500_000, size
    math, agentic, code = math_documents(), agentic_documents(), code_documents()
    assert any("x =" in d for d in math) and any("最大公约数" in d for d in math)
    assert all("<|tool_call_begin|>functions." in d and "<|im_system|>tool<|im_middle|>" in d for d in agentic)
    assert any("天气" in d for d in agentic) and any("weather" in d for d in agentic)
    assert any("def quantize" in d for d in code)
    assert len(bundled_documents(generated=False)) < len(docs)


CAL_ARGS = ["--tokens", "2048", "--ctx", "128", "--min-expert-tokens", "32"]


def _calibrate_proc(src, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "k2quant", "calibrate", str(src), "--out", str(out), *CAL_ARGS,
                             "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def _wait_for_layers(proc, out, n: int) -> None:
    """Until the run's state says n layers are done (n = 0: until the state exists, mid layer 0)."""
    wait_for_state(proc, out / STATE_DIR / "state.json", "layers_done", n, "calibration's layers")


def test_killed_anywhere_then_resumed_is_byte_identical(mini_k2, tmp_path):
    """SIGKILL mid-layer 0 and again after a layer, SIGTERM after another (which prints the command that
    resumes): that command then finishes with files byte-identical to an uninterrupted run's. A resume with
    another option or other data is refused, naming what differs; a new run over the state is refused."""
    src = mini_k2["fp8"]
    clean, out = tmp_path / "clean", tmp_path / "killed"
    r = CliRunner().invoke(main, ["calibrate", str(src), "--out", str(clean), *CAL_ARGS, "--json"])
    assert r.exit_code == 0, r.output
    for layers, extra in ((0, ()), (1, ("--resume",))):
        p = _calibrate_proc(src, out, *extra)
        _wait_for_layers(p, out, layers)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        assert not (out / "calibration.json").exists(), "calibration finished before the kill"
    r = CliRunner().invoke(main, ["calibrate", str(src), "--out", str(out), *CAL_ARGS])
    assert r.exit_code == 1 and re.search(r"unfinished calibration \([123] of 4 layers done\)", r.output), r.output
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "c"), "--preset", "k2-int4", "--calib", str(out)])
    assert r.exit_code == 1 and "holds an unfinished calibration" in r.output, r.output
    r = CliRunner().invoke(main, ["calibrate", str(src), "--out", str(out), *CAL_ARGS, "--batch", "4", "--resume"])
    assert r.exit_code == 1 and "differs from this run in --batch (8 then, 4 now)" in r.output, r.output
    text = tmp_path / "other.txt"
    text.write_text("Other calibration text. " * 400)
    r = CliRunner().invoke(main, ["calibrate", str(src), "--out", str(out), *CAL_ARGS, "--data", str(text), "--resume"])
    assert r.exit_code == 1 and "differs from this run in --data (None then" in r.output, r.output

    p = _calibrate_proc(src, out, "--resume")
    _wait_for_layers(p, out, 2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err, err
    again = shlex.split(err.strip().splitlines()[-1])
    assert again[:2] == ["k2quant", "calibrate"] and "--resume" in again, err
    assert not (out / "calibration.json").exists(), "calibration finished before SIGTERM"
    r = CliRunner().invoke(main, again[1:])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["resumed_at_layer"] >= 2
    for f in ("imatrix.gguf", "hotness.json", "calibration.json"):
        assert (out / f).read_bytes() == (clean / f).read_bytes(), f
    assert not (out / STATE_DIR).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())


def test_resume_restores_every_statistic_bit_for_bit(mini_k2, tmp_path):
    """Interrupted after layer 1 and resumed from the files: sums, counts, Hessians, routing and top-ups
    equal an uninterrupted collection's exactly (torch.equal), and the hidden states were restored too
    (layers 2 and 3, computed from them, agree)."""
    model, seqs = _model(mini_k2["fp8"]), _seqs(4, 32)
    wanted = {"model.layers.0.self_attn.q_a_proj", "model.layers.1.mlp.experts.3.up_proj",
              "model.layers.3.self_attn.kv_a_proj_with_mqa", "model.layers.3.mlp.experts.7.down_proj"}  # fmt: skip
    kw = dict(batch=3, min_expert_tokens=24, progress=False, hessian=wanted)
    full = collect(model, seqs, **kw)
    c = model.config
    state = CalibrationState(tmp_path, {"k": 1}, c.num_hidden_layers, c.n_routed_experts,
                             [(3, 32, c.hidden_size), (1, 32, c.hidden_size)], set(c.moe_layers))  # fmt: skip
    assert state.open(resume=False) is None

    def stop_after_1(layer, hs, stats):
        state.save_layer(layer, hs, stats)
        if layer == 1:
            raise KeyboardInterrupt

    try:
        collect(model, seqs, layer_done=stop_after_1, **kw)
        raise AssertionError("not interrupted")
    except KeyboardInterrupt:
        pass
    got = state.open(resume=True)
    assert got.layers_done == 2 and len(got.hidden) == 2
    resumed = collect(model, seqs, resumed=got, **kw)
    for f in ("in_sum2", "counts", "hessians", "routed", "weight_sum", "topped_up"):
        a, b = getattr(full, f), getattr(resumed, f)
        assert a.keys() == b.keys(), f
        for k in a:
            assert (a[k] == b[k]) if isinstance(a[k], int) else torch.equal(a[k], b[k]), (f, k)
    assert full.hessians.keys() == wanted
