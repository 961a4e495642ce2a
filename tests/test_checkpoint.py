"""The streaming reader: layouts, decoding against the formats' definitions, groups, memory, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from k2quant import CheckpointError, open_checkpoint
from k2quant.quant.fp8 import quantize_fp8_block
from k2quant.quant.int4 import pack_int4, unpack_int4
from k2quant.synthetic import k2_config_dict, write_synthetic_checkpoint

from .conftest import SMALL


def small_ckpt(tmp: Path, shards: int = 3, style: str = "k2", fp8: bool = True, **kw) -> Path:
    return write_synthetic_checkpoint(tmp / "ckpt", k2_config_dict(**{**SMALL, **kw}), shards, fp8=fp8, style=style)


# ---------------------------------------------------------------- layouts and order
@pytest.mark.parametrize(
    "style, first", [("k2", "model-1-of-12.safetensors"), ("hf", "model-00001-of-000012.safetensors")]
)
def test_shard_namings_and_numeric_shard_order(tmp_path, style, first):
    ck = open_checkpoint(small_ckpt(tmp_path, shards=12, style=style, num_hidden_layers=12))
    assert ck.shards[0].name == first
    # model-10-of-12 comes after model-9-of-12 (numeric, not lexicographic)
    assert [int(p.name.split("-")[1]) for p in ck.shards] == list(range(1, 13))
    names = ck.names()
    # shard order first (layers are spread over the shards in order); inside a shard, byte order
    assert ck.info(names[0]).shard == 0 and ck.info("model.embed_tokens.weight").shard == 0
    layer_of = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)
    offsets = [min(p.start for p in ck.info(n).parts.values()) for n in names if ck.info(n).shard == 5]
    assert offsets == sorted(offsets)


def test_single_file_checkpoint(tmp_path):
    src = small_ckpt(tmp_path, shards=1)
    ck = open_checkpoint(src)
    assert len(ck.shards) == 1
    merged = {}
    for p in ck.shards:
        merged.update(load_file(str(p)))
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(src / "config.json", single)
    save_file(merged, str(single / "model.safetensors"))
    ck2 = open_checkpoint(single)
    assert ck2.names() and set(ck2.names()) == set(ck.names())
    n = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert torch.equal(ck2.tensor(n), ck.tensor(n))


# ---------------------------------------------------------------- decoding
def _deepseek_dequant(w: torch.Tensor, s: torch.Tensor, b: int = 128) -> torch.Tensor:
    """DeepSeek's definition: zero-pad to whole 128x128 blocks, multiply each block by its scale, crop."""
    r, c = w.shape
    pad = torch.zeros(math.ceil(r / b) * b, math.ceil(c / b) * b)
    pad[:r, :c] = w.float()
    out = pad.view(pad.shape[0] // b, b, pad.shape[1] // b, b) * s[:, None, :, None]
    return out.view(pad.shape)[:r, :c]


@pytest.mark.parametrize("shape", [(576, 7168 // 8), (300, 200), (128, 256), (1, 129)])
def test_fp8_block_decode_unaligned_edges(tmp_path, shape):
    w = torch.randn(shape) * 3
    q, s = quantize_fp8_block(w)
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    ck = small_ckpt(tmp_path, shards=1)
    name = "extra.unaligned_proj"
    # one linear with an unaligned shape, opened non-strictly
    d = tmp_path / "one"
    d.mkdir()
    cfg = json.loads((ck / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({name + ".weight": q, name + ".weight_scale_inv": s}, str(d / "model.safetensors"))
    c = open_checkpoint(d, strict=False)
    lt = c.info(name + ".weight")
    assert lt.format == "fp8_block" and lt.shape == shape
    got = c.tensor(name + ".weight")
    assert torch.equal(got, _deepseek_dequant(q, s))
    assert (got - w).abs().max() <= w.abs().max() / 448 * 16  # e4m3 has 3 mantissa bits
    st = c.stored(name + ".weight")
    assert torch.equal(st.parts["weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(st.parts["weight_scale_inv"], s)


def test_int4_pack_layout_matches_compressed_tensors():
    from compressed_tensors.compressors import pack_to_int32, unpack_from_int32

    row = torch.arange(-8, 8, dtype=torch.int8)[None]
    assert pack_int4(row).tolist() == [[0x76543210, 0xFEDCBA98 - 2**32]]
    q = torch.randint(-8, 8, (37, 77), dtype=torch.int8)
    assert torch.equal(pack_int4(q), pack_to_int32(q, 4))
    assert torch.equal(unpack_int4(pack_int4(q), 77), unpack_from_int32(pack_to_int32(q, 4), 4, torch.Size([37, 77])))


def _ct_int4_dir(tmp: Path, symmetric: bool) -> tuple[Path, dict]:
    """A checkpoint whose routed experts are INT4 g32 compressed by compressed-tensors itself."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    src = small_ckpt(tmp, shards=2, fp8=False)
    ck = open_checkpoint(src)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    out: dict[str, torch.Tensor] = {}
    originals = {}
    for name in ck.names():
        w = ck.tensor(name, torch.bfloat16)
        if ".experts." not in name:
            out[name] = w if not name.endswith("bias") else ck.tensor(name)
            continue
        g = w.float().view(w.shape[0], -1, 32)
        if symmetric:
            scale = (g.abs().amax(-1) / 7.5).to(torch.bfloat16)
            zp = None
        else:
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale = ((hi - lo) / 15).to(torch.bfloat16)
            zp = (-8 - torch.round(lo / scale.float())).clamp(-8, 7).to(torch.int8)
        sd = {"weight": w, "weight_scale": scale}
        if zp is not None:
            sd["weight_zero_point"] = zp
        comp = PackedQuantizationCompressor.compress(sd, scheme)
        base = name.removesuffix(".weight")
        for k, v in comp.items():
            out[f"{base}.{k}"] = v
        originals[name] = (comp, scheme)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump()}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    }
    d = tmp / f"int4-{symmetric}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(d / "model.safetensors"))
    return d, originals


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_pack_quantized_decodes_exactly_like_compressed_tensors(tmp_path, symmetric):
    from compressed_tensors.compressors import PackedQuantizationCompressor

    d, originals = _ct_int4_dir(tmp_path, symmetric)
    ck = open_checkpoint(d)
    for name, (comp, scheme) in originals.items():
        lt = ck.info(name)
        assert lt.format == "int4_pack"
        assert ("weight_zero_point" in lt.parts) == (not symmetric)
        ref = PackedQuantizationCompressor.decompress(comp, scheme)["weight"]
        assert torch.equal(ck.tensor(name), ref.float()), name
        st = ck.stored(name)
        assert torch.equal(st.parts["weight_packed"], comp["weight_packed"])


def test_compressed_tensors_float_quantized_fp8(tmp_path):
    ck = small_ckpt(tmp_path, shards=1)
    c = open_checkpoint(ck)
    name = "model.layers.0.self_attn.o_proj.weight"
    st = c.stored(name)
    d = tmp_path / "ctfp8"
    d.mkdir()
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "strategy": "block",
                    "block_structure": [128, 128],
                },
            }
        },
    }
    (d / "config.json").write_text(json.dumps(cfg))
    w = torch.randn(300, 200)
    q, s = quantize_fp8_block(w)
    save_file(
        {
            "a.weight": st.parts["weight"],
            "a.weight_scale": st.parts["weight_scale_inv"],
            "b.weight": q,
            "b.weight_scale": s,
            "c.weight": q.clone(),
            "c.weight_scale": torch.rand(300, 1),
        },
        str(d / "model.safetensors"),
    )
    c2 = open_checkpoint(d, strict=False)
    assert c2.info("a.weight").format == "fp8_scaled"
    assert torch.equal(c2.tensor("a.weight"), c.tensor(name))
    assert torch.equal(c2.tensor("b.weight"), _deepseek_dequant(q, s))
    assert c2.info("c.weight").block is None  # per-channel scales
    assert torch.allclose(c2.tensor("c.weight"), q.float() * c2.stored("c.weight").parts["weight_scale"])


# ---------------------------------------------------------------- groups
def test_groups(tmp_path):
    ck = open_checkpoint(small_ckpt(tmp_path, shards=3))
    per_expert = list(ck.groups("expert"))
    per_layer = list(ck.groups("layer"))
    experts = [g for g in per_expert if g.kind == "expert"]
    assert len(experts) == 2 * 4  # 2 MoE layers x 4 experts
    assert experts[0].names == tuple(
        f"model.layers.1.mlp.experts.0.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    )
    stacks = [g for g in per_layer if g.kind == "experts"]
    assert [g.layer for g in stacks] == [1, 2] and len(stacks[0].names) == 12
    linears = {g.key for g in per_expert if g.kind == "linear"}
    assert "model.layers.0.mlp.gate_proj.weight" in linears and "lm_head.weight" in linears
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in linears
    # every logical tensor exactly once, in shard order
    flat = [n for g in per_expert for n in g.names]
    assert sorted(flat) == sorted(ck.names()) and len(flat) == len(set(flat))
    shard_seq = [ck.info(g.names[0]).shard for g in per_expert]
    assert shard_seq == sorted(shard_seq)


# ---------------------------------------------------------------- memory
RSS_SCRIPT = r"""
import os, sys, torch
from k2quant import open_checkpoint

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

ck = open_checkpoint(sys.argv[1])
base = peak = rss()
largest = 0
for g in ck.groups("expert"):
    ws = {n: ck.tensor(n) for n in g.names}
    peak = max(peak, rss())  # sampled while the group's stored and dequantized tensors are alive
    largest = max(largest, sum(w.numel() * 4 for w in ws.values()) + sum(ck.info(n).stored_bytes for n in g.names))
    del ws
print(base, peak, largest, ck.total_bytes)
"""


def _peak(path: Path) -> tuple[int, int, int, int]:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    return tuple(int(v) for v in out.stdout.split())


def test_peak_rss_does_not_grow_with_checkpoint_size(two_sizes):
    """Iterating (and dequantizing) every group: the peak depends on the largest group, not on size."""
    b_s, p_s, largest, size_s = _peak(two_sizes[0])
    b_l, p_l, _, size_l = _peak(two_sizes[1])
    assert size_l > 4 * size_s
    growth = (p_l - b_l) - (p_s - b_s)
    # the large checkpoint is ~6x the small one; its iteration peak may differ by noise only
    assert growth < 0.1 * (size_l - size_s), (growth, size_s, size_l)
    assert p_l - b_l < 8 * largest + 64 * 2**20, (p_l - b_l, largest)


# ---------------------------------------------------------------- bad input
def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d: Path, idx: dict) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_missing_shard(tmp_path):
    d = small_ckpt(tmp_path)
    os.remove(d / "model-2-of-3.safetensors")
    with pytest.raises(CheckpointError, match=r"model-2-of-3.safetensors.*missing"):
        open_checkpoint(d)


def test_truncated_shard(tmp_path):
    d = small_ckpt(tmp_path)
    p = d / "model-3-of-3.safetensors"
    os.truncate(p, p.stat().st_size - 100)
    with pytest.raises(
        CheckpointError, match=r"model-3-of-3.safetensors: tensor '.*': data ends at byte \d+ but the file has"
    ):
        open_checkpoint(d)


def test_header_length_beyond_file(tmp_path):
    d = small_ckpt(tmp_path)
    p = d / "model-1-of-3.safetensors"
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", p.stat().st_size + 10))
    with pytest.raises(CheckpointError, match="model-1-of-3.safetensors: header length .* beyond the end"):
        open_checkpoint(d)


def test_empty_and_garbage_shard(tmp_path):
    d = small_ckpt(tmp_path)
    (d / "model-1-of-3.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        open_checkpoint(d)
    (d / "model-1-of-3.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        open_checkpoint(d)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_path_outside_directory(tmp_path, target):
    d = small_ckpt(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((d / "model-1-of-3.safetensors").read_bytes())
    idx = _index(d)
    idx["weight_map"]["model.embed_tokens.weight"] = target
    _write_index(d, idx)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        open_checkpoint(d)


def test_symlinked_shards_as_the_hugging_face_cache_holds_them(tmp_path):
    """snapshots/<rev>/*.safetensors are links to ../../blobs/<hash>: allowed, judged by the index's names;
    a name that climbs out (`..`) stays refused even when the file it reaches is a shard."""
    src = small_ckpt(tmp_path)
    repo = tmp_path / "models--k2" / "snapshots" / "abc123"
    blobs = tmp_path / "models--k2" / "blobs"
    repo.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(src.iterdir()):
        (blobs / f"{f.name}.blob").write_bytes(f.read_bytes())
        os.symlink(Path("../../blobs") / f"{f.name}.blob", repo / f.name)
    ck = open_checkpoint(repo)
    ref = open_checkpoint(src)
    assert torch.equal(ck.tensor("model.embed_tokens.weight"), ref.tensor("model.embed_tokens.weight"))
    idx = _index(repo)
    (repo / "model.safetensors.index.json").unlink()  # a link into blobs/: write the edited index in its place
    idx["weight_map"]["model.embed_tokens.weight"] = "../../blobs/model-1-of-3.safetensors.blob"
    _write_index(repo, idx)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        open_checkpoint(repo)


def test_tensor_missing_from_index(tmp_path):
    d = small_ckpt(tmp_path)
    idx = _index(d)
    del idx["weight_map"]["model.layers.1.mlp.experts.2.up_proj.weight"]
    del idx["weight_map"]["model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"]
    _write_index(d, idx)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.experts.2.up_proj.weight': missing"):
        open_checkpoint(d)


def test_tensor_missing_from_shard(tmp_path):
    d = small_ckpt(tmp_path)
    idx = _index(d)
    idx["weight_map"]["model.layers.9.bogus.weight"] = "model-1-of-3.safetensors"
    _write_index(d, idx)
    with pytest.raises(
        CheckpointError, match=r"model-1-of-3.safetensors: tensor 'model.layers.9.bogus.weight': listed"
    ):
        open_checkpoint(d)


def _rewrite(d: Path, fname: str, edit) -> None:
    tensors = load_file(str(d / fname))
    edit(tensors)
    save_file(tensors, str(d / fname), metadata={"format": "pt"})


def test_scale_shape_mismatch(tmp_path):
    d = small_ckpt(tmp_path)
    n = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    fname = _index(d)["weight_map"][n]
    _rewrite(d, fname, lambda t: t.__setitem__(n, torch.ones(5, 5)))
    with pytest.raises(CheckpointError, match=rf"tensor '{n}': shape \[5, 5\] does not fit weight"):
        open_checkpoint(d)


def test_scale_dtype_mismatch(tmp_path):
    d = small_ckpt(tmp_path)
    n = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    fname = _index(d)["weight_map"][n]
    _rewrite(d, fname, lambda t: t.__setitem__(n, t[n].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"tensor '{n}': expected float32"):
        open_checkpoint(d)


def test_weight_dtype_mismatch(tmp_path):
    d = small_ckpt(tmp_path)
    n = "model.layers.0.self_attn.o_proj.weight"
    fname = _index(d)["weight_map"][n]
    _rewrite(d, fname, lambda t: t.__setitem__(n, t[n].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"tensor '{n}': has a weight_scale_inv but is torch.bfloat16"):
        open_checkpoint(d)


def test_weight_shape_mismatch_with_config(tmp_path):
    d = small_ckpt(tmp_path, fp8=False)
    n = "model.layers.0.input_layernorm.weight"
    fname = _index(d)["weight_map"][n]
    _rewrite(d, fname, lambda t: t.__setitem__(n, torch.ones(7)))
    with pytest.raises(CheckpointError, match=rf"tensor '{n}': shape \[7\] does not match config.json"):
        open_checkpoint(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_scales(tmp_path, bad):
    d = small_ckpt(tmp_path)
    n = "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"
    fname = _index(d)["weight_map"][n]

    def edit(t):
        s = t[n].clone()
        s[0, 0] = bad
        t[n] = s

    _rewrite(d, fname, edit)
    ck = open_checkpoint(d)  # headers are fine; the data is read lazily
    with pytest.raises(
        CheckpointError,
        match=rf"{fname}: tensor 'model.layers.1.mlp.experts.0.down_proj.weight': "
        "weight_scale_inv holds NaN or Inf",
    ):
        ck.tensor("model.layers.1.mlp.experts.0.down_proj.weight")


def test_not_a_directory_and_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        open_checkpoint(tmp_path / "nope")
    d = small_ckpt(tmp_path)
    os.remove(d / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        open_checkpoint(d)


def test_file_shrinking_after_open_is_an_error_not_a_crash(tmp_path):
    d = small_ckpt(tmp_path)
    ck = open_checkpoint(d)
    p = d / "model-3-of-3.safetensors"
    os.truncate(p, 1000)
    with pytest.raises(CheckpointError, match="shrank"):
        ck.tensor("lm_head.weight")


def test_open_computes_the_expected_inventory_once(tmp_path, monkeypatch):
    """The config's tensor inventory is built once per open, not once per INT4 tensor (that was quadratic:
    minutes for a few thousand experts, hours for K2-Thinking's 69k)."""
    import k2quant.checkpoint as checkpoint_module
    from k2quant.convert import convert
    from k2quant.recipe import build_recipe

    src = small_ckpt(tmp_path, n_routed_experts=16)
    convert(src, tmp_path / "int4", build_recipe("k2-int4"), method="rtn", progress=False)
    calls = []
    real = checkpoint_module.expected_shapes
    monkeypatch.setattr(checkpoint_module, "expected_shapes", lambda c: calls.append(1) or real(c))
    ck = open_checkpoint(tmp_path / "int4")
    assert sum(lt.format == "int4_pack" for lt in ck.tensors.values()) == 2 * 16 * 3
    assert len(calls) == 1


def test_stored_row_slices_dequantize_like_the_whole(tiny_fp8_dir, tmp_path):
    from k2quant.convert import convert
    from k2quant.recipe import build_recipe

    for path in (tiny_fp8_dir, None):
        if path is None:  # an INT4 (asymmetric, packed zero points) checkpoint
            path = tmp_path / "int4"
            convert(tiny_fp8_dir, path, build_recipe("int4-all", overrides=[".=int4-g32-asym"]), method="rtn",
                    progress=False)  # fmt: skip
        ck = open_checkpoint(path)
        for name in ck.names():
            lt = ck.info(name)
            if len(lt.shape) != 2 or lt.shape[0] <= 128:
                continue
            whole = ck.tensor(name)
            part = ck.stored(name).rows(128, lt.shape[0]).dequantize()
            assert torch.equal(part, whole[128:]), name
    with pytest.raises(ValueError, match="multiples of 128"):
        ck.stored(name).rows(5, 10)
