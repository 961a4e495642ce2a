"""`k2quant run`: kernels against dequantize + F.linear, the runner against open_model and transformers,
the engine against the model's naive generate, placement and promotion with both tiers on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from k2quant import open_checkpoint, open_model
from k2quant.calib.datasets import heldout_text
from k2quant.checkpoint import StoredWeight
from k2quant.cli import main
from k2quant.convert import convert
from k2quant.errors import K2QuantError
from k2quant.formats.tokenizer import load_tokenizer
from k2quant.model import MLACache, generate
from k2quant.quant import ggml
from k2quant.quant.schemes import parse_scheme
from k2quant.recipe import build_recipe
from k2quant.runner.engine import Sampling, sample
from k2quant.runner.kernels import fuse_rows, make_linear
from k2quant.runner.placement import bytes_per_token, expert_bytes, place, read_hotness
from k2quant.runner.runner import Runner, RunOptions
from k2quant.runner.store import ExpertStore
from k2quant.runner.text import TextStream, ThinkingFilter
from k2quant.synthetic import k2_config_dict, write_synthetic_checkpoint

from .conftest import SMALL, hf_state_and_config, make_hf_model, write_checkpoint


def _stored(scheme: str, w: torch.Tensor) -> StoredWeight:
    s = parse_scheme(scheme)
    block = (128, 128) if s.kind == "fp8" else None
    return StoredWeight("w", s.form, tuple(w.shape), s.quantize(w, search=False), block)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g128", "int4-g32-asym", "fp8-block", "bf16"])
def test_kernels_match_dequantize_then_linear(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.05
    x = torch.randn(5, 512, generator=g)
    st = _stored(scheme, w)
    ref = F.linear(x, st.dequantize())
    exact = make_linear(st, "cpu", "exact")
    assert (exact(x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    fast = make_linear(st, "cpu", "fast")
    err = ((fast(x).float() - ref).abs().max() / ref.abs().max()).item()
    print(f"{scheme}: {fast.kernel}: max error / max |y| = {err:.2e}")
    assert err < 1.5e-2, (scheme, fast.kernel, err)
    if scheme in ("int4-g32", "int4-g128"):
        assert fast.kernel == "torch _weight_int4pack_mm_for_cpu"
        assert fast.nbytes < w.numel() * 0.7  # packed: 4 bits + bf16 (scale, zero) per group


def test_ggml_weights_run_dequantized_per_use():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    st = StoredWeight("w", "ggml:Q4_K", (64, 512), {"data": ggml.quantize(w, "Q4_K")})
    x = torch.randn(3, 512)
    ref = F.linear(x, ggml.dequantize(st.parts["data"], "Q4_K", 512))
    assert (make_linear(st, "cpu", "exact")(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gate_and_up_fuse_into_one_matrix():
    g = torch.Generator().manual_seed(2)
    a = _stored("int4-g32", torch.randn(128, 256, generator=g))
    b = _stored("int4-g32", torch.randn(128, 256, generator=g))
    fused = fuse_rows(a, b)
    assert fused.shape == (256, 256)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert fuse_rows(a, _stored("fp8-block", torch.randn(128, 256, generator=g))) is None


# ---------------------------------------------------------------------------- placement
def _inventory(cfg_overrides=None):
    cfg = k2_config_dict(**{**SMALL, **(cfg_overrides or {})})
    from k2quant.config import K2Config
    from k2quant.names import expected_shapes

    c = K2Config.from_dict(cfg)
    return {n: 2 * int(torch.tensor(s).prod()) for n, s in expected_shapes(c).items()}, c


def test_placement_order_budget_and_hotness():
    inv, c = _inventory()
    dense = {n: b for n, b in inv.items() if ".mlp.experts." not in n and not n.startswith("model.embed")}
    pl = place(inv, c, sum(dense.values()))
    assert pl.gpu == set(dense) and not pl.gpu_experts and pl.gpu_bytes == sum(dense.values())
    small = place(inv, c, 10_000)
    assert small.gpu_bytes <= 10_000 and all("norm" in n or "gate" in n for n in small.gpu)
    hot = {1: [0.1, 0.6, 0.2, 0.1], 2: [0.7, 0.1, 0.1, 0.1]}
    one = expert_bytes(inv, 1, 0)
    pl = place(inv, c, sum(dense.values()) + 2 * one, hot)
    assert pl.gpu_experts == {1: {1}, 2: {0}}  # the two hottest (layer, expert) pairs
    assert pl.gpu_bytes <= pl.gpu_budget and "model.embed_tokens.weight" not in pl.gpu
    bpt = bytes_per_token(pl, inv, c, hot)
    k = c.num_experts_per_tok
    routed = sum(k * f * expert_bytes(inv, layer, e) for layer, fs in hot.items() for e, f in enumerate(fs))
    emb = inv["model.embed_tokens.weight"] / c.vocab_size
    assert bpt["gpu"] + bpt["cpu"] == pytest.approx(sum(dense.values()) + emb + routed)
    assert bpt["gpu"] == pytest.approx(sum(dense.values()) + k * (0.6 * one + 0.7 * one))
    with pytest.raises(ValueError, match="hotness layer '3'"):
        read_hotness({"3": {"frequency": "hot"}})


def _skewed_trace(c, steps: int, seed: int = 0):
    """Per MoE layer, tokens routed with Zipf-like skew (the hot half takes ~75%), a different hot set per layer."""
    g = torch.Generator().manual_seed(seed)
    n, k = c.n_routed_experts, c.num_experts_per_tok
    probs = {}
    for layer in range(c.num_hidden_layers):
        if c.is_moe(layer):
            p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.2
            probs[layer] = p[torch.randperm(n, generator=g)]
    for _ in range(steps):
        yield {layer: torch.multinomial(p, k, generator=g)[None] for layer, p in probs.items()}


def test_dynamic_placement_beats_static_on_a_skewed_trace(tmp_path):
    cfg = k2_config_dict(**{**SMALL, "n_routed_experts": 16, "num_experts_per_tok": 2, "num_hidden_layers": 3})
    src = write_synthetic_checkpoint(tmp_path / "src", cfg, 1)
    ck = open_checkpoint(src)
    c = ck.config
    inv = {n: ck.info(n).stored_bytes for n in ck.names()}
    budget = 8 * expert_bytes(inv, 1, 0)  # a quarter of the 32 routed experts
    uniform = {layer: [1 / 16] * 16 for layer in (1, 2)}
    static_pl = place({n: b for n, b in inv.items() if ".mlp.experts." in n}, c, budget, uniform)
    shares = {}
    for dynamic in (False, True):
        store = ExpertStore(ck, "exact", torch.device("cpu"), torch.device("cpu"), budget, static_pl.gpu_experts,
                            dynamic=dynamic)  # fmt: skip
        assert len(store.fast) == 8 and store.fast_bytes <= budget
        for step in _skewed_trace(c, 300):
            for layer, ids in step.items():
                store.record(layer, ids)
            store.step()
            store.drain()
            assert store.fast_bytes <= budget
        shares[dynamic] = store.stats.fast_share()
        store.close()
    print(f"GPU share, static from a uniform start: {shares[False]}; dynamic: {shares[True]}")
    assert shares[True]["pairs"] > shares[False]["pairs"] + 0.2
    assert shares[True]["bytes"] > shares[False]["bytes"]


# ---------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory):
    """A tiny transformers-made DeepseekV3 (float32), saved and converted to int4-all."""
    tmp = tmp_path_factory.mktemp("tiny-run")
    hf = make_hf_model(seed=11)
    state, config = hf_state_and_config(hf, tmp)
    bf16 = write_checkpoint(tmp / "bf16", state, config)
    out = tmp / "int4"
    convert(bf16, out, build_recipe("int4-all"), method="rtn", progress=False)
    return {"hf": hf, "bf16": bf16, "int4": out}


def test_engine_greedy_equals_model_generate_and_reuses_the_prefix(tiny_int4):
    ref_model = open_model(tiny_int4["int4"], resident=True)
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = generate(ref_model, prompt, 32)
    r = Runner(tiny_int4["int4"], RunOptions(device="cpu", mode="exact", ctx=256, threads=2), progress=False)
    ours = list(r.generate(prompt, Sampling(temperature=0, max_tokens=32)))
    assert ours == ref and r.engine.stats.finish_reason == "length"
    # the next turn starts with the first: only its new tokens are prefilled, and the answer is the same
    nxt = prompt + ours[:10] + [7, 8, 9]
    again = list(r.generate(nxt, Sampling(temperature=0, max_tokens=8)))
    assert r.engine.stats.cached_tokens == len(prompt) + 10
    assert again == generate(ref_model, nxt, 8)
    r.close()


def test_engine_samples_only_the_tokenizers_ids(tiny_int4):
    """A checkpoint whose embedding is wider than its tokenizer (padded vocabularies) never yields an id the
    tokenizer cannot decode: the engine samples below Engine.vocab (the runner sets the tokenizer's size)."""
    r = Runner(tiny_int4["int4"], RunOptions(device="cpu", ctx=256, threads=2), progress=False)
    r.engine.vocab = 100
    out = list(r.generate(list(range(1, 30)), Sampling(temperature=2.0, seed=3, max_tokens=64)))
    assert len(out) == 64 and max(out) < 100
    r.close()


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0, -5.0])
    draws = [sample(logits, Sampling(temperature=1.0, seed=1), torch.Generator().manual_seed(1)) for _ in range(3)]
    assert len(set(draws)) == 1
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, Sampling(temperature=5.0, top_k=2), g) for _ in range(200)} == {0, 1}
    assert {sample(logits, Sampling(temperature=5.0, min_p=0.8), g) for _ in range(200)} <= {0, 1}
    assert {sample(logits, Sampling(temperature=1.0, top_p=0.3), g) for _ in range(200)} == {0}
    for bad, field in ((dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(min_p=1), "min_p"),
                       (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens")):  # fmt: skip
        with pytest.raises(K2QuantError, match=field):
            Sampling(**bad).check()


def test_runner_exact_mode_matches_open_model_and_transformers(tiny_int4, tmp_path):
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(6))
    r = Runner(tiny_int4["int4"], RunOptions(device="cpu", mode="exact", ctx=64), progress=False)
    with torch.no_grad():
        cache = MLACache(r.config, 64)
        ours = torch.cat([r.model.forward(ids[:, :24], cache)] + [r.model.forward(ids[:, t : t + 1], cache)
                                                                   for t in range(24, 40)], dim=1)  # fmt: skip
    ref = open_model(tiny_int4["int4"]).logits(ids)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel
    # transformers on the same int4-all output (decompressed by compressed-tensors)
    from transformers import CompressedTensorsConfig, DeepseekV3ForCausalLM

    twin = tmp_path / "twin"
    convert(tiny_int4["bf16"], twin, build_recipe("int4-all"), method="rtn", progress=False, transformers_config=True)
    hf = DeepseekV3ForCausalLM.from_pretrained(
        twin,
        dtype=torch.float32,
        attn_implementation="eager",
        quantization_config=CompressedTensorsConfig(dequantize=True),
    ).eval()
    for p in hf.parameters():
        p.data = p.data.float()
    with torch.no_grad():
        theirs = hf(ids).logits
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-4, rel
    r.close()


def test_runner_fast_mode_on_mini_k2_against_open_model(mini_k2, tmp_path):
    """K2-Thinking's form (INT4 experts, BF16 attention) of mini-K2: bf16 packed kernels against the
    float32 reference over 1000+ held-out tokens."""
    out = tmp_path / "thinking"
    convert(mini_k2["bf16"], out, build_recipe("k2-int4"), method="rtn", progress=False)
    ids = load_tokenizer(mini_k2["bf16"]).encode(heldout_text())[:1024]
    x = torch.tensor([ids])
    ref = open_model(out).logits(x)[0].double()
    r = Runner(out, RunOptions(device="cpu", mode="fast", ctx=1024, prefill_chunk=256), progress=False)
    with torch.no_grad():
        cache = MLACache(r.config, 1024, dtype=torch.bfloat16)
        ours = torch.cat([r.model.forward(x[:, i : i + 256], cache)[0] for i in range(0, 1024, 256)]).double()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    kld = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == ours.argmax(-1)).double().mean().item()
    print(f"runner fast mode vs open_model on mini-K2 (k2-int4 from BF16), 1024 held-out tokens: "
          f"mean KLD {kld:.2e}, top-1 {100 * top1:.2f}%")  # fmt: skip
    assert kld <= 1e-4 and top1 >= 0.99, (kld, top1)
    r.close()


# ---------------------------------------------------------------------------- text
def test_text_stream_never_breaks_a_character_or_a_stop_string(mini_k2):
    tok = load_tokenizer(mini_k2["fp8"])
    text = "汉字 and text; STOP here"
    ids = tok.encode(text)
    s = TextStream(tok, stop=("STOP",))
    pieces = [s.push(t) for t in ids] + [s.finish()]
    assert "".join(pieces) == "汉字 and text; " and s.stopped
    assert all("\ufffd" not in p for p in pieces)
    assert not any("ST" in p for p in pieces)
    f = ThinkingFilter(hide=True, color=False)
    assert f.push("a<thi") + f.push("nk>hidden</th") + f.push("ink>b", final=True) == "ab"
    f = ThinkingFilter(hide=False, color=True)
    assert "\x1b[2mhidden" in f.push("<think>hidden</think>ok", final=True)


# ---------------------------------------------------------------------------- CLI
def test_cli_run_json_and_errors(tiny_int4, mini_k2, tmp_path):
    model = tmp_path / "mini-int4"
    convert(mini_k2["fp8"], model, build_recipe("int4-all"), method="rtn", progress=False)
    r = subprocess.run([sys.executable, "-m", "k2quant", "run", str(model), "-p", "Hello, 你好", "--max-tokens", "6",
                        "--temperature", "0", "--device", "cpu", "--threads", "2", "--ram-bandwidth", "10G", "--json"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) <= 6 and isinstance(out["text"], str)
    st = out["stats"]
    assert st["device"] == "cpu" and st["decode_tokens"] == len(out["token_ids"]) and st["ram_bandwidth"] == 10e9
    assert st["bytes_per_token"]["cpu"] > 0 and st["peak_rss"] > 0
    cli = CliRunner()
    for args, msg in (
        (["--device", "cuda"], "no CUDA device"),
        (["--top-p", "2"], "top_p"),
        (["--ctx", "8"], "the context (--ctx) holds 8"),
        (["--gpu-memory", "lots"], "--gpu-memory"),
    ):
        if args[0] == "--device" and torch.cuda.is_available():
            continue
        res = cli.invoke(main, ["run", str(model), "-p", "Hello there, how are you today?", "--device", "cpu", *args])
        assert res.exit_code == 1 and msg in res.output, (args, res.output)
    res = cli.invoke(main, ["run", "--help"])
    assert "Examples" in res.output and "--hotness" in res.output


def test_runner_refuses_a_model_larger_than_ram(tiny_int4, monkeypatch):
    import k2quant.runner.runner as rr

    monkeypatch.setattr(rr, "available_ram", lambda: 1000)
    with pytest.raises(K2QuantError, match=r"needs .* GB of RAM .* but 0.0 GB are available"):
        Runner(tiny_int4["int4"], RunOptions(device="cpu"), progress=False)


RSS_SCRIPT = r"""
import sys, json
from k2quant.runner.runner import Runner, RunOptions
from k2quant.runner.engine import Sampling
r = Runner(sys.argv[1], RunOptions(device="cpu", ctx=256, threads=2, ram_bandwidth=1e10), progress=False)
list(r.generate(list(range(1, 40)), Sampling(temperature=0, max_tokens=16)))
rep = r.report()
print(json.dumps({k: rep[k] for k in ("peak_rss", "packed_cpu_bytes", "kv_cache_bytes")}))
"""


def test_runner_rss_against_the_packed_bytes_it_holds(mini_k2, tmp_path):
    model = tmp_path / "m"
    convert(mini_k2["fp8"], model, build_recipe("int4-all"), method="rtn", progress=False)
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model)], capture_output=True, text=True, check=True)
    m = json.loads(r.stdout.splitlines()[-1])
    base = subprocess.run([sys.executable, "-c", "import torch, k2quant.runner.runner; from k2quant.memory import "
                           "peak_rss; print(peak_rss())"], capture_output=True, text=True, check=True)  # fmt: skip
    over = m["peak_rss"] - int(base.stdout.split()[-1])  # above what python + torch cost before any model
    print(
        f"runner peak RSS {m['peak_rss'] / 2**20:.0f} MiB: {over / 2**20:.0f} MiB above the interpreter, for "
        f"{m['packed_cpu_bytes'] / 2**20:.1f} MiB packed + {m['kv_cache_bytes'] / 2**20:.1f} MiB KV cache"
    )
    assert over <= 1.1 * m["packed_cpu_bytes"] + m["kv_cache_bytes"] + 0.5 * 2**30


def test_runner_runs_a_gguf_like_open_model(tmp_path):
    from k2quant.convert_gguf import convert_gguf

    src = write_synthetic_checkpoint(tmp_path / "src", k2_config_dict(**SMALL), 1)
    out = tmp_path / "gguf"
    convert_gguf(src, out, build_recipe("q8_0", overrides=["exps=q4_0"], target="gguf"), progress=False)
    gfile = next(out.glob("*.gguf"))
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(8))
    r = Runner(gfile, RunOptions(device="cpu", mode="exact", ctx=32), progress=False)
    assert r.checkpoint.stored("model.layers.1.mlp.experts.0.up_proj.weight").format == "ggml:Q4_0"
    with torch.no_grad():
        ours = r.model.forward(ids, MLACache(r.config, 32))
    ref = open_model(gfile).logits(ids)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    r.close()
