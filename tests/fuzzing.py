"""Fuzzing k2quant's readers: valid files made here, mutated, and read in a child process under limits.

tests/test_fuzz.py draws a few hundred cases per reader with hypothesis; bench/fuzz.py draws
thousands and prints a table. A case is one reader and its files, one or two of them mutated:
bytes flipped, cut, inserted, deleted or duplicated; a value of a JSON document (a safetensors
header, config.json, a JSONL line, ...) replaced by a random one, deleted, added or perturbed; a
length, count, type, dimension or offset field of a binary header (safetensors, GGUF, .npy) set
to a lying value; lines of a text format (tiktoken.model, TOML, JSONL) dropped, repeated, swapped
or edited.

The reader runs in a worker process (spawned, so it shares nothing with the test process) that
handles cases one after another and reports each:

- "opened": the reader opened the files and read everything in them without an error;
- "refused": it raised a K2QuantError (a subclass) whose message names a file of the case;
- anything else fails the case: another exception type, a K2QuantError naming no file, a
  MemoryError (the worker runs under an address-space limit, RLIMIT_AS, of what it holds after
  start-up plus LIMIT_HEADROOM: memory sized by a lying length field hits it), a hang (no answer
  within the time limit: the worker is killed), the worker dying (a signal: SIGBUS, SIGSEGV, an
  abort), or a file opened or a directory listed outside the case's directory (an audit hook on
  'open', 'os.listdir' and 'os.scandir'; Python's own library and site-packages are allowed).
"""

from __future__ import annotations

import ast
import base64
import bisect
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

LIMIT_HEADROOM = 1 << 30  # bytes of address space a case may use beyond the worker's own after start-up
CASE_TIMEOUT = float(os.environ.get("K2QUANT_FUZZ_TIMEOUT", "30"))  # seconds per case before it counts as a hang

# the tiny K2 every model file here is made for (FP8 blocks, INT4 groups of 32 and Q8_0 rows all fit)
TINY = dict(
    vocab_size=576, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
    max_position_embeddings=256, bos_token_id=320, eos_token_id=321,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1.0,
                  "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
)  # fmt: skip
NUM_BASE = 320  # tokenizer ranks: 256 bytes and 64 merges; with K2's 256 specials, the vocabulary of TINY
FINGERPRINT = "fuzz-fingerprint"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2? 请回答。"},
    {"role": "assistant", "content": "", "reasoning_content": "add",
     "tool_calls": [{"id": "functions.add:0", "type": "function",
                     "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]},
    {"role": "tool", "tool_call_id": "functions.add:0", "content": "4"},
    {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
    {"role": "user", "content": "Thanks"},
]  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]  # fmt: skip


# ============================================================================ the valid files
def _tiny_config(**overrides) -> dict:
    from k2quant.synthetic import k2_config_dict

    return k2_config_dict(**{**TINY, **overrides})


def _tokenizer_files(chat_template: str | None) -> dict[str, bytes]:
    from k2quant.calib.datasets import bundled_texts
    from k2quant.formats.tokenizer import save_tokenizer, train_bpe

    texts = bundled_texts()
    ranks = train_bpe([texts["en_prose.txt"][:3000], texts["zh_prose.txt"][:800]], NUM_BASE)
    with tempfile.TemporaryDirectory() as d:
        save_tokenizer(d, ranks, chat_template)
        return {n: (Path(d) / n).read_bytes() for n in ("tiktoken.model", "tokenizer_config.json")}


def _dir_files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _fp8_checkpoint() -> dict[str, bytes]:
    from k2quant.synthetic import write_synthetic_checkpoint

    with tempfile.TemporaryDirectory() as d:
        return _dir_files(write_synthetic_checkpoint(Path(d) / "ckpt", _tiny_config(), 2, fp8=True))


def _int4_checkpoint() -> dict[str, bytes]:
    """BF16 with the routed experts INT4 g16 in compressed-tensors' pack-quantized layout (expert 0 asymmetric)."""
    import torch

    from k2quant.config import K2Config
    from k2quant.formats.hf import save_safetensors
    from k2quant.names import expected_shapes, parse_name
    from k2quant.quant.int4 import pack_int4, pack_zero_point
    from k2quant.synthetic import random_tensor

    cfg = _tiny_config()
    cfg.pop("quantization_config")
    g = torch.Generator().manual_seed(4)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(K2Config.from_dict(cfg)).items():
        ni = parse_name(name)
        if ni.component != "routed_experts":
            out[name] = random_tensor(name, shape).to(torch.bfloat16 if len(shape) == 2 else torch.float32)
            continue
        base = name.removesuffix(".weight")
        rows, cols = shape
        out[base + ".weight_packed"] = pack_int4(torch.randint(-8, 8, shape, generator=g, dtype=torch.int8))
        out[base + ".weight_scale"] = (0.01 + torch.rand(rows, cols // 16, generator=g)).to(torch.bfloat16)
        out[base + ".weight_shape"] = torch.tensor(shape, dtype=torch.int64)
        if ni.expert == 0:
            z = torch.randint(-8, 8, (rows, cols // 16), generator=g, dtype=torch.int8)
            out[base + ".weight_zero_point"] = pack_zero_point(z)
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        save_safetensors(Path(d) / "model.safetensors", out)
        return {"config.json": json.dumps(cfg, indent=2).encode(), **_dir_files(Path(d))}


def _safetensors_file() -> bytes:
    """One file with every dtype the reader knows, an empty tensor and metadata."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(1)
    t = {
        "a.f32": torch.randn(3, 4, generator=g),
        "b.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "d.f8": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn),
        "e.f8e5m2": torch.randn(3, generator=g).to(torch.float8_e5m2),
        "f.f64": torch.randn(2, generator=g).double(),
        "g.i64": torch.arange(3, dtype=torch.int64),
        "h.i32": torch.arange(4, dtype=torch.int32).view(2, 2),
        "i.i16": torch.arange(2, dtype=torch.int16),
        "j.i8": torch.arange(-2, 2, dtype=torch.int8),
        "k.u8": torch.arange(5, dtype=torch.uint8),
        "l.bool": torch.tensor([True, False, True]),
        "m.empty": torch.zeros(0, 4),
        "n.scalar": torch.tensor(2.5),
    }
    return save(t, metadata={"format": "pt", "note": "fuzz"})


def _gguf_model(split: bool) -> dict[str, bytes]:
    """A deepseek2 GGUF of TINY (Q8_0 where rows allow, else F16; norms and router F32), one file or a
    gguf-split set of two."""
    import gguf
    import numpy as np
    import torch

    from k2quant.config import K2Config
    from k2quant.formats.chat import K2_CHAT_TEMPLATE
    from k2quant.formats.gguf import ARCH, add_metadata, tensor_map

    cfg = K2Config.from_dict(_tiny_config())
    g = torch.Generator().manual_seed(2)
    with tempfile.TemporaryDirectory() as d:
        maps = tensor_map(cfg)
        w = gguf.GGUFWriter(str(Path(d) / "model.gguf"), ARCH, split_max_tensors=len(maps) // 2 + 1 if split else 0)
        add_metadata(w, cfg, "fuzz", 7)
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"tok{i}" for i in range(24)])
        w.add_chat_template(K2_CHAT_TEMPLATE)
        for gt in maps:
            data = (0.1 * torch.randn(gt.shape, generator=g)).numpy().astype(np.float32)
            if gt.kind == "f32":
                w.add_tensor(gt.name, data)
            elif gt.shape[-1] % 32 == 0 and gt.kind in ("plain", "experts"):
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gt.name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(gt.name, data.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return _dir_files(Path(d))


def _imatrix() -> bytes:
    import torch

    from k2quant.formats.imatrix import write_imatrix

    g = torch.Generator().manual_seed(3)
    sums, counts = {}, {}
    for m, n_in in (("model.layers.0.self_attn.q_a_proj", 32), ("model.layers.0.mlp.down_proj", 64),
                    ("model.layers.1.self_attn.kv_b_proj", 32), ("lm_head", 32)):  # fmt: skip
        sums[m], counts[m] = torch.rand(n_in, generator=g, dtype=torch.float64) * 9, 512
    for e in range(4):
        for proj, n_in in (("gate_proj", 32), ("down_proj", 32)):
            m = f"model.layers.1.mlp.experts.{e}.{proj}"
            sums[m], counts[m] = torch.rand(n_in, generator=g, dtype=torch.float64), 40 + e
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "imatrix.gguf"
        write_imatrix(p, sums, counts, 4, ["fuzz.txt"], 8, 64)
        return p.read_bytes()


def _calib_files() -> dict[str, bytes]:
    lines = [{"text": "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸。"},
             {"messages": MESSAGES, "tools": TOOLS}, {"text": "Numbers 123 4567 and symbols <>{}[]."},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]  # fmt: skip
    text = "Calibration text, plain prose.\nA second line: 中文也有。\n\n" * 4
    return {
        "data.txt": text.encode(),
        "data.jsonl": "\n".join(json.dumps(x, ensure_ascii=False) for x in lines).encode(),
    }


def _recipes() -> dict[str, bytes]:
    st_recipe = """preset = "k2-int4"
[[override]]
pattern = 'mlp\\.experts\\.\\d+\\.down_proj$'
scheme = "int4-g128"
[[override]]
pattern = 'self_attn\\.o_proj'
scheme = "fp8-block"
[[expert]]
layer = 1
experts = [0, 3]
scheme = "int4-g32-asym"
"""
    gguf_recipe = """preset = "q4_k_m"
[[override]]
pattern = 'ffn_down_exps'
scheme = "q8_0"
[[expert]]
layer = 1
experts = [0, 1, 2, 3]
scheme = "q6_k"
"""
    return {"recipe.toml": st_recipe.encode(), "recipe-gguf.toml": gguf_recipe.encode()}


def _hotness() -> bytes:
    n = [40, 7, 0, 17]
    layer = {"routed_tokens": n, "frequency": [x / sum(n) for x in n], "mean_weight": [0.4, 0.3, 0.0, 0.2],
             "topped_up_tokens": [0, 0, 4, 0]}  # fmt: skip
    return json.dumps({"1": layer}, indent=2).encode()


def _tokens() -> dict[str, bytes]:
    import io

    import numpy as np

    ids = [(i * 37) % 576 for i in range(64)]
    buf = io.BytesIO()
    np.save(buf, np.array(ids, dtype=np.int32), allow_pickle=False)
    return {"tokens.npy": buf.getvalue(), "tokens.json": json.dumps(ids).encode()}


CALIB_KEY = {"k2quant": "fuzz", "tokens": 16, "ctx": 8, "source": "s", "tokens_digest": "t"}
CALIB_HIDDEN = [(1, 8, TINY["hidden_size"]), (1, 8, TINY["hidden_size"])]


def _calibrate_state() -> dict[str, bytes]:
    """What an interrupted `calibrate` of TINY leaves after both layers (calib/resume.py): state.json,
    each layer's statistics (one Hessian too) and the hidden states after the last."""
    import torch

    from k2quant.calib.collect import CalibStats
    from k2quant.calib.resume import CalibrationState

    g = torch.Generator().manual_seed(0)
    e, h = TINY["n_routed_experts"], TINY["hidden_size"]
    stats = CalibStats(tokens=16, hessians={})
    for layer in range(TINY["num_hidden_layers"]):
        for m in ("self_attn.q_a_proj", "mlp.experts.0.down_proj" if layer else "mlp.up_proj"):
            n = TINY["moe_intermediate_size"] if "down" in m else h
            stats.in_sum2[f"model.layers.{layer}.{m}"] = torch.rand(n, generator=g, dtype=torch.float64)
            stats.counts[f"model.layers.{layer}.{m}"] = 16
        stats.hessians[f"model.layers.{layer}.self_attn.q_a_proj"] = torch.rand(h, h, generator=g, dtype=torch.float64)
        if layer:
            stats.routed[layer] = torch.tensor([8, 4, 4, 0])
            stats.weight_sum[layer] = torch.rand(e, generator=g, dtype=torch.float64)
            stats.topped_up[layer] = torch.zeros(e, dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp:
        state = CalibrationState(Path(tmp), CALIB_KEY, TINY["num_hidden_layers"], e, CALIB_HIDDEN, {1})
        state.open(resume=False)
        for layer in range(TINY["num_hidden_layers"]):
            state.save_layer(layer, [torch.randn(s, generator=g) for s in CALIB_HIDDEN], stats)
        return {f"out/{k}": v for k, v in _dir_files(Path(tmp)).items()}


DIFF_KEY = {"k2quant": "fuzz", "ctx": 8, "chunks": 6, "batch": 2, "reference": "r", "candidate": "c",
            "tokens_digest": "t"}  # fmt: skip
DIFF_BATCHES = 3


def _diff_state() -> dict[str, bytes]:
    """What an interrupted `diff` of TINY against itself leaves after two of three batches
    (report/diff_state.py): state.json and the progress file it names."""
    import torch

    from k2quant.report.diff_state import LAYER_SUMS, TOKEN_KEYS, DiffProgress, DiffState

    g = torch.Generator().manual_seed(0)
    layers, e = TINY["num_hidden_layers"], TINY["n_routed_experts"]
    with tempfile.TemporaryDirectory() as tmp:
        state = DiffState(Path(tmp), DIFF_KEY, layers, e, DIFF_BATCHES)
        state.open(resume=False)
        p = DiffProgress(2, {k: torch.rand(layers, generator=g, dtype=torch.float64) for k in LAYER_SUMS},
                         torch.rand(layers, e, generator=g, dtype=torch.float64), 32,
                         {k: torch.rand(12, generator=g, dtype=torch.float64) for k in TOKEN_KEYS})  # fmt: skip
        state.save(p)
        return {f"out/{k}": v for k, v in _dir_files(Path(tmp)).items()}


SPOOL_MODULES = [f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(2)]


def _gptq_spool() -> dict[str, bytes]:
    """What an interrupted layer-streamed GPTQ leaves (gptq_stream.py): one finished layer's packed INT4
    parts, made for FINGERPRINT, and its fallbacks file."""
    import torch

    from k2quant.formats.safetensors_file import write_tensors
    from k2quant.quant.int4 import pack_int4

    g = torch.Generator().manual_seed(0)
    n, k = TINY["hidden_size"], TINY["moe_intermediate_size"]
    tensors = {}
    for m in SPOOL_MODULES:
        tensors[m + ".weight_packed"] = pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8))
        tensors[m + ".weight_scale"] = torch.rand(n, k // 16, generator=g).bfloat16()
        tensors[m + ".weight_shape"] = torch.tensor([n, k])
    with tempfile.TemporaryDirectory() as tmp:
        write_tensors(Path(tmp) / "layer-001.safetensors", tensors, {"format": "pt", "k2quant_plan": FINGERPRINT})
        (Path(tmp) / "layer-001.fallbacks.json").write_text(json.dumps(["model.layers.1.mlp.experts.3.up_proj"]))
        return {f"out/.gptq-spool/{k}": v for k, v in _dir_files(Path(tmp)).items()}


def _hessians() -> dict[str, bytes]:
    """calibrate --hessian's file for TINY's routed experts (X^T X of random activations), as
    `convert --method gptq --calib calib` reads it beside the FP8 checkpoint; the last expert has none,
    so its modules take the weighted search (as modules with too few tokens do)."""
    import torch

    from k2quant.formats.safetensors_file import write_tensors

    g = torch.Generator().manual_seed(0)
    h, moe = TINY["hidden_size"], TINY["moe_intermediate_size"]
    tensors = {}
    for e in range(TINY["n_routed_experts"] - 1):
        for m, n in (("gate_proj", h), ("up_proj", h), ("down_proj", moe)):
            x = torch.randn(4 * n, n, generator=g)
            tensors[f"model.layers.1.mlp.experts.{e}.{m}.hessian"] = x.T @ x
    with tempfile.TemporaryDirectory() as tmp:
        write_tensors(Path(tmp) / "hessians.safetensors", tensors)
        return {"calib/hessians.safetensors": (Path(tmp) / "hessians.safetensors").read_bytes()}


def make_bases() -> dict[str, dict[str, bytes]]:
    """Every reader's valid files, by base name (deterministic: seeded and trained the same each time)."""
    from k2quant.formats.chat import K2_CHAT_TEMPLATE

    tok = _tokenizer_files(K2_CHAT_TEMPLATE)
    tok_plain = _tokenizer_files(None)
    fp8 = _fp8_checkpoint()
    gen = {"temperature": 0.6, "top_p": 0.95, "do_sample": True, "bos_token_id": 320, "eos_token_id": [321, 322]}
    gen = {"generation_config.json": json.dumps(gen).encode()}
    journal = {"fingerprint": FINGERPRINT, "done": {
        "model-1-of-2.safetensors": {"size": len(fp8["model-1-of-2.safetensors"]),
                                     "sha256": hashlib.sha256(fp8["model-1-of-2.safetensors"]).hexdigest()},
        "model-2-of-2.safetensors": 12345}}  # fmt: skip
    cfg = json.dumps(_tiny_config(), indent=2).encode()
    return {
        "safetensors": {"file.safetensors": _safetensors_file()},
        "fp8": fp8,
        "int4": _int4_checkpoint(),
        "gen": {**gen, "config.json": fp8["config.json"]},
        "gguf": _gguf_model(split=False),
        "gguf-split": _gguf_model(split=True),
        "imatrix": {"imatrix.gguf": _imatrix()},
        "tokenizer": tok,
        "jinja": {**tok_plain, "chat_template.jinja": K2_CHAT_TEMPLATE.encode()},
        "recipe": _recipes(),
        "calib": {**_calib_files(), **tok},
        "tokens": {**_tokens(), **tok},
        "hotness": {"calib/hotness.json": _hotness(), "config.json": cfg},
        # a shard outside the output directory too: a journal naming "../model-1-of-2.safetensors" must not reach it
        "journal": {"out/.k2quant-convert.journal.json": json.dumps(journal).encode(),
                    "out/model-1-of-2.safetensors": fp8["model-1-of-2.safetensors"],
                    "out/model-2-of-2.safetensors.tmp": b"x",
                    "model-1-of-2.safetensors": fp8["model-1-of-2.safetensors"]},
        "calibrate-state": _calibrate_state(),
        "diff-state": _diff_state(),
        "gptq-spool": _gptq_spool(),
        "hessians": {**fp8, **_hessians()},
    }  # fmt: skip


# ============================================================================ the readers (run in the worker)
class _StubWriter:
    """Takes every add_* call of a GGUFWriter (formats/gguf.add_tokenizer writes into one)."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def _read_checkpoint(d: Path) -> str:
    from k2quant import open_checkpoint

    ck = open_checkpoint(d)
    n = 0
    for group in ck.groups("expert"):
        for name in group.names:
            st_ = ck.stored(name)
            w = st_.dequantize()
            n += w.numel()
            _ = ck.info(name).storage
    return f"{len(ck.names())} tensors, {n} values"


def read_safetensors(d: Path) -> str:
    from k2quant.formats.safetensors_file import SafetensorsFile, read_bytes

    f = SafetensorsFile(d / "file.safetensors")
    total = 0
    for name in f.keys():
        t = f.load(name)
        total += int(t.view(-1).to("cpu").numel())
        if t.numel():
            _ = t.float().sum() if t.dtype.is_floating_point else t.sum()
        assert len(read_bytes(f.tensors[name])) == f.tensors[name].nbytes
    return f"{len(f.keys())} tensors, {total} values, metadata {sorted(f.metadata)}"


def read_config(d: Path) -> str:
    from k2quant.config import K2Config

    cfg = K2Config.from_file(d / "config.json")
    _ = cfg.to_dict(), cfg.softmax_scale, cfg.rope.cos_sin_scale
    return _read_checkpoint(d)


def read_generation_config(d: Path) -> str:
    from k2quant.runner.runner import default_temperature

    t = default_temperature(d)
    assert isinstance(t, float) and math.isfinite(t) and t >= 0, t
    return f"temperature {t}"


def read_gguf(d: Path) -> str:
    from k2quant.formats.gguf import open_gguf

    first = next(p for p in sorted(d.glob("*.gguf")) if "-of-" not in p.name or "-00001-of-" in p.name)
    ck = open_gguf(first)
    n = 0
    for name in ck.names():
        n += ck.tensor(name).numel()
        _ = ck.stored(name).format
    return f"{len(ck.names())} tensors, {n} values"


def read_imatrix(d: Path) -> str:
    from k2quant.formats.imatrix import importance, read_imatrix, read_imatrix_gguf

    p = d / "imatrix.gguf"
    sums, counts = read_imatrix(p)
    imp = importance(sums, counts)
    names = {"blk.0.attn_q_a.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight", "output.weight",
             "blk.0.ffn_down.weight", "blk.1.attn_kv_b.weight"}  # fmt: skip
    raw = read_imatrix_gguf(p, names)
    return f"{len(imp)} modules, {len(raw)} tensors"


def _tokenize(d: Path) -> str:
    from k2quant.formats.gguf import add_tokenizer
    from k2quant.formats.tokenizer import load_tokenizer

    tok = load_tokenizer(d)
    ids = tok.encode("Hello, world! 你好 123 <|im_end|>", allow_special=True)
    text = tok.decode(ids)
    _ = [tok.token_bytes(i) for i in ids[:8]], tok.bos_id, tok.eos_id, tok.im_end_id
    add_tokenizer(_StubWriter(), d, TINY["vocab_size"])
    return f"{tok.vocab_size} tokens, {len(ids)} ids, {len(text)} chars"


def read_tokenizer(d: Path) -> str:
    from k2quant.formats.chat import ChatTemplate
    from k2quant.formats.tokenizer import load_tokenizer

    out = _tokenize(d)
    prompt = ChatTemplate.load(d).render(MESSAGES, TOOLS)
    ids = load_tokenizer(d).encode(prompt, allow_special=True)
    return f"{out}; prompt of {len(ids)} ids"


def read_recipe(d: Path) -> str:
    from k2quant.config import K2Config
    from k2quant.formats.gguf import tensor_map
    from k2quant.names import expected_shapes
    from k2quant.recipe import build_recipe

    cfg = K2Config.from_dict(_tiny_config())
    r = build_recipe(None, d / "recipe.toml")
    names = [r.scheme_for(n).name for n in expected_shapes(cfg)]
    g = build_recipe(None, d / "recipe-gguf.toml", target="gguf")
    types = [g.gguf_type(t.name, t.modules, t.layer, cfg.num_hidden_layers) for t in tensor_map(cfg)]
    return f"{len(set(names))} schemes, {len(set(types))} GGML types; {r.describe()} {g.describe()}"


def read_calib(d: Path) -> str:
    from k2quant.calibrate import calibration_sequences

    seqs, n = calibration_sequences(d, [d / "data.txt", d / "data.jsonl"], 64, 16)
    return f"{tuple(seqs.shape)} windows of {n} tokens"


def read_tokens(d: Path) -> str:
    from k2quant.report.diff import load_tokens

    t = load_tokens([d / "tokens.npy", d / "tokens.json"], d)
    return f"{t.numel()} ids"


def read_hotness(d: Path) -> str:
    from k2quant.config import K2Config
    from k2quant.plan import read_calib
    from k2quant.runner.placement import load_hotness

    hot = load_hotness(d / "calib" / "hotness.json")
    _, hot2, notes = read_calib(d / "calib", K2Config.from_file(d / "config.json"))
    return f"{len(hot)} layers; {len(notes)} notes"


def read_journal(d: Path) -> str:
    from k2quant.pipeline import ConvertError, prepare_out

    with contextlib.suppress(ConvertError):  # without --resume: refused whatever the journal holds
        prepare_out(d / "out", FINGERPRINT, False)
        raise AssertionError("a directory with a journal taken for a fresh conversion")
    done = prepare_out(d / "out", FINGERPRINT, True)
    outside = [f for f in done if Path(f).name != f or f in (".", "..")]
    assert not outside, f"shards outside the output directory taken as done: {outside}"
    return f"{len(done)} shards done"


def read_calibrate_state(d: Path) -> str:
    from k2quant.calib.resume import CalibrationState, CalibrationStateError

    state = CalibrationState(d / "out", CALIB_KEY, TINY["num_hidden_layers"], TINY["n_routed_experts"], CALIB_HIDDEN,
                             {1})  # fmt: skip
    with contextlib.suppress(CalibrationStateError):  # without --resume: refused whatever the state holds
        state.open(resume=False)
        raise AssertionError("a directory with a calibration state taken for a fresh calibration")
    got = state.open(resume=True)
    if got is None:
        return "nothing to resume"
    return f"{got.layers_done} layers, {len(got.stats.in_sum2)} sums, {len(got.stats.hessians or {})} Hessians"


def read_diff_state(d: Path) -> str:
    from k2quant.report.diff_state import DiffState, DiffStateError

    state = DiffState(d / "out", DIFF_KEY, TINY["num_hidden_layers"], TINY["n_routed_experts"], DIFF_BATCHES)
    with contextlib.suppress(DiffStateError):  # without --resume: refused whatever the state holds
        state.open(resume=False)
        raise AssertionError("a directory with a diff state taken for a fresh diff")
    got = state.open(resume=True)
    return f"{got.batches} batches, {got.per_token['kld'].numel()} tokens, n_vec {got.n_vec}"


def read_gptq_spool(d: Path) -> str:
    from k2quant.gptq_stream import SpoolReader, _complete, spool_file, spooled_fallbacks

    spool = d / "out" / ".gptq-spool"
    if not _complete(spool_file(spool, 1), FINGERPRINT):
        return "layer 1 not finished: done again"
    reader = SpoolReader(spool)
    parts = [reader.parts(m) for m in SPOOL_MODULES]
    for p in parts:
        for t in (p or {}).values():
            t.to(float).sum()  # every byte read
    return f"{sum(p is not None for p in parts)} modules spooled, {len(spooled_fallbacks(spool))} fallbacks"


def read_hessians(d: Path) -> str:
    from k2quant import open_checkpoint
    from k2quant.convert import _HessianGPTQ, _int4, _plan_gptq, _produce, plan_conversion
    from k2quant.recipe import build_recipe

    ck = open_checkpoint(d)
    plan = plan_conversion(ck, build_recipe("k2-int4"), "gptq")
    _plan_gptq(plan, d / "calib" / "hessians.safetensors")
    gptq = _HessianGPTQ(plan.hessians, set(plan.gptq_fallbacks), False)
    parts = sum(1 for t in _int4(plan.tensors) for _ in _produce(ck, t, "gptq", None, gptq))
    return f"{parts} parts, {len(plan.gptq_fallbacks)} modules without a Hessian"


@dataclass(frozen=True)
class Reader:
    name: str
    base: str  # key of make_bases()
    targets: dict[str, str]  # file that may be mutated -> its kind (how it is mutated)
    run: Callable[[Path], str]
    what: str
    root: str = ""  # the model's directory in the case's: files outside it may not be opened


READERS = {r.name: r for r in [
    Reader("safetensors", "safetensors", {"file.safetensors": "safetensors"}, read_safetensors,
           "SafetensorsFile: header length, JSON, dtypes, shapes, offsets; every tensor mapped"),
    Reader("checkpoint-shard", "fp8",
           {"model-1-of-2.safetensors": "safetensors", "model-2-of-2.safetensors": "safetensors"},
           _read_checkpoint, "open_checkpoint on an FP8-block checkpoint, a shard mutated; every tensor dequantized"),
    Reader("checkpoint-int4", "int4", {"model.safetensors": "safetensors", "config.json": "json"}, _read_checkpoint,
           "open_checkpoint on a compressed-tensors INT4 checkpoint (single file); every tensor dequantized"),
    Reader("index", "fp8", {"model.safetensors.index.json": "json"}, _read_checkpoint,
           "model.safetensors.index.json through open_checkpoint"),
    Reader("config", "fp8", {"config.json": "json"}, read_config,
           "config.json: K2Config.from_file, then open_checkpoint with it"),
    Reader("generation_config", "gen", {"generation_config.json": "json"}, read_generation_config,
           "generation_config.json: runner.default_temperature"),
    Reader("gguf", "gguf", {"model.gguf": "gguf"}, read_gguf,
           "open_gguf: magic, version, counts, KVs, tensor infos, alignment, data; every tensor dequantized"),
    Reader("gguf-split", "gguf-split", {"model-00001-of-00002.gguf": "gguf", "model-00002-of-00002.gguf": "gguf"},
           read_gguf, "open_gguf on a gguf-split set of two files (split keys, tensors across files)"),
    Reader("imatrix", "imatrix", {"imatrix.gguf": "gguf"}, read_imatrix,
           "formats/imatrix: read_imatrix, read_imatrix_gguf, importance"),
    Reader("tiktoken", "tokenizer", {"tiktoken.model": "tiktoken"}, _tokenize,
           "tiktoken.model: load_tokenizer, encode / decode, add_tokenizer (GGUF vocabulary)"),
    Reader("tokenizer_config", "tokenizer", {"tokenizer_config.json": "json"}, read_tokenizer,
           "tokenizer_config.json: special tokens, chat template loaded and rendered, add_tokenizer"),
    Reader("chat_template.jinja", "jinja", {"chat_template.jinja": "text"}, read_tokenizer,
           "chat_template.jinja: ChatTemplate.load and render"),
    Reader("recipe", "recipe", {"recipe.toml": "toml", "recipe-gguf.toml": "toml"}, read_recipe,
           "recipe TOML: build_recipe for both targets, applied to every tensor"),
    Reader("calib-text", "calib", {"data.txt": "text", "data.jsonl": "jsonl"}, read_calib,
           "calibration .txt / .jsonl: calibrate.calibration_sequences"),
    Reader("token-ids", "tokens", {"tokens.npy": "npy", "tokens.json": "json"}, read_tokens,
           "pre-tokenized .npy / .json: report.diff.load_tokens"),
    Reader("hotness", "hotness", {"calib/hotness.json": "json"}, read_hotness,
           "hotness.json: runner.placement.load_hotness, plan.read_calib"),
    Reader("journal", "journal", {"out/.k2quant-convert.journal.json": "json"}, read_journal,
           "the convert journal: pipeline.prepare_out with and without --resume", "out"),
    Reader("calibrate-state", "calibrate-state",
           {"out/.k2quant-calibrate/state.json": "json", "out/.k2quant-calibrate/layer-000.safetensors": "safetensors",
            "out/.k2quant-calibrate/layer-001.safetensors": "safetensors",
            "out/.k2quant-calibrate/hidden-001.safetensors": "safetensors"}, read_calibrate_state,
           "an interrupted calibration's state: calib/resume.py CalibrationState.open with and without --resume",
           "out"),
    Reader("diff-state", "diff-state",
           {"out/.k2quant-diff/state.json": "json", "out/.k2quant-diff/progress-000002.safetensors": "safetensors"},
           read_diff_state, "an interrupted diff's state: report/diff_state.py DiffState.open with and without "
           "--resume", "out"),
    Reader("gptq-spool", "gptq-spool",
           {"out/.gptq-spool/layer-001.safetensors": "safetensors", "out/.gptq-spool/layer-001.fallbacks.json": "json"},
           read_gptq_spool, "the layer-streamed GPTQ's spool: gptq_stream._complete, SpoolReader, spooled_fallbacks",
           "out"),
    Reader("hessians", "hessians", {"calib/hessians.safetensors": "safetensors"}, read_hessians,
           "calibrate --hessian's hessians.safetensors: convert --method gptq's plan and GPTQ of every INT4 module"),
]}  # fmt: skip


# ============================================================================ mutations
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip
NASTY_BYTES = [b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"{", b"[" * 64, b'"', b"\\", b"\n",
               b"\r\n", b" ", b"\x93NUMPY", b"GGUF", b"=", b"[[", b"{{ 7 * 7 }}", b"{% for x in y %}"]  # fmt: skip
# JSON written as text, for what json.dumps cannot write: an int past Python's 4300-digit limit, nesting past the
# recursion limit, a lone surrogate, non-finite numbers, an overlong float (drawn by name: failing cases print short)
RAW_JSON = {"digits5000": "1" * 5000, "nested100000": "[" * 100000 + "]" * 100000, "surrogate": '"\\ud800"',
            "NaN": "NaN", "-Infinity": "-Infinity", "1e999": "1e999", "-0": "-0", "digits400": "1" * 400,
            "string5000": '"' + "x" * 5000 + '"', "{}": "{}", "[]": "[]", '""': '""', "null": "null",
            "[[[[]]]]": "[[[[]]]]", '{"": {"": {}}}': '{"": {"": {}}}'}  # fmt: skip
TOML_VALUES = ["inf", "-inf", "nan", "-1", "0", "99999999999999999999999", '"x"', "''", '[1, "a"]', "{a = 1}",
               "[[[]]]", "1979-05-27", "true", "[]", "3.5", "'''\nmulti\n'''", '"\\u0000"', "[-1, 2]", '"."',
               '"(("', '"[z-a]"', '"int5-g7"', '"q99_k"', '"fp8-block"', '"keep"', '"(?<!x)y"']  # fmt: skip
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16",
               "U32", "U64", "F8_E8M0", "F4", "C64", "", "f32"]  # fmt: skip
NPY_DESCR = ["<i4", "<i8", "<u8", "|u1", "<f4", "<f8", "|b1", "|O", "<U8", "|S4", "<c16", ">i4", "|V4", "<M8[s]",
             [("a", "<i4")], "<i2", "xyz", "", 5, None]  # fmt: skip

positions = st.integers(0, 2**31)
interesting = st.sampled_from(INTERESTING)
json_scalars = st.one_of(st.none(), st.booleans(), interesting, st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))  # fmt: skip
# values at the edges of every JSON type, drawn as often as random ones: a count that lies, a path that leaves
EXTREME = [0, -1, 1, 2, 2**31, 2**32 + 2, 2**62, 2**63, 2**64, -(2**63), 10**30, 1e308, -1e308, 0.5, -0.0,
           float("nan"), float("inf"), float("-inf"), True, False, None, "", "../x", "/etc/passwd", "x" * 300, "\x00",
           [], [0], [2**62], [-1, -1], [0, 2**63], {}, {"": None}, [[]], [{}], "model.safetensors", "a"]  # fmt: skip
json_values = st.one_of(
    st.sampled_from(EXTREME),
    st.recursive(
        json_scalars,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
        max_leaves=6,
    ),
)


def weighted(*pairs):
    """One of the strategies, drawn in proportion to its weight (hypothesis' own one_of and sampled_from
    favour their first alternatives and flatten nested one_of, so repeating one would not weight it)."""
    bounds = list(itertools.accumulate(w for w, _ in pairs))
    return st.integers(0, bounds[-1] - 1).flatmap(lambda i: pairs[bisect.bisect_right(bounds, i)][1])


def choice(**weights: int):
    return weighted(*((w, st.just(k)) for k, w in weights.items()))


byte_ops = weighted(
    (1, st.tuples(st.just("flip"), positions, st.integers(1, 255))),
    (1, st.tuples(st.just("cut"), positions)),
    (
        1,
        st.tuples(
            st.just("insert"), positions, st.one_of(st.binary(min_size=1, max_size=32), st.sampled_from(NASTY_BYTES))
        ),
    ),
    (1, st.tuples(st.just("delete"), positions, st.integers(1, 64))),
    (1, st.tuples(st.just("dup"), positions, st.integers(1, 64), positions)),
)
json_ops = st.tuples(st.just("json"), st.lists(st.integers(0, 2**16), max_size=6),
                     choice(replace=2, same=4, delete=1, add=1, raw=2, perturb=1, rename=1), json_values,
                     st.integers(0, 2**16), st.sampled_from(sorted(RAW_JSON)))  # fmt: skip
line_ops = st.tuples(st.just("line"), positions, choice(delete=1, dup=1, swap=1, replace=1, insert=1, edit=2),
                     st.one_of(st.text(max_size=24), st.sampled_from([str(v) for v in INTERESTING] + ["-1", "x", "="])),
                     positions)  # fmt: skip
ints_like = weighted((2, interesting), (1, st.integers(-(2**64), 2**65)),
                     (1, st.tuples(st.just("delta"), st.integers(-300, 300))))  # fmt: skip
st_entry_ops = st.tuples(
    st.just("st-entry"),
    positions,
    choice(dtype=1, shape=1, data_offsets=1),
    weighted((1, st.sampled_from(DTYPE_NAMES)), (2, st.lists(ints_like, max_size=4)), (1, json_values)),
)
st_len_ops = st.tuples(st.just("st-len"), ints_like)
st_header_ops = st.tuples(st.just("st-header"), json_ops, st.booleans())  # booleans: keep the old length (a lie)
gguf_ops = st.tuples(st.just("gguf"), positions, positions, ints_like)
# a KV rewritten whole: its value, its type (and value), added, deleted or repeated; arrays with a lying length
GGUF_KEYS = ["general.alignment", "split.no", "split.count", "split.tensors.count", "general.type",
             "general.architecture", "deepseek2.block_count", "deepseek2.expert_count", "deepseek2.embedding_length",
             "deepseek2.vocab_size", "deepseek2.rope.dimension_count", "deepseek2.attention.key_length_mla",
             "deepseek2.expert_gating_func", "deepseek2.leading_dense_block_count",
             "deepseek2.rope.scaling.yarn_log_multiplier", "tokenizer.ggml.tokens", "imatrix.chunk_count",
             "imatrix.datasets"]  # fmt: skip
gguf_kv_ops = st.tuples(
    st.just("gguf-kv"), positions, choice(value=3, retype=3, add=1, delete=1, dup=1),
    st.sampled_from([*range(13), 13, 2**32 - 1]), st.sampled_from([0, 1, 4, 5, 6, 8, 10, 12, 7, 9]),
    weighted((1, st.sampled_from(EXTREME[:17])), (2, ints_like)), st.text(max_size=16), st.integers(0, 6),
    weighted((1, st.none()), (2, interesting)), st.sampled_from(GGUF_KEYS),
)  # fmt: skip
npy_ops = weighted(
    (3, st.tuples(st.just("npy"), choice(descr=1, shape=2, fortran_order=1),
                  weighted((1, st.sampled_from(NPY_DESCR)), (2, st.lists(ints_like, max_size=3).map(tuple)),
                           (1, json_scalars)), st.booleans())),
    (1, st.tuples(st.just("npy-len"), ints_like)),
)  # fmt: skip
jsonl_ops = st.tuples(st.just("jsonl"), positions, json_ops)
toml_ops = st.tuples(st.just("toml"), positions, st.one_of(st.sampled_from(TOML_VALUES), interesting.map(str)))

OPS = {  # per kind of file: (weight, ops)
    "safetensors": weighted((3, st_entry_ops), (2, st_header_ops), (1, st_len_ops), (2, byte_ops)),
    "json": weighted((3, json_ops), (1, byte_ops)),
    "gguf": weighted((2, gguf_ops), (2, gguf_kv_ops), (1, byte_ops)),
    "npy": weighted((2, npy_ops), (1, byte_ops)),
    "tiktoken": weighted((2, line_ops), (1, byte_ops)),
    "jsonl": weighted((2, jsonl_ops), (1, line_ops), (1, byte_ops)),
    "toml": weighted((2, toml_ops), (1, line_ops), (1, byte_ops)),
    "text": weighted((1, byte_ops), (1, line_ops)),
}


def case_strategy(reader: Reader):
    """A case for `reader`: [(target file, [ops])], one or two files."""
    targets = sorted(reader.targets)
    one = st.sampled_from(targets).flatmap(
        lambda t: st.tuples(st.just(t), st.lists(OPS[reader.targets[t]], min_size=1, max_size=3))
    )
    return st.lists(one, min_size=1, max_size=2)


def mutate(reader: Reader, base: dict[str, bytes], case) -> dict[str, bytes]:
    """The files `case` changes, mutated from `base`."""
    out: dict[str, bytes] = {}
    for target, ops in case:
        data = out.get(target, base[target])
        for op in ops:
            data = apply_op(op, data)
        out[target] = data
    return out


def apply_op(op: tuple, data: bytes) -> bytes:
    kind = op[0]
    n = len(data)
    if kind == "flip":
        if not n:
            return data
        i = op[1] % n
        return data[:i] + bytes([data[i] ^ op[2]]) + data[i + 1 :]
    if kind == "cut":
        return data[: op[1] % (n + 1)]
    if kind == "insert":
        i = op[1] % (n + 1)
        return data[:i] + op[2] + data[i:]
    if kind == "delete":
        i = op[1] % (n + 1)
        return data[:i] + data[i + op[2] :]
    if kind == "dup":
        i = op[1] % (n + 1)
        j = op[3] % (n + 1)
        return data[:j] + data[i : i + op[2]] + data[j:]
    if kind == "json":
        return _json_op(op, data)
    if kind == "line":
        return _line_op(op, data)
    if kind == "st-entry":
        return _st_entry(op, data)
    if kind == "st-len":
        if n < 8:
            return data
        return struct.pack("<Q", _int_value(op[1], struct.unpack("<Q", data[:8])[0], 64)) + data[8:]
    if kind == "st-header":
        if n < 8:
            return data
        (hn,) = struct.unpack("<Q", data[:8])
        new = _json_op(op[1], data[8 : 8 + hn])
        return struct.pack("<Q", hn if op[2] else len(new)) + new + data[8 + hn :]
    if kind == "gguf":
        return _gguf_op(op, data)
    if kind == "gguf-kv":
        return _gguf_kv_op(op, data)
    if kind in ("npy", "npy-len"):
        return _npy_op(op, data)
    if kind == "jsonl":
        lines = data.split(b"\n")
        i = op[1] % len(lines)
        lines[i] = _json_op(op[2], lines[i]).replace(b"\n", b" ")
        return b"\n".join(lines)
    if kind == "toml":
        lines = data.split(b"\n")
        assigns = [i for i, line in enumerate(lines) if b"=" in line]
        if not assigns:
            return data
        i = assigns[op[1] % len(assigns)]
        lines[i] = lines[i].split(b"=", 1)[0] + b"= " + op[2].encode()
        return b"\n".join(lines)
    raise ValueError(f"unknown op {kind}")


def _int_value(spec, old: int, bits: int) -> int:
    """An int op's value: a given one, or ('delta', d) from the old one; wrapped to an unsigned `bits` field."""
    v = old + spec[1] if isinstance(spec, tuple) else spec
    return v % (1 << bits) if bits else v


_PLACEHOLDER = "\x00k2quant-fuzz-raw\x00"


def _json_op(op: tuple, data: bytes) -> bytes:
    _, path, action, value, key_pick, raw = op
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return data
    keys = sorted(_all_keys(doc))
    node, trail = doc, []
    for i in path:
        if isinstance(node, dict) and node:
            k = list(node)[i % len(node)]
        elif isinstance(node, list) and node:
            k = i % len(node)
        else:
            break
        trail.append((node, k))
        node = node[k]
    if action == "raw":
        value = _PLACEHOLDER
    if action in ("replace", "raw"):
        if trail:
            trail[-1][0][trail[-1][1]] = value
        else:
            doc = value
    elif action == "delete" and trail:
        del trail[-1][0][trail[-1][1]]
    elif action == "add":
        dicts = [c for c, _ in trail if isinstance(c, dict)] or ([doc] if isinstance(doc, dict) else [])
        if dicts:
            k = keys[key_pick % len(keys)] if keys and key_pick % 3 else str(value)[:8]
            dicts[-1][k] = value
    elif action == "perturb" and trail:
        c, k = trail[-1]
        c[k] = _perturb(c[k], key_pick)
    elif action == "same":
        if trail:
            c, k = trail[-1]
            c[k] = _extreme(c[k], key_pick)
        else:
            doc = _extreme(doc, key_pick)
    elif action == "rename" and trail and isinstance(trail[-1][0], dict):
        c, k = trail[-1]
        c[_perturb(k, key_pick)] = c.pop(k)
    text = json.dumps(doc, ensure_ascii=False, allow_nan=True)
    return text.replace(json.dumps(_PLACEHOLDER), RAW_JSON[raw]).encode("utf-8", "surrogatepass")


def _all_keys(doc) -> set[str]:
    out: set[str] = set()
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            out.update(x)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return out


def _extreme(v, pick: int):
    """A value of the same JSON type as `v` at the edge of what a reader may expect (a count that lies, a
    path that leaves the directory, an empty or mistyped container)."""
    if isinstance(v, bool):
        return [None, 0, "true", not v][pick % 4]
    if isinstance(v, int):
        return [0, -1, 2**31, 2**32 + v, 2**62, 2**63, 2**64 + v, -(2**63), 10**30, v * 10**6, 1 - v][pick % 11]
    if isinstance(v, float):
        return [math.nan, math.inf, -math.inf, 0.0, -v, 1e308, 5e-324, v * 1e300][pick % 8]
    if isinstance(v, str):
        return ["", "../" + v, "/etc/passwd", (v * 200)[: 2 << 20], v + "\x00", v[: len(v) // 2], "\ud7ff" + v, "."][
            pick % 8
        ]
    if isinstance(v, list):
        return [[], v + v, [v], [2**62] * max(1, len(v)), [-1] * max(1, len(v)), [str(x) for x in v], v[1:]][pick % 7]
    if isinstance(v, dict):
        return [{}, [v], None, {k: None for k in v}, {k: [] for k in v}][pick % 5]
    return [0, "", [], {}][pick % 4]


def _perturb(v, pick: int):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return [v + 1, v - 1, -v, v * 1000, v + 2**32, 0][pick % 6]
    if isinstance(v, float):
        return [-v, v * 1e300, float("nan"), 0.0, v + 1][pick % 5]
    if isinstance(v, str):
        return [v[:-1], v + v, v.upper(), "../" + v, "/" + v, v + "\x00"][pick % 6]
    if isinstance(v, list):
        return [v[:-1], v + v[:1], v[::-1], [v]][pick % 4]
    if isinstance(v, dict):
        return [dict(list(v.items())[:-1]), {k: v[k] for k in sorted(v, reverse=True)}, [v]][pick % 3]
    return v


def _line_op(op: tuple, data: bytes) -> bytes:
    _, i, action, text, j = op
    lines = data.split(b"\n")
    i, j = i % len(lines), j % len(lines)
    t = text.encode("utf-8", "surrogatepass")
    if action == "delete":
        del lines[i]
    elif action == "dup":
        lines.insert(i, lines[i])
    elif action == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif action == "replace":
        lines[i] = t
    elif action == "insert":
        lines.insert(i, t)
    else:  # edit: one whitespace-separated field of the line
        fields = lines[i].split(b" ")
        fields[j % len(fields)] = t if j % 2 else base64.b64encode(t)
        lines[i] = b" ".join(fields)
    return b"\n".join(lines)


def _st_entry(op: tuple, data: bytes) -> bytes:
    _, pick, key, value = op
    if len(data) < 8:
        return data
    (hn,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + hn])
    except (ValueError, RecursionError):
        return data
    names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    if not names or not isinstance(header[names[pick % len(names)]], dict):
        return data
    entry = header[names[pick % len(names)]]
    old = entry.get(key)
    if isinstance(value, list) and isinstance(old, list):  # ints for a shape or the offsets, deltas from the old ones
        value = [_int_value(v, old[k % len(old)] if old and isinstance(old[k % len(old)], int) else 0, 0)
                 for k, v in enumerate(value)]  # fmt: skip
    entry[key] = value
    raw = json.dumps(header, allow_nan=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + hn :]


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_FIELD_CACHE: dict[bytes, list[tuple[str, int, str]]] = {}


def gguf_fields(data: bytes) -> list[tuple[str, int, str]]:
    """(role, offset, struct format) of every count, length, type, dimension, offset and scalar value of a
    valid GGUF header (the test's own walk, independent of k2quant's)."""
    key = hashlib.sha1(data).digest()
    if key in _FIELD_CACHE:
        return _FIELD_CACHE[key]
    out = [("version", 4, "<I"), ("tensor_count", 8, "<Q"), ("kv_count", 16, "<Q")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(role: str) -> None:
        nonlocal pos
        out.append((role, pos, "<Q"))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        string("key_length")
        out.append(("value_type", pos, "<I"))
        t = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if t in _GGUF_SCALAR:
            out.append(("scalar_value", pos, _GGUF_SCALAR[t]))
            pos += struct.calcsize(_GGUF_SCALAR[t])
        elif t == 8:
            string("string_length")
        else:
            out.append(("array_type", pos, "<I"))
            it, n = struct.unpack_from("<IQ", data, pos)
            out.append(("array_length", pos + 4, "<Q"))
            pos += 12
            if it != 8:
                pos += n * struct.calcsize(_GGUF_SCALAR[it])
                continue
            for k in range(n):  # each string takes 8 bytes at least: bounded by the file
                if k < 4:
                    string("array_string_length")
                else:
                    pos += 8 + struct.unpack_from("<Q", data, pos)[0]
    for _ in range(n_tensors):
        string("tensor_name_length")
        out.append(("n_dims", pos, "<I"))
        nd = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if pos + 8 * nd > len(data):
            raise struct.error("dimensions past the end")
        for _ in range(nd):
            out.append(("dim", pos, "<Q"))
            pos += 8
        out.append(("tensor_type", pos, "<I"))
        out.append(("tensor_offset", pos + 4, "<Q"))
        pos += 12
    if len(_FIELD_CACHE) > 64:
        _FIELD_CACHE.clear()
    _FIELD_CACHE[key] = out
    return out


def _gguf_split(data: bytes) -> tuple[list[bytes], bytes, bytes]:
    """A valid GGUF's KVs (each whole: key, type, value), its tensor infos and its data (from the aligned start)."""
    fields = gguf_fields(data)
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    starts = [o for r, o, _ in fields if r == "key_length"] + [None]
    ti = [o for r, o, _ in fields if r == "tensor_name_length"]
    end_kv = ti[0] if ti else _header_end(data, fields)
    kvs = [data[starts[i] : starts[i + 1] if i + 1 < n_kv else end_kv] for i in range(n_kv)]
    end = _header_end(data, fields)
    align = 32
    for kv in kvs:
        if kv[8 : 8 + struct.unpack_from("<Q", kv)[0]] == b"general.alignment" and len(kv) >= 8 + 17 + 4:
            align = struct.unpack_from("<I", kv, len(kv) - 4)[0] or 32
    return kvs, data[end_kv:end], data[end + (-end % align) :]


def _header_end(data: bytes, fields) -> int:
    role, off, fmt = fields[-1]
    return off + struct.calcsize(fmt) if role == "tensor_offset" else len(data)


def _gguf_value(vtype: int, num, text: str, n_items: int, item_type: int, length) -> bytes:
    """The bytes of a GGUF value of `vtype` from a drawn number / text (arrays: n_items of item_type, with
    `length` written in place of the real count when given)."""
    if vtype in _GGUF_SCALAR:
        fmt = _GGUF_SCALAR[vtype]
        if fmt in ("<f", "<d"):
            v = float(num) if not isinstance(num, tuple) else float(num[1])
            try:
                return struct.pack(fmt, v)
            except OverflowError:
                return struct.pack(fmt, math.copysign(math.inf, v))
        v = int(num) if isinstance(num, int | bool) else (num[1] if isinstance(num, tuple) else 3)
        return struct.pack(fmt.upper().replace("?", "B"), v % (1 << (8 * struct.calcsize(fmt))))
    if vtype == 8:
        raw = text.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(raw)) + raw
    if vtype == 9:
        it = item_type
        items = b"".join(_gguf_value(it, num, text, 1, 0, None) for _ in range(n_items)) if it != 9 else b""
        return struct.pack("<IQ", it, n_items if length is None else length) + items
    return struct.pack("<Q", 0)  # an unknown type: whatever bytes follow


def _gguf_kv_op(op: tuple, data: bytes) -> bytes:
    _, pick, action, vtype, item_type, num, text, n_items, length, key = op
    try:
        kvs, infos, rest = _gguf_split(data)
    except (struct.error, KeyError, IndexError, OverflowError, MemoryError):
        return data
    keys = [kv[8 : 8 + struct.unpack_from("<Q", kv)[0]] for kv in kvs]
    named = [i for i, k in enumerate(keys) if k.decode("utf-8", "replace") in GGUF_KEYS]
    i = (named[pick // 2 % len(named)] if named and pick % 2 else pick % len(kvs)) if kvs else None
    kb = key.encode()
    if action == "add" or i is None:
        kvs.append(struct.pack("<Q", len(kb)) + kb + struct.pack("<I", vtype) + _gguf_value(vtype, num, text, n_items,
                                                                                        item_type, length))  # fmt: skip
    elif action == "delete":
        del kvs[i]
    elif action == "dup":
        kvs.insert(i, kvs[i])
    else:
        head = kvs[i][: 8 + len(keys[i])]
        old_type = struct.unpack_from("<I", kvs[i], len(head))[0]
        t = old_type if action == "value" else vtype
        if action == "value" and t == 9 and len(kvs[i]) >= len(head) + 16:
            item_type = struct.unpack_from("<I", kvs[i], len(head) + 4)[0]
        kvs[i] = head + struct.pack("<I", t) + _gguf_value(t, num, text, n_items, item_type, length)
    header = data[:16] + struct.pack("<Q", len(kvs)) + b"".join(kvs) + infos
    return header + b"\0" * (-len(header) % 32) + rest


def _gguf_op(op: tuple, data: bytes) -> bytes:
    _, role_pick, pick, value = op
    try:
        fields = gguf_fields(data)
    except (struct.error, KeyError, OverflowError, MemoryError):  # an earlier op broke the header walk
        return data
    roles = sorted({r for r, _, _ in fields})
    role = roles[role_pick % len(roles)]
    mine = [(o, f) for r, o, f in fields if r == role]
    off, fmt = mine[pick % len(mine)]
    if off + struct.calcsize(fmt) > len(data):
        return data
    old = struct.unpack_from(fmt, data, off)[0]
    if fmt in ("<f", "<d"):
        v = old + value[1] if isinstance(value, tuple) else float(value)
        try:
            packed = struct.pack(fmt, v)
        except OverflowError:
            packed = struct.pack(fmt, math.copysign(math.inf, v))
    elif fmt == "<?":
        packed = bytes([_int_value(value, int(old), 8)])
    else:  # signed fields written as the unsigned bits of the wrapped value
        packed = struct.pack(fmt.upper(), _int_value(value, int(old), struct.calcsize(fmt) * 8))
    return data[:off] + packed + data[off + len(packed) :]


def _npy_op(op: tuple, data: bytes) -> bytes:
    if len(data) < 10 or data[:6] != b"\x93NUMPY" or data[6] != 1:
        return data
    (hlen,) = struct.unpack_from("<H", data, 8)
    if op[0] == "npy-len":
        return data[:8] + struct.pack("<H", _int_value(op[1], hlen, 16)) + data[10:]
    _, key, value, keep_len = op
    try:
        header = ast.literal_eval(data[10 : 10 + hlen].decode("latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return data
    if not isinstance(header, dict):
        return data
    if isinstance(value, tuple):
        value = tuple(_int_value(v, 0, 0) for v in value)
    header[key] = value
    text = repr(header).encode("latin1", "replace")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return data[:8] + struct.pack("<H", hlen if keep_len else len(text) % 65536) + text + data[10 + hlen :]


# ============================================================================ the worker
@dataclass
class Outcome:
    status: str  # "opened" | "refused" | "failed"
    detail: str
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("opened", "refused")


_ACTIVE: list[str] = []  # the case directory while a reader runs (empty between cases)
_VIOLATIONS: list[str] = []
_ALLOWED: list[str] = []


def _allowed_roots() -> list[str]:
    """Where a reader may open files besides its case: Python's library and the installed packages
    (lazy imports, jinja2's and numpy's own data), and k2quant's package directories (its imports)."""
    import sysconfig

    import k2quant
    import k2quant.calib
    import k2quant.formats

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values()}
    roots |= {os.path.dirname(m.__file__) for m in (k2quant, k2quant.formats, k2quant.calib)}
    return sorted(os.path.abspath(r) + os.sep for r in roots if r)


def _audit(event: str, args: tuple) -> None:
    if not _ACTIVE or event not in ("open", "os.listdir", "os.scandir"):
        return
    path = args[0] if args else None
    if isinstance(path, int) or path is None and event == "open":  # an fd: opened by an earlier, checked call
        return
    try:
        p = os.path.abspath(os.fsdecode(path if path is not None else "."))
    except (TypeError, ValueError):
        return
    if p == _ACTIVE[0] or p.startswith(_ACTIVE[0] + os.sep) or any(p.startswith(r) for r in _ALLOWED):
        return
    if len(_VIOLATIONS) < 20:
        _VIOLATIONS.append(f"{event} {p}")


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _run_case(reader: Reader, base: dict[str, bytes], files: dict[str, bytes]) -> Outcome:
    from k2quant.errors import K2QuantError

    d = Path(tempfile.mkdtemp(prefix="k2q-fuzz-"))
    try:
        for rel, data in {**base, **files}.items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        _VIOLATIONS.clear()
        t0 = time.perf_counter()
        _ACTIVE.append(str(d / reader.root) if reader.root else str(d))
        try:
            out = Outcome("opened", reader.run(d))
        except K2QuantError as e:
            msg = str(e)
            named = str(d) in msg
            out = Outcome("refused" if named else "failed", msg if named else f"K2QuantError naming no file: {msg}")
        except BaseException as e:  # every other exception is the failure this looks for
            if isinstance(e, KeyboardInterrupt):
                raise
            tb = traceback.extract_tb(e.__traceback__)
            where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb[-4:])
            out = Outcome("failed", f"{type(e).__module__}.{type(e).__qualname__}: {str(e)[:500]} [{where}]")
        finally:
            _ACTIVE.clear()
        out.seconds = time.perf_counter() - t0
        if _VIOLATIONS:
            out.violations = list(_VIOLATIONS)
            out.detail = f"read outside the case directory: {_VIOLATIONS}; reader said: {out.detail}"
            out.status = "failed"
        out.detail = out.detail.replace(str(d), "<case>")[:2000]
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _serve(conn, bases: dict[str, dict[str, bytes]], headroom: int) -> None:
    """The worker: every reader once on its valid files (they must open), then limits on, then cases."""
    import torch

    torch.set_num_threads(1)
    warm = {}
    for r in READERS.values():
        o = _run_case(r, bases[r.base], {})
        warm[r.name] = (o.status, o.detail)
    _ALLOWED.extend(_allowed_roots())
    sys.addaudithook(_audit)
    limit = _vm_size() + headroom
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    conn.send(("ready", warm, limit))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, files = msg
        r = READERS[name]
        try:
            o = _run_case(r, bases[r.base], files)
        except MemoryError:  # while writing the case or formatting the outcome
            o = Outcome("failed", "MemoryError outside the reader")
        conn.send(o)


class Worker:
    """The parent's end: starts the worker, sends cases, restarts it after a hang or a death."""

    def __init__(
        self, bases: dict[str, dict[str, bytes]], timeout: float = CASE_TIMEOUT, headroom: int = LIMIT_HEADROOM
    ):
        self.bases, self.timeout, self.headroom = bases, timeout, headroom
        self.proc = self.conn = None
        self.warm: dict[str, tuple[str, str]] = {}
        self.limit = 0
        self.starts = 0

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.bases, self.headroom), daemon=True)
        self.proc.start()
        child.close()
        self.starts += 1
        if not self.conn.poll(300):
            self.close()
            raise RuntimeError("the fuzz worker did not start within 300 s")
        tag, self.warm, self.limit = self.conn.recv()

    def run(self, reader: str, files: dict[str, bytes]) -> Outcome:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        t0 = time.perf_counter()
        try:
            self.conn.send((reader, files))
            if self.conn.poll(self.timeout):
                return self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.proc = None
            how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            return Outcome("failed", f"the worker died ({how}) reading the case", time.perf_counter() - t0)
        self.close()
        return Outcome("failed", f"hang: no answer within {self.timeout:.0f} s", time.perf_counter() - t0)

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(None)
            self.proc.join(2)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        self.proc = None


def describe(case) -> str:
    """A case, short enough for an assertion message (inserted bytes and JSON values abbreviated)."""
    parts = []
    for target, ops in case:
        parts.append(f"{target}: " + "; ".join(re.sub(r"\s+", " ", repr(op))[:300] for op in ops))
    return " | ".join(parts)


def save_case(
    root: Path, reader: Reader, base: dict[str, bytes], files: dict[str, bytes], case, outcome: Outcome
) -> Path:
    """Write a failing case's files (base and mutated) and what happened under `root`; returns its directory."""
    h = hashlib.sha1(repr((reader.name, sorted(files.items()))).encode()).hexdigest()[:10]
    d = root / f"{reader.name}-{h}"
    for rel, data in {**base, **files}.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    (d / "OUTCOME.txt").write_text(
        f"reader: {reader.name}\ncase: {describe(case)}\n{outcome.status}: {outcome.detail}\n"
    )
    return d
