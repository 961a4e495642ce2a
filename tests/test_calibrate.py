"""k2quant calibrate: statistics equal a plain forward's, coverage top-up leaves outputs alone, imatrix GGUF."""

from __future__ import annotations

import json

import gguf
import torch
from click.testing import CliRunner

from k2quant import open_checkpoint
from k2quant.calib.collect import collect
from k2quant.cli import main
from k2quant.formats.imatrix import importance, read_imatrix
from k2quant.model import K2Model, open_model


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
