"""`convert --to gguf`: GGML encoders against gguf-py and llama.cpp's quantizer, the GGUF
files against llama.cpp's loader and forward, streaming, splitting and resuming."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from k2quant import open_checkpoint, open_model
from k2quant.calib.datasets import heldout_text
from k2quant.cli import main
from k2quant.convert_gguf import convert_gguf
from k2quant.formats.gguf import GGUFError, join_kv_b, split_kv_b
from k2quant.formats.tokenizer import load_tokenizer
from k2quant.quant import ggml
from k2quant.recipe import RecipeError, build_recipe
from k2quant.synthetic import k2_config_dict, write_synthetic_checkpoint

from .conftest import SMALL, assert_peak_rss_independent_of_size
from .llamacpp import (
    SETTING,
    errors_against_llama,
    ggml_quantize_chunk,
    llama_logits,
    llama_quantize,
    llama_quantize_many,
    llama_tokenize,
)

QTYPES = [
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ3_XXS",
    "IQ3_S",
    "IQ1_S",
    "IQ1_M",
]


def _weights(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[1] = 0  # an all-zero row
    w[2, ::7] *= 40  # outliers
    w[3] = w[3].abs()  # a row without negatives (min clamped to 0 in the asymmetric types)
    return w


def _gguf_py(data: torch.Tensor, t: str, cols: int) -> torch.Tensor:
    out = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[t])
    return torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(-1, cols)


@pytest.mark.parametrize("t", QTYPES + ["F32", "F16", "BF16"])
@pytest.mark.parametrize("weighted", [False, True])
def test_encoders_decode_bit_exactly_like_gguf_py(t, weighted):
    if t in ggml.ALWAYS_NEEDS_IMATRIX and not weighted:
        with pytest.raises(ValueError, match=f"{t} needs an importance matrix"):
            ggml.quantize(_weights(), t)
        return
    w = _weights()
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) ** 3 * 5 if weighted else None
    data = ggml.quantize(w, t, imp)
    assert data.dtype == torch.uint8 and data.shape == (48, ggml.TYPES[t].row_bytes(512))
    ours = ggml.dequantize(data, t, 512)
    assert torch.equal(ours.view(torch.int32), _gguf_py(data, t, 512).view(torch.int32))
    rel = ((ours - w) ** 2).sum() / (w**2).sum()
    bound = {"Q2_K": 0.12, "Q3_K": 0.04, "Q4_0": 0.02, "Q4_1": 0.01, "Q4_K": 0.01, "IQ4_NL": 0.01, "IQ4_XS": 0.01,
             "IQ2_XXS": 0.5, "IQ2_XS": 0.5, "IQ2_S": 0.45, "IQ3_XXS": 0.25, "IQ3_S": 0.12,
             "IQ1_S": 0.8, "IQ1_M": 0.8}  # fmt: skip
    assert rel < bound.get(t, 0.005), rel


@pytest.mark.parametrize("t", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_compiled_k_quants_write_ggml_bytes_without_search(t):
    """kquant_kernel with search=False runs ggml-quants.c's procedure in the same float32 steps:
    ggml_quantize_chunk's bytes (what llama-quantize writes), without and with an importance
    vector, on rows with zeros, outliers, no negatives and a near-zero sub-block; search=True is
    never worse than that per row, and often better."""
    w = _weights(cols=1024)
    w[4, 32:64] = 1e-9
    w[5, :300] = 0
    imp = torch.rand(1024, generator=torch.Generator().manual_seed(2)) ** 4 * 10 + 1e-3
    for col in (None, imp):
        theirs = ggml_quantize_chunk(ggml.TYPES[t].id, ggml.TYPES[t].row_bytes(1024), w.numpy(),
                                     None if col is None else col.numpy())  # fmt: skip
        ours = ggml.quantize(w, t, col, search=False).numpy()
        assert np.array_equal(ours, theirs), f"{t} rows differing from ggml: {np.nonzero((ours != theirs).any(1))[0]}"
        mw = torch.ones(1024) if col is None else col

        def row_err(data, mw=mw):
            return (mw * (ggml.dequantize(torch.from_numpy(data), t, 1024) - w) ** 2).sum(1)

        searched, own = row_err(ggml.quantize(w, t, col).numpy()), row_err(theirs)
        assert (searched <= own * (1 + 1e-6) + 1e-30).all()
        assert searched.sum() < own.sum()


def test_q8_0_is_ggml_reference_byte_for_byte():
    w = _weights()
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(ggml.quantize(w, "Q8_0").numpy(), ref)


def test_row_width_fallbacks_follow_llama_quantize():
    assert [ggml.fit_type(t, 128) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")] == [
        "Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q8_0"]  # fmt: skip
    assert ggml.fit_type("Q4_K", 48) == "F16" and ggml.fit_type("Q4_K", 512) == "Q4_K"
    iq = ("IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL")
    assert [ggml.fit_type(t, 128) for t in iq] == ["IQ4_NL"] * len(iq)
    # llama-quantize: `output` is Q8_0 when the file type's blocks do not divide its rows
    from k2quant.recipe import gguf_preset_type

    cases = (("iq2_xxs", 7168), ("iq2_xxs", 288), ("q4_k_m", 288), ("iq4_nl", 288))
    types = [gguf_preset_type(p, "output.weight", None, 61, True, 0, n) for p, n in cases]
    assert types == ["Q5_K", "Q8_0", "Q8_0", "Q6_K"]


def test_token_embd_and_output_take_imatrix_types_without_one(tmp_path):
    """llama-quantize exempts token_embd and output from its imatrix requirement and makes them with
    the type's no-imatrix weights where ggml has them (IQ2_S, IQ3_XXS, IQ1_M); not IQ2_XXS / IQ2_XS /
    IQ1_S, whose encoders assert an imatrix, nor any other tensor. So does k2quant."""
    from k2quant.convert import ConvertError

    src = _src(tmp_path)
    ok = build_recipe("q8_0", overrides=["token_embd=iq3_xxs", "output=iq1_m"], target="gguf")
    convert_gguf(src, tmp_path / "ok", ok, progress=False)
    types = {n: t.tensor_type.name for n, t in open_checkpoint(next((tmp_path / "ok").glob("*.gguf"))).by_gguf.items()}
    assert (types["token_embd.weight"], types["output.weight"]) == ("IQ3_XXS", "IQ1_M")
    refused = (("token_embd=iq2_xxs", "token_embd", "IQ2_XXS"), ("attn_q_a=iq2_s", "blk.0.attn_q_a", "IQ2_S"),
               ("output=iq1_s", "output", "IQ1_S"))  # fmt: skip
    for bad, name, t in refused:
        with pytest.raises(ConvertError, match=rf"tensor '{re.escape(name)}.weight' is planned as {t}"):
            convert_gguf(src, tmp_path / "no", build_recipe("q8_0", overrides=[bad], target="gguf"), progress=False)
    assert not (tmp_path / "no").exists()


def test_an_expert_the_imatrix_never_saw_gets_weight_one(tmp_path):
    """llama-quantize's imatrix loader gives a zero-count slice weight 1 per column (it still
    quantizes with an imatrix); so does k2quant, for every type."""
    from k2quant.convert_gguf import Importance
    from k2quant.formats.imatrix import write_imatrix

    names = [f"model.layers.1.mlp.experts.{e}.down_proj" for e in (0, 1)]
    sums = {n: torch.full((64,), 2.0, dtype=torch.float64) for n in names}
    write_imatrix(tmp_path / "im.gguf", sums, dict(zip(names, (4, 0), strict=True)), 2, ["x"], 1, 4)
    imp = Importance(str(tmp_path / "im.gguf"), {"blk.1.ffn_down_exps.weight"})
    assert torch.equal(imp.get("blk.1.ffn_down_exps.weight", 0), torch.full((64,), 0.5))
    assert torch.equal(imp.get("blk.1.ffn_down_exps.weight", 1), torch.ones(64))
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml.quantize(torch.zeros(2, 128), "Q4_K")


def test_kv_b_split_round_trips(mini_k2):
    ck = open_checkpoint(mini_k2["bf16"])
    w = ck.tensor("model.layers.1.self_attn.kv_b_proj.weight")
    k_b, v_b = split_kv_b(w, ck.config, "k_b"), split_kv_b(w, ck.config, "v_b")
    c = ck.config
    assert k_b.shape == (c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim)
    assert v_b.shape == (c.num_attention_heads, c.v_head_dim, c.kv_lora_rank)
    assert torch.equal(join_kv_b(k_b, v_b), w)


# ---------------------------------------------------------------------------- mini-K2 GGUFs
@pytest.fixture(scope="module")
def ggufs(mini_k2, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for preset, split in (("q8_0", None), ("q4_k_m", None), ("bf16", None), ("q8_0", "12M"), ("iq4_xs", None)):
        d = root / (preset + ("-split" if split else ""))
        convert_gguf(mini_k2["fp8" if preset != "bf16" else "bf16"], d, build_recipe(preset, target="gguf"),
                     split_max_size=split, progress=False)  # fmt: skip
        out[preset + ("-split" if split else "")] = d
    return out


def _eval_tokens(mini_k2, n: int = 1024) -> list[int]:
    return load_tokenizer(mini_k2["fp8"]).encode(heldout_text())[:n]


def test_metadata_and_tensors_are_what_llama_cpp_needs(ggufs, mini_k2):
    path = next(ggufs["q4_k_m"].glob("*.gguf"))
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    cfg = open_checkpoint(mini_k2["fp8"]).config
    a = "deepseek2"
    assert f["general.architecture"] == a and f["general.file_type"] == 15 and f["general.quantization_version"] == 2
    assert f[f"{a}.expert_gating_func"] == 2 and f[f"{a}.rope.dimension_count"] == cfg.qk_rope_head_dim
    assert f[f"{a}.attention.key_length_mla"] == cfg.qk_head_dim
    assert f[f"{a}.attention.value_length_mla"] == cfg.v_head_dim
    assert f[f"{a}.attention.key_length"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert f[f"{a}.attention.head_count_kv"] == 1 and f[f"{a}.expert_weights_norm"] is True
    assert f[f"{a}.expert_weights_scale"] == pytest.approx(cfg.routed_scaling_factor)
    assert f[f"{a}.leading_dense_block_count"] == cfg.first_k_dense_replace
    assert f[f"{a}.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * cfg.rope.mscale_all_dim)
    assert f[f"{a}.rope.scaling.type"] == "yarn" and f[f"{a}.rope.scaling.factor"] == cfg.rope.factor
    assert "<|im_assistant|>assistant<|im_middle|>" in f["tokenizer.chat_template"]
    assert r.fields["tokenizer.ggml.pre"].contents() == "kimi-k2"
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    t = {x.name: x for x in r.tensors}
    assert "blk.1.attn_kv_b.weight" not in t and "blk.1.attn_k_b.weight" in t and "blk.1.attn_v_b.weight" in t
    assert t["blk.1.attn_k_b.weight"].tensor_type.name == "Q5_0"  # rows of qk_nope (64): llama.cpp's fallback
    assert t["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert t["blk.1.exp_probs_b.bias"].tensor_type.name == "F32"
    assert list(t["blk.1.ffn_up_exps.weight"].shape) == [cfg.hidden_size, cfg.moe_intermediate_size, 32]
    assert t["output.weight"].tensor_type.name == "Q6_K"
    # llama-quantize's q4_k_m: ffn_down in use_more_bits layers (2, 3 of 4) in Q6_K, elsewhere Q4_K
    assert [t[f"blk.{i}.ffn_down{'_exps' if i else ''}.weight"].tensor_type.name for i in range(4)] == [
        "Q4_K", "Q4_K", "Q6_K", "Q6_K"]  # fmt: skip


def test_every_tensor_decodes_with_gguf_py_as_k2quant_decodes_it(ggufs):
    for name in ("q4_k_m", "q8_0-split", "iq4_xs"):
        ck = open_checkpoint(ggufs[name])
        for r in ck.readers:
            for t in r.tensors:
                ours = ck._decode(t.name)
                ref = gguf.quants.dequantize(t.data, t.tensor_type)
                ref = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(ours.shape)
                assert torch.equal(ours.view(torch.int32), ref.view(torch.int32)), t.name


# the file types' own mixes, and one file holding the other i-quants (layers 1-3 and the routed experts' up)
_MIX = ["blk\\.1\\.=iq3_xxs", "blk\\.2\\.=iq2_s", "blk\\.3\\.=iq3_s", "ffn_up_exps=iq1_s"]


@pytest.mark.parametrize("preset,overrides", [("iq2_xxs", []), ("iq2_xs", []), ("iq1_m", _MIX)])
def test_low_bit_iquants_need_an_imatrix_decode_and_run_in_llama_cpp(mini_k2, imatrix, tmp_path, preset, overrides):
    """--preset iq2_xxs / iq2_xs / iq1_m (the last with layers overridden to IQ3_XXS, IQ2_S, IQ3_S and
    the routed experts' up to IQ1_S): refused without an importance matrix, and with one lacking a
    tensor's entry, each naming the tensor, before anything is written; with calibrate's imatrix
    every tensor decodes with gguf-py as k2quant decodes it and llama.cpp's forward on the file
    agrees with k2quant's."""
    from k2quant.convert import ConvertError
    from k2quant.formats.imatrix import write_imatrix

    recipe, t = build_recipe(preset, target="gguf"), preset.upper()
    with pytest.raises(ConvertError, match=rf"tensor 'blk\.\d+\.\w+\.weight' is planned as {t}.*importance matrix"):
        convert_gguf(mini_k2["fp8"], tmp_path / "no", recipe, progress=False)
    partial = tmp_path / "partial.gguf"
    write_imatrix(partial, {"model.layers.0.self_attn.q_a_proj": torch.ones(512, dtype=torch.float64)},
                  {"model.layers.0.self_attn.q_a_proj": 8}, 32, ["x.txt"], 1, 8)  # fmt: skip
    with pytest.raises(ConvertError, match=rf"partial.gguf: no importance entry for tensor '.*', planned as {t}"):
        convert_gguf(mini_k2["fp8"], tmp_path / "no", recipe, progress=False, imatrix=partial)
    assert not (tmp_path / "no").exists()
    recipe = build_recipe(preset, overrides=overrides, target="gguf")
    convert_gguf(mini_k2["fp8"], tmp_path / "iq", recipe, method="rtn", progress=False, imatrix=imatrix)
    path = next((tmp_path / "iq").glob("*.gguf"))
    ck = open_checkpoint(path)
    types = {x.tensor_type.name for r in ck.readers for x in r.tensors}
    assert t in types and (not overrides or {"IQ3_XXS", "IQ2_S", "IQ3_S", "IQ1_S", "IQ2_XXS"} <= types), types
    for r in ck.readers:
        for x in r.tensors:
            ref = gguf.quants.dequantize(x.data, x.tensor_type)
            ours = ck._decode(x.name)
            assert torch.equal(ours.view(torch.int32), torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
                               .reshape(ours.shape).view(torch.int32)), x.name  # fmt: skip
    tokens = _eval_tokens(mini_k2, 512)
    model = open_model(path)
    rope = model.config.rope
    theirs = llama_logits(path, tokens, 512, rope.beta_fast, rope.beta_slow)
    kld, top1 = _kld_top1(model.logits(torch.tensor([tokens]))[0].float().numpy(), theirs)
    print(f"{preset}: llama.cpp vs k2quant on the same GGUF: mean KLD {kld:.6f}, top-1 {top1:.4f} ({SETTING})")
    assert kld <= 0.02 and top1 >= 0.95, (kld, top1, SETTING)


def _kld_top1(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(cand).double(), -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    return kld.mean().item(), float((ref.argmax(-1) == cand.argmax(-1)).mean())


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m", "q8_0-split", "iq4_xs"])
def test_llama_cpp_runs_the_gguf_like_k2quant(ggufs, mini_k2, name):
    """llama.cpp loads the file (split sets from the first file) and its logits agree with
    k2quant's forward over the same dequantized weights."""
    files = sorted(ggufs[name].glob("*.gguf"))
    if name.endswith("split"):
        assert len(files) > 1 and files[0].name.endswith("-00001-of-" + f"{len(files):05d}.gguf")
    tokens = _eval_tokens(mini_k2)
    assert len(tokens) >= 1000
    model = open_model(files[0])
    rope = model.config.rope
    theirs = llama_logits(files[0], tokens, 1024, rope.beta_fast, rope.beta_slow)
    ours = model.logits(torch.tensor([tokens]))[0].float().numpy()
    kld, top1 = _kld_top1(ours, theirs)
    msg = f"{name}: llama.cpp vs k2quant on the same GGUF: mean KLD {kld:.6f}, top-1 {top1:.4f} over {len(tokens)}"
    print(f"{msg} ({SETTING})")
    if name.startswith("q8_0"):
        assert kld <= 0.005 and top1 >= 0.98, f"{msg}; {SETTING}"
    else:  # llama.cpp quantizes activations to 8 bits for k-quant and i-quant dot products; bound loosely
        assert kld <= 0.02 and top1 >= 0.95, f"{msg}; {SETTING}"


def test_tokenizer_matches_llama_cpp(ggufs, mini_k2):
    tok = load_tokenizer(mini_k2["fp8"])
    texts = ("Hello world, it's 2026!\n  def f(x): return x**2", "你好，世界。今天天气很好。",
             "混合 mixed 文本 text 123")  # fmt: skip
    theirs = llama_tokenize(next(ggufs["q8_0"].glob("*.gguf")), list(texts))
    for text, ids in zip(texts, theirs, strict=True):
        assert ids == tok.encode(text), text


# ---------------------------------------------------------------------------- against llama-quantize
_COMPARE = ("blk.2.ffn_down_exps.weight", "blk.1.attn_q_b.weight", "blk.0.ffn_gate.weight")


@pytest.mark.parametrize(
    "t,weighted",
    [(t, w) for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_1", "IQ4_NL", "IQ4_XS"] for w in (False, True)]
    + [("IQ2_XXS", True), ("IQ2_XS", True), ("IQ2_S", True), ("IQ3_XXS", True), ("IQ3_S", False), ("IQ3_S", True)]
    + [("IQ1_S", True), ("IQ1_M", True)],
)
def test_quantizer_no_worse_than_llama_quantize(ggufs, tmp_path, t, weighted):
    """Same BF16 GGUF, same tensors, same importance: k2quant's error (importance-weighted when
    there is one) is at most llama_model_quantize's, and for the i-quants and k-quants `search=False` writes
    llama.cpp's bytes. The 1- and 2-bit i-quants and IQ3_XXS are made only with an importance matrix
    (llama-quantize refuses them without one for every tensor it quantizes: the others get weight 1)."""
    src = next(ggufs["bf16"].glob("*.gguf"))
    ref = open_checkpoint(src)
    g = torch.Generator().manual_seed(3)
    imat = {}
    if weighted:
        for name in _COMPARE:
            shape = tuple(int(x) for x in reversed(ref.by_gguf[name].shape.tolist()))
            nmat = shape[0] if len(shape) == 3 else 1
            imat[name] = torch.rand(nmat, shape[-1], generator=g) ** 4 * 10 + 1e-3
    given = dict(imat)
    if t in ggml.NEEDS_IMATRIX:
        for name, info in ref.by_gguf.items():
            shape = tuple(int(x) for x in reversed(info.shape.tolist()))
            if len(shape) > 1 and name not in given:
                given[name] = torch.ones((shape[0] if len(shape) == 3 else 1) * shape[-1])
    out = tmp_path / f"llama-{t}.gguf"
    llama_quantize(src, out, t, pure=True, imatrix={k: v.numpy().reshape(-1) for k, v in given.items()} or None)
    theirs = open_checkpoint(out)
    errors = errors_against_llama(ref, theirs, _COMPARE, imat)
    for name in _COMPARE:
        assert theirs.by_gguf[name].tensor_type.name == t
        err_ours, err_theirs, _ = errors[name]
        kind = "imatrix" if weighted else "plain"
        print(f"{t} {kind} {name}: k2quant / llama.cpp error = {err_ours / err_theirs:.4f}")
        assert err_ours <= err_theirs * 1.0001, (name, err_ours, err_theirs, SETTING)
        if t.startswith("IQ") or t.endswith("_K"):  # compiled: llama.cpp's steps in float32
            w = ref._decode(name).float()
            mats = w if w.dim() == 3 else w[None]
            raw = np.asarray(theirs.by_gguf[name].data).reshape(mats.shape[0], -1)
            for e in range(mats.shape[0]):
                col = imat[name][e] if name in imat else None
                rtn = ggml.quantize(mats[e], t, col, search=False).numpy().reshape(-1)
                assert np.array_equal(rtn, raw[e]), f"{name}[{e}]: --method rtn is not llama-quantize's {t} bytes"


@pytest.mark.parametrize("weighted", [False, True])
def test_every_q4_k_m_tensor_within_2_percent_of_llama_quantize(ggufs, tmp_path, weighted):
    """llama_model_quantize's Q4_K_M (its own per-tensor types) of the BF16 GGUF against k2quant's
    encoders on the same weights: the same type for every tensor, and every tensor's error
    (weighted by its importance, when it has one) at most 1.02x llama.cpp's."""
    src = next(ggufs["bf16"].glob("*.gguf"))
    ref = open_checkpoint(src)
    g = torch.Generator().manual_seed(5)
    imat = {}
    for name, t in ref.by_gguf.items():  # importance where llama.cpp applies one: rows as wide as the input
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if weighted and len(shape) > 1 and name not in ("token_embd.weight",) and "_b." not in name:
            imat[name] = torch.rand(shape[0] if len(shape) == 3 else 1, shape[-1], generator=g) ** 4 * 10 + 1e-3
    out = tmp_path / "llama-q4_k_m.gguf"
    llama_quantize(src, out, "q4_k_m", imatrix={k: v.numpy().reshape(-1) for k, v in imat.items()} or None)
    theirs = open_checkpoint(out)
    ours = open_checkpoint(next(ggufs["q4_k_m"].glob("*.gguf")))  # k2quant's own Q4_K_M: its type choices
    assert {n: t.tensor_type.name for n, t in ours.by_gguf.items()} == {
        n: t.tensor_type.name for n, t in theirs.by_gguf.items()}  # fmt: skip
    quantized = [n for n, t in theirs.by_gguf.items() if t.tensor_type.name != "F32"]
    ratios = {n: ours / llama for n, (ours, llama, _) in errors_against_llama(ref, theirs, quantized, imat).items()}
    worst = max(ratios, key=ratios.get)
    print(f"q4_k_m {'imatrix' if weighted else 'plain'}: {len(ratios)} tensors, k2quant / llama.cpp error "
          f"max {ratios[worst]:.4f} ({worst}), median {np.median(list(ratios.values())):.4f}")  # fmt: skip
    assert ratios[worst] <= 1.02, (worst, ratios[worst], SETTING)
    assert len(ratios) > 40


IMATRIX_RULES = ("q4_0", "q4_k_m", "iq4_nl", "iq4_xs")  # presets whose rules differ with an imatrix (and one without)


def test_every_preset_types_tensors_as_llama_quantize(tmp_path):
    """Each of llama.cpp's file types k2quant names as a preset, with and without an imatrix where
    llama-quantize's rules depend on one: k2quant's planned type for every tensor is the type in the
    file llama_model_quantize makes of the same BF16 GGUF. 16 layers, so the rules by layer (the
    first eighth, use_more_bits) pick some layers and not others; rows of 128 take the fallbacks."""
    from k2quant.convert_gguf import plan_gguf
    from k2quant.recipe import LLAMA_FTYPES

    src = _src(tmp_path, layers=16)
    convert_gguf(src, tmp_path / "bf16", build_recipe("bf16", target="gguf"), progress=False)
    bf16 = next((tmp_path / "bf16").glob("*.gguf"))
    ref = open_checkpoint(bf16)
    imat = {}
    for name, t in ref.by_gguf.items():
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if len(shape) > 1 and name != "token_embd.weight":
            imat[name] = np.ones((shape[0] if len(shape) == 3 else 1) * shape[-1], dtype=np.float32)
    presets = [p for p in LLAMA_FTYPES if p not in ("f32", "f16", "bf16")]
    ck = open_checkpoint(src)

    def needs_imatrix(p):  # llama-quantize refuses the file type without one
        plan = plan_gguf(ck, build_recipe(p, target="gguf"), "rtn", "x", 0, has_imatrix=False)
        return any(t.type in ggml.NEEDS_IMATRIX and t.name not in ggml.IMATRIX_EXEMPT for t in plan.tensors)

    plain = [p for p in presets if not needs_imatrix(p)]
    jobs = [(p, False) for p in plain] + [(p, True) for p in presets if p not in plain or p in IMATRIX_RULES]
    llama_quantize_many([(bf16, tmp_path / f"{p}-{im}.gguf", p, imat if im else None) for p, im in jobs])
    for preset, im in jobs:
        theirs = {n: t.tensor_type.name for n, t in open_checkpoint(tmp_path / f"{preset}-{im}.gguf").by_gguf.items()}
        plan = plan_gguf(ck, build_recipe(preset, target="gguf"), "rtn", "x", 0, has_imatrix=im)
        ours = {t.name: t.type for t in plan.tensors}
        assert ours == theirs, (preset, im, {n: (ours[n], theirs.get(n)) for n in ours if ours[n] != theirs.get(n)})


# ---------------------------------------------------------------------------- pipeline
def _src(tmp: Path, layers: int = 4) -> Path:
    return write_synthetic_checkpoint(tmp / f"src{layers}", k2_config_dict(**{**SMALL, "num_hidden_layers": layers}), 4)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "k2quant_convert.json"}


def test_split_deterministic_and_resumable(tmp_path, monkeypatch):
    import k2quant.convert_gguf as cg

    src = _src(tmp_path)
    recipe = build_recipe("q4_k_m", target="gguf")
    convert_gguf(src, tmp_path / "a", recipe, split_max_size="400K", progress=False)
    convert_gguf(src, tmp_path / "b", recipe, split_max_size="400K", progress=False)
    convert_gguf(src, tmp_path / "w", recipe, split_max_size="400K", progress=False, workers=2)
    a = _files(tmp_path / "a")
    assert a == _files(tmp_path / "b") == _files(tmp_path / "w") and len(a) >= 3
    real = cg._write_file

    def fail_on_second(ck, plan, index, out, imp, bar):
        if index == 1:
            raise KeyboardInterrupt
        return real(ck, plan, index, out, imp, bar)

    monkeypatch.setattr(cg, "_write_file", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "c", recipe, split_max_size="400K", progress=False)
    assert not (tmp_path / "c" / "k2quant_convert.json").exists()
    assert not list((tmp_path / "c").glob("*.tmp"))
    monkeypatch.setattr(cg, "_write_file", real)
    with pytest.raises(Exception, match="--resume"):
        convert_gguf(src, tmp_path / "c", recipe, split_max_size="400K", progress=False)
    convert_gguf(src, tmp_path / "c", recipe, split_max_size="400K", progress=False, resume=True)
    assert _files(tmp_path / "c") == a
    # llama.cpp's split-file reader sees one model
    ck = open_checkpoint(tmp_path / "c")
    assert len(ck.shards) == sum(n.endswith(".gguf") for n in a) and ck.config.num_hidden_layers == 4


RSS_SCRIPT = r"""
import sys
from k2quant.convert_gguf import convert_gguf
from k2quant.recipe import build_recipe
convert_gguf(sys.argv[1], sys.argv[2], build_recipe("q4_0", target="gguf"), method="rtn", progress=False)
from k2quant.memory import peak_rss
print(peak_rss())
"""


def test_gguf_peak_rss_does_not_grow_with_model_size(two_sizes, tmp_path):
    assert_peak_rss_independent_of_size(two_sizes, RSS_SCRIPT, tmp_path)


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(RecipeError, match="unknown preset .k2-int4. for --to gguf"):
        build_recipe("k2-int4", target="gguf")
    with pytest.raises(RecipeError, match="unknown GGML type"):
        build_recipe("q4_k_m", overrides=["exps=q7_k"], target="gguf")
    src = _src(tmp_path, layers=2)
    r = build_recipe("q4_k_m", overrides=[r"layers\.1\.mlp\.experts\.3\.=q8_0"], target="gguf")
    with pytest.raises(RecipeError, match="ffn_(gate|up|down)_exps.*override whole layers"):
        convert_gguf(src, tmp_path / "o", r, progress=False)
    assert not (tmp_path / "o").exists()


def test_overrides_and_k2_mixes(tmp_path):
    src = _src(tmp_path, layers=2)
    s = convert_gguf(src, tmp_path / "o", build_recipe("k2-q3", overrides=["ffn_up_exps=q5_k"], target="gguf"),
                     method="rtn", progress=False)  # fmt: skip
    r = gguf.GGUFReader(str(tmp_path / "o" / s["files"][0]))
    t = {x.name: x.tensor_type.name for x in r.tensors}
    ff = SMALL["moe_intermediate_size"]
    assert t["blk.1.ffn_gate_exps.weight"] == "Q3_K" and t["blk.1.ffn_up_exps.weight"] == "Q5_K"
    assert t["blk.1.ffn_down_exps.weight"] == ggml.fit_type("Q4_K", ff)  # a row of moe_intermediate_size
    assert t["blk.0.ffn_gate.weight"] == "Q6_K" and t["output.weight"] == "Q6_K"
    assert s["components"]["routed_experts"]["bits_per_weight"] < s["components"]["dense_mlp"]["bits_per_weight"]


def test_gguf_reader_rejects_what_it_cannot_run(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(GGUFError, match="x.gguf"):
        open_checkpoint(bad)
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture is 'llama'"):
        open_checkpoint(tmp_path / "llama.gguf")


def test_cli_gguf_inspect_and_diff(ggufs, mini_k2, heldout_file, tmp_path):
    gfile = next(ggufs["q4_k_m"].glob("*.gguf"))
    r = CliRunner().invoke(main, ["inspect", str(gfile), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["quantization"] == "gguf" and set(info["components"]["routed_experts"]["storage"]) == {"Q4_K", "Q6_K"}
    assert 4.5 < info["bits_per_weight"] < 6.5
    r = CliRunner().invoke(main, ["diff", str(mini_k2["bf16"]), str(gfile), "--data", str(heldout_file), "--out",
                                  str(tmp_path / "rep"), "--ctx", "256", "--chunks", "2", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert 0 < m["kld"]["mean"] < 0.05
    # a GGUF as REF with text data: the tokenizer beside it (as `run` reads it), else one clear error
    args = ["--data", str(heldout_file), "--ctx", "256", "--chunks", "1", "--json"]
    r = CliRunner().invoke(main, ["diff", str(gfile), str(gfile), *args, "--out", str(tmp_path / "r2")])
    assert r.exit_code == 1 and "no tiktoken.model to tokenize" in r.output and "Traceback" not in r.output, r.output
    shutil.copy(gfile, tmp_path / gfile.name)
    shutil.copy(Path(mini_k2["fp8"]) / "tiktoken.model", tmp_path)
    r = CliRunner().invoke(main, ["diff", str(tmp_path / gfile.name), str(gfile), *args, "--out", str(tmp_path / "r3")])
    assert r.exit_code == 0 and json.loads(r.output)["kld"]["mean"] == 0.0, r.output


def test_cli_convert_gguf_help_has_examples():
    r = CliRunner().invoke(main, ["convert", "--help"])
    assert "--to gguf" in r.output and "--split-max-size" in r.output and "q4_k_m" in r.output


def test_gguf_convert_from_cli_subprocess(tmp_path):
    src = _src(tmp_path, layers=2)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "k2quant", "convert", str(src), str(out), "--to", "gguf", "--preset",
                        "q8_0", "--json"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["format"] == "gguf" and (out / s["files"][0]).is_file()
