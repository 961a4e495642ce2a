"""convert --to safetensors: peers decode what we write, lossless repacks, and a pipeline that survives kills."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from k2quant import K2QuantError, open_checkpoint, open_model
from k2quant.cli import main
from k2quant.convert import convert
from k2quant.manifest import JOURNAL
from k2quant.recipe import build_recipe
from k2quant.synthetic import k2_config_dict, write_synthetic_checkpoint

from .conftest import SMALL, assert_peak_rss_independent_of_size


def _convert(src, out, preset, method="rtn", **kw):
    return convert(src, out, build_recipe(preset, overrides=kw.pop("overrides", [])), method=method,
                   progress=False, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def converted(mini_k2, tmp_path_factory):
    """mini-K2's FP8 release converted with each preset (and K2-Thinking style from the BF16 copy)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, src, preset in [
        ("k2-int4", mini_k2["fp8"], "k2-int4"),
        ("int4-all", mini_k2["fp8"], "int4-all"),
        ("fp8", mini_k2["fp8"], "fp8"),
        ("thinking", mini_k2["bf16"], "k2-int4"),
    ]:
        _convert(src, root / name, preset, transformers_config=True)
        out[name] = root / name
    return out


def _ct_scheme(config: dict, fmt: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    for g in config["quantization_config"]["config_groups"].values():
        if g["format"] == fmt:
            return QuantizationScheme(targets=g["targets"], weights=QuantizationArgs(**g["weights"]), format=fmt)
    raise AssertionError(fmt)


@pytest.mark.parametrize("name", ["k2-int4", "int4-all", "fp8", "thinking"])
def test_compressed_tensors_decompresses_exactly_to_our_dequantize(converted, name):
    from compressed_tensors.compressors import BaseCompressor

    d = converted[name]
    cfg = json.loads((d / "config.json").read_text())
    ck = open_checkpoint(d)
    checked = 0
    for tname, lt in ck.tensors.items():
        if lt.format == "dense":
            continue
        fmt = "pack-quantized" if lt.format == "int4_pack" else "float-quantized"
        scheme = _ct_scheme(cfg, fmt)
        stored = ck.stored(tname)
        if fmt == "float-quantized":
            # compressed-tensors' FP8 block dequantization (strategy block): weight * per-block scale
            from compressed_tensors.quantization.lifecycle.forward import dequantize

            ref = dequantize(stored.parts["weight"], stored.parts["weight_scale"], args=scheme.weights,
                             dtype=torch.float32)  # fmt: skip
        else:
            compressor = BaseCompressor.get_value_from_registry(fmt)
            ref = compressor.decompress(dict(stored.parts), scheme)["weight"].float()
        assert torch.equal(ck.tensor(tname), ref), tname
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("name, dequantize", [("thinking", False), ("thinking", True), ("k2-int4", True),
                                              ("int4-all", True)])  # fmt: skip
def test_transformers_loads_output_and_agrees(converted, name, dequantize):
    from transformers import CompressedTensorsConfig, DeepseekV3ForCausalLM

    d = converted[name]
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager", **kw).eval()
    for p in hf.parameters():  # transformers keeps dequantized experts in bf16; compare in float32
        p.data = p.data.float()
    ids = torch.randint(0, 4000, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = open_model(d).logits(ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_k2_thinking_form_config(converted):
    q = json.loads((converted["thinking"] / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized" and q["quant_method"] == "compressed-tensors"
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "int", "group", 32, True)
    assert "lm_head" in q["ignore"]


def test_lossless_fp8_repack(mini_k2, converted):
    src, out = open_checkpoint(mini_k2["fp8"]), open_checkpoint(converted["fp8"])
    summary = json.loads((converted["fp8"] / "k2quant_convert.json").read_text())
    assert summary["quantized"] == 0
    for name, lt in src.tensors.items():
        a, b = src.stored(name), out.stored(name)
        if lt.format == "fp8_block":
            assert out.info(name).format == "fp8_scaled"
            assert torch.equal(a.parts["weight"].view(torch.uint8), b.parts["weight"].view(torch.uint8))
            assert torch.equal(a.parts["weight_scale_inv"], b.parts["weight_scale"])
        else:
            assert torch.equal(a.parts[next(iter(a.parts))], b.parts[next(iter(b.parts))])


def test_lossless_int4_repack_is_byte_identical(converted, tmp_path):
    """A K2-Thinking-style INT4 g32 source converted to int4-g32 again: the same bytes, nothing requantized."""
    src = converted["thinking"]
    s = _convert(src, tmp_path / "again", "k2-int4")
    assert s["quantized"] == 0
    for p in sorted(src.glob("model-*.safetensors")):
        assert p.read_bytes() == (tmp_path / "again" / p.name).read_bytes(), p.name


def test_inspect_and_open_model_read_the_output(converted):
    r = CliRunner().invoke(main, ["inspect", str(converted["k2-int4"]), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    routed = info["components"]["routed_experts"]
    assert 4.4 < routed["bits_per_weight"] < 4.6  # 4 bits + a bf16 scale per 32 + shape
    assert info["quantization"] == "compressed-tensors"


def test_mse_search_beats_rtn(mini_k2, tmp_path):
    ref = open_checkpoint(mini_k2["bf16"])
    errs = {}
    for method in ("rtn", "mse"):
        _convert(mini_k2["bf16"], tmp_path / method, "k2-int4", method=method)
        ck = open_checkpoint(tmp_path / method)
        n = "model.layers.2.mlp.experts.5.down_proj.weight"
        errs[method] = (ck.tensor(n) - ref.tensor(n)).pow(2).mean().item()
    assert errs["mse"] < 0.97 * errs["rtn"], errs


# ---------------------------------------------------------------------------- pipeline
def _src(tmp: Path, layers: int = 4, shards: int = 4) -> Path:
    cfg = k2_config_dict(**{**SMALL, "num_hidden_layers": layers})
    return write_synthetic_checkpoint(tmp / f"src{layers}", cfg, shards)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "k2quant_convert.json"}


def test_deterministic_and_workers_agree(tmp_path):
    src = _src(tmp_path)
    _convert(src, tmp_path / "a", "int4-all")
    _convert(src, tmp_path / "b", "int4-all")
    _convert(src, tmp_path / "c", "int4-all", workers=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b") == _files(tmp_path / "c")


def test_refuses_non_empty_and_finished_directories(tmp_path):
    src = _src(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(K2QuantError, match="not empty and was not created by k2quant convert"):
        _convert(src, tmp_path / "busy", "k2-int4")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    _convert(src, tmp_path / "done", "k2-int4")
    with pytest.raises(K2QuantError, match="already holds a finished conversion"):
        _convert(src, tmp_path / "done", "k2-int4")


def test_failure_leaves_nothing_that_looks_complete(tmp_path):
    src = _src(tmp_path)
    # a NaN scale in the last shard: found only when that shard's data is read
    from safetensors.torch import load_file, save_file

    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.mlp.experts.1.up_proj.weight_scale_inv"
    t = load_file(str(src / idx[name]))
    t[name] = t[name].clone()
    t[name][0, 0] = float("nan")
    save_file(t, str(src / idx[name]), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(K2QuantError, match="NaN or Inf"):
        _convert(src, out, "k2-int4")
    assert not (out / "model.safetensors.index.json").exists() and not (out / "config.json").exists()
    assert (out / JOURNAL).exists() and not list(out.glob("*.tmp"))
    with pytest.raises(K2QuantError, match="pass --resume"):
        _convert(src, out, "k2-int4")
    # a resume with other settings names them: a short one by value, a long one (the shard plan) by name
    with pytest.raises(K2QuantError, match=r'method: "rtn" then, "mse" now\)'):
        _convert(src, out, "k2-int4", method="mse", resume=True)
    changed = r'settings \(quantization_config; recipe: .*"k2-int4".* then, .*"int4-all".* now; shards\)'
    with pytest.raises(K2QuantError, match=changed):
        _convert(src, out, "int4-all", resume=True)


def test_bad_recipes_are_one_clear_error(tmp_path):
    src = _src(tmp_path)
    with pytest.raises(K2QuantError, match="unknown preset"):
        build_recipe("int3")
    with pytest.raises(K2QuantError, match="unknown scheme 'int5-g32'"):
        build_recipe("k2-int4", overrides=["experts=int5-g32"])
    with pytest.raises(K2QuantError, match="bad pattern"):
        build_recipe("k2-int4", overrides=["experts[=int4-g32"])
    with pytest.raises(K2QuantError, match=r"tensor 'model.layers.0.self_attn.kv_b_proj.weight': scheme int4-g128"):
        _convert(src, tmp_path / "o", "k2-int4", overrides=[r"kv_b_proj$=int4-g128"])  # input width 64


def test_recipe_file_and_per_expert_overrides(tmp_path):
    src = _src(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "k2-int4"\n[[override]]\npattern = "down_proj$"\nscheme = "int4-g64"\n'
                      "[[expert]]\nlayer = 2\nexperts = [1, 3]\nscheme = \"fp8-block\"\n")  # fmt: skip
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--recipe", str(recipe), "--json",
                                  "--method", "rtn"])  # fmt: skip
    assert r.exit_code == 0, r.output
    ck = open_checkpoint(tmp_path / "o")
    assert ck.info("model.layers.2.mlp.experts.1.gate_proj.weight").format == "fp8_scaled"
    assert ck.info("model.layers.2.mlp.experts.0.gate_proj.weight").format == "int4_pack"
    down = ck.info("model.layers.1.mlp.experts.0.down_proj.weight")
    assert down.shape[1] // down.parts["weight_scale"].shape[1] == 64
    summary = json.loads(r.output)
    assert summary["components"]["routed_experts"]["schemes"].keys() == {"int4-g32", "int4-g64", "fp8-block"}


KILL_SCRIPT = r"""
import sys
from k2quant.convert import convert
from k2quant.recipe import build_recipe
convert(sys.argv[1], sys.argv[2], build_recipe("int4-all"), method="mse", progress=False)
"""


def test_kill_and_resume_is_byte_identical(tmp_path):
    src = _src(tmp_path, layers=6, shards=6)
    _convert(src, tmp_path / "clean", "int4-all", method="mse")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(out)])
    deadline = time.time() + 120
    # kill once at least one shard is finished and recorded, while later ones are in flight
    while time.time() < deadline:
        j = out / JOURNAL
        if j.exists() and json.loads(j.read_text() or "{}").get("done"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors.index.json").exists(), "conversion finished before the kill"
    # then SIGTERM to a resumed run with 2 workers, once it has finished another shard: its workers are
    # stopped (not waited for), and it prints the command that resumes
    first = len(json.loads((out / JOURNAL).read_text())["done"])
    proc = subprocess.Popen([sys.executable, "-m", "k2quant", "convert", str(src), str(out), "--preset", "int4-all",
                             "--method", "mse", "--resume", "--workers", "2", "--json"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while len(json.loads((out / JOURNAL).read_text() or "{}").get("done", {})) <= first:  # journal: written atomically
        assert time.time() < deadline and proc.poll() is None, "the resumed run finished no shard, or ended"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    again = shlex.split(err.strip().splitlines()[-1])
    assert "interrupted (SIGTERM)" in err and again[:2] == ["k2quant", "convert"] and "--resume" in again, err
    assert not (out / "model.safetensors.index.json").exists(), "conversion finished before SIGTERM"
    r = CliRunner().invoke(main, again[1:])
    assert r.exit_code == 0, r.output
    assert _files(out) == _files(tmp_path / "clean")
    assert not (out / JOURNAL).exists()


RSS_SCRIPT = r"""
import sys
from k2quant.convert import convert
from k2quant.recipe import build_recipe
convert(sys.argv[1], sys.argv[2], build_recipe("int4-all"), method="rtn", progress=False)
from k2quant.memory import peak_rss
print(peak_rss())
"""


def test_peak_rss_does_not_grow_with_model_size(two_sizes, tmp_path):
    assert_peak_rss_independent_of_size(two_sizes, RSS_SCRIPT, tmp_path)


def test_cli_convert_summary(tmp_path):
    src = _src(tmp_path)
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--preset", "k2-int4", "--method", "rtn"])
    assert r.exit_code == 0, r.output
    assert "bits/weight" in r.output and "routed_experts" in r.output and "copied bit-exactly" in r.output
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o2")])
    assert r.exit_code == 1 and "no preset" in r.output


def test_signal_safe_temp_names(tmp_path):
    """Shards are written under .tmp names and renamed: no final name ever holds a partial file."""
    src = _src(tmp_path)
    _convert(src, tmp_path / "o", "k2-int4")
    assert not list((tmp_path / "o").glob("*.tmp"))
    assert os.path.exists(tmp_path / "o" / "model.safetensors.index.json")


@pytest.mark.parametrize("name", ["int4-g32", "int4-g64-asym", "int4-g128-r7", "fp8-block", "bf16"])
def test_scheme_layout_is_what_quantize_returns(name):
    from k2quant.quant.schemes import parse_scheme

    scheme = parse_scheme(name)
    for shape in [(300, 256), (512, 1024)]:
        parts = scheme.quantize(torch.randn(shape))
        assert sorted((k, str(v.dtype), tuple(v.shape)) for k, v in parts.items()) == sorted(
            (k, str(d), s) for k, d, s in scheme.layout(shape)
        )


def test_bf16_override_from_an_fp8_source(tiny_fp8_dir, tmp_path):
    """Attention overridden to bf16 from the FP8 release: decoded, then stored as bf16, and listed as unquantized."""
    out = tmp_path / "o"
    _convert(tiny_fp8_dir, out, "k2-int4", overrides=[r"self_attn\.=bf16"])
    ck = open_checkpoint(out)
    name = "model.layers.1.self_attn.q_b_proj.weight"
    assert ck.info(name).format == "dense" and ck.stored(name).parts["weight"].dtype == torch.bfloat16
    assert torch.equal(ck.tensor(name), open_checkpoint(tiny_fp8_dir).tensor(name).to(torch.bfloat16).float())
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    mod = "model.layers.1.self_attn.q_b_proj"
    assert any(re.fullmatch(i[3:], mod) if i.startswith("re:") else i == mod for i in ignore), ignore
