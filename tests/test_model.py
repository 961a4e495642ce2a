"""The one forward against transformers' DeepseekV3ForCausalLM (float32, max abs error <= 1e-4)."""

from __future__ import annotations

import zlib

import pytest
import torch

from k2quant import open_model
from k2quant.model import K2Model, MLACache

from .conftest import hf_state_and_config, k2_style_config, make_hf_model, write_checkpoint

TOL = 1e-4


def _ids(vocab: int, b: int = 2, t: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "case, overrides",
    [
        ("k2-yarn", dict(yarn=True)),
        ("k2-plain-rope", dict(yarn=False)),
        ("v3-group-routing-yarn", dict(yarn=True, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)),
        (
            "v3-group-routing-plain",
            dict(
                yarn=False,
                n_routed_experts=16,
                n_group=4,
                topk_group=2,
                num_experts_per_tok=3,
                first_k_dense_replace=2,
                num_hidden_layers=4,
            ),
        ),
        ("no-q-lora", dict(yarn=True, q_lora_rank=None)),
    ],
)
@pytest.mark.parametrize("form", ["deepseek_v3", "kimi_k2"])
def test_matches_transformers(tmp_path, case, overrides, form):
    model = make_hf_model(seed=zlib.crc32(case.encode()) % 1000, **overrides)
    state, config = hf_state_and_config(model, tmp_path)
    if form == "kimi_k2":
        config = k2_style_config(config)
    ckpt = write_checkpoint(tmp_path / "ckpt", state, config, shards=2)
    ids = _ids(config["vocab_size"])
    with torch.no_grad():
        ref = model(ids).logits
    ours = open_model(ckpt).logits(ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"{case}/{form}: max abs error {err} (logits up to {ref.abs().max().item():.2f})"
    # the routing is not trivially uniform: experts differ per token
    assert ref.abs().max() > 1.0


def test_fp8_checkpoint_matches_transformers_dequantizing_load(tiny_fp8_dir):
    """transformers loads the same FP8-block files (dequantizing on CPU) and agrees with us."""
    # transformers cannot read model_type kimi_k2 without remote code: give it the deepseek_v3 twin
    import json
    import shutil

    from transformers import DeepseekV3ForCausalLM

    twin = tiny_fp8_dir.parent / "twin"
    shutil.copytree(tiny_fp8_dir, twin, dirs_exist_ok=True)
    cfg = json.loads((twin / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    cfg["rope_parameters"] = {**cfg.pop("rope_scaling"), "rope_type": "yarn", "rope_theta": cfg.pop("rope_theta")}
    (twin / "config.json").write_text(json.dumps(cfg))
    ref_model = DeepseekV3ForCausalLM.from_pretrained(twin, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids(cfg["vocab_size"])
    with torch.no_grad():
        ref = ref_model(ids).logits
    ours = open_model(tiny_fp8_dir).logits(ids)
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs error {err}"


def test_streamed_equals_resident(tiny_fp8_dir):
    ids = _ids(512, t=20)
    a = open_model(tiny_fp8_dir).logits(ids)
    b = open_model(tiny_fp8_dir, resident=True).logits(ids)
    assert torch.equal(a, b)


def test_kv_cache_decode_matches_full_forward(tiny_fp8_dir):
    model: K2Model = open_model(tiny_fp8_dir, resident=True)
    ids = _ids(512, b=1, t=24)
    full = model.logits(ids)
    cache = MLACache(model.config, 24)
    with torch.no_grad():
        step = [model.forward(ids[:, :16], cache)]
        for t in range(16, 24):
            step.append(model.forward(ids[:, t : t + 1], cache))
    inc = torch.cat(step, dim=1)
    assert (inc - full).abs().max().item() <= TOL
    c = model.config
    assert cache.length() == 24
    assert cache.nbytes() == c.num_hidden_layers * 24 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_observer_sees_every_linear(tiny_fp8_dir):
    model = open_model(tiny_fp8_dir)
    seen: dict[str, int] = {}
    model.observer = lambda name, x: seen.__setitem__(name, seen.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0])
    model.logits(_ids(512, b=1, t=10))
    assert seen["model.layers.0.self_attn.q_a_proj"] == 10
    assert seen["lm_head"] == 10
    assert seen["model.layers.0.self_attn.attn_k_b"] == 10 * model.config.num_attention_heads  # per head
    # each token visits num_experts_per_tok experts
    routed = sum(v for k, v in seen.items() if k.startswith("model.layers.1.mlp.experts.") and k.endswith("gate_proj"))
    assert routed == 10 * model.config.num_experts_per_tok


@pytest.mark.parametrize("mla", ["absorbed", "expanded"])
def test_decode_forms_match_transformers_past_the_original_window(tmp_path, mla):
    """Prefill, then one token at a time through the preallocated cache, in either attention form,
    at positions past YaRN's original_max_position_embeddings (64 here): transformers' logits to 1e-4."""
    model = make_hf_model(seed=5)
    state, config = hf_state_and_config(model, tmp_path)
    ckpt = write_checkpoint(tmp_path / "ckpt", state, config)
    ids = _ids(config["vocab_size"], b=1, t=96, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    ours = open_model(ckpt, resident=True)
    ours.mla = mla
    cache = MLACache(ours.config, 96)
    with torch.no_grad():
        steps = [ours.forward(ids[:, :40], cache)] + [ours.forward(ids[:, t : t + 1], cache) for t in range(40, 96)]
    err = (torch.cat(steps, dim=1) - ref).abs().max().item()
    assert err <= TOL, f"{mla}: max abs error {err}"
    assert cache.length() == 96


def test_greedy_generation_equals_transformers_generate(tmp_path):
    from k2quant.model import generate

    model = make_hf_model(seed=9)
    state, config = hf_state_and_config(model, tmp_path)
    ckpt = write_checkpoint(tmp_path / "ckpt", state, config)
    prompt = _ids(config["vocab_size"], b=1, t=12, seed=4)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    theirs = ref[0, 12:].tolist()
    ours_model = open_model(ckpt, resident=True)
    ours = generate(ours_model, prompt[0].tolist(), 40)
    assert ours == theirs
    assert len(set(ours)) > 4  # not one token repeated


def _decode_steps(model: K2Model, ids: torch.Tensor, cache: MLACache, prefill: int, chunk: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens, one chunk of `chunk` tokens, then one token at a time."""
    cut = prefill + chunk
    with torch.no_grad():
        steps = [model.forward(ids[:, :prefill], cache), model.forward(ids[:, prefill:cut], cache)]
        steps += [model.forward(ids[:, t : t + 1], cache) for t in range(cut, ids.shape[1])]
    return torch.cat(steps, dim=1)


def test_absorbed_decode_at_depth_matches_expanded_and_transformers(tmp_path):
    """After a prefill past YaRN's original window (72 > 64 tokens), a masked chunk of 8 and 16
    single-token steps: the absorbed form equals the expanded one to 1e-5 of the largest logit
    (float32's floor here: the expanded form run whole and step by step differs by ~1.1e-5 absolute
    on logits up to ~6) and transformers to 1e-4, and the calibration observers see the same
    per-head inputs in both forms."""
    model = make_hf_model(seed=11)
    state, config = hf_state_and_config(model, tmp_path)
    ckpt = write_checkpoint(tmp_path / "ckpt", state, config)
    ids = _ids(config["vocab_size"], b=1, t=96, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    ours = open_model(ckpt, resident=True)
    logits, seen = {}, {}
    for mla in ("absorbed", "expanded", "auto"):
        ours.mla = mla
        logits[mla] = _decode_steps(ours, ids, MLACache(ours.config, 96), 72, 8)
        seen[mla] = {}
        ours.observer = lambda name, x, mla=mla: seen[mla].__setitem__(name, x.clone())
        with torch.no_grad():  # one more step at depth 96, observed
            ours.forward(ids[:, -1:], _filled(ours, ids))
        ours.observer = None
    scale = ref.abs().max().item()
    assert (logits["absorbed"] - logits["expanded"]).abs().max().item() <= 1e-5 * scale
    assert torch.equal(logits["auto"][:, :72], logits["expanded"][:, :72])  # auto: a long prefill expands
    for mla in ("absorbed", "expanded", "auto"):
        err = (logits[mla] - ref).abs().max().item()
        assert err <= TOL, f"{mla}: max abs error {err}"
    h = ours.config.num_attention_heads
    for name in ("model.layers.0.self_attn.attn_k_b", "model.layers.2.self_attn.attn_v_b"):
        a, e = seen["absorbed"][name], seen["expanded"][name]
        assert a.shape == e.shape and a.shape[:3] == (1, h, 1), (name, a.shape)
        assert (a - e).abs().max().item() <= 1e-5 * e.abs().max().item(), name


def _filled(model: K2Model, ids: torch.Tensor) -> MLACache:
    """A cache holding `ids` (computed by the expanded form), one row to spare."""
    cache = MLACache(model.config, ids.shape[1] + 1)
    form, model.mla = model.mla, "expanded"
    with torch.no_grad():
        model.forward(ids, cache)
    model.mla = form
    return cache


def test_absorbed_reads_a_bf16_cache_as_the_expanded_form_does(tmp_path):
    """A bf16 cache under float32 compute: the absorbed form casts cache blocks to float32, the
    expanded form the whole view. What the bf16 cache changes (against a float32 cache) the two
    forms change alike: they differ by under 5% of it (a rounding flip of one cached value between
    them is all that is left)."""
    model = make_hf_model(seed=12)
    state, config = hf_state_and_config(model, tmp_path)
    ours = open_model(write_checkpoint(tmp_path / "ckpt", state, config), resident=True)
    ids = _ids(config["vocab_size"], b=1, t=80, seed=8)
    logits = {}
    for mla in ("absorbed", "expanded"):
        ours.mla = mla
        for dtype in (torch.bfloat16, torch.float32):
            logits[mla, dtype] = _decode_steps(ours, ids, MLACache(ours.config, 80, dtype=dtype), 66, 6)
    bf16_effect = (logits["expanded", torch.bfloat16] - logits["expanded", torch.float32]).abs().max().item()
    forms = (logits["absorbed", torch.bfloat16] - logits["expanded", torch.bfloat16]).abs().max().item()
    assert 0 < bf16_effect and forms <= 0.05 * bf16_effect, (forms, bf16_effect)


def _attention_reference(q_lat, q_rot, latent, k_rot, mask):
    """softmax(q_lat latent^T + q_rot k_rot^T) latent per head, in float64, with the heads expanded."""
    lat, rot = latent.double()[:, None], k_rot.double()[:, None]
    scores = q_lat.double() @ lat.transpose(-1, -2) + q_rot.double() @ rot.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ lat


@pytest.mark.parametrize("block", [4096, 7])
def test_latent_attention_over_blocks_and_dtypes(monkeypatch, block):
    """latent_attention against the expanded float64 computation: one block or many (7 rows each,
    the last one short), causal mask, a float32 or bf16 cache under float32 queries, and bf16 throughout."""
    from k2quant import model as k2model
    from k2quant.model import latent_attention

    monkeypatch.setattr(k2model, "CACHE_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    b, h, t, s, width, r = 2, 3, 5, 40, 16, 8
    q_lat, q_rot = torch.randn(b, h, t, width, generator=g), torch.randn(b, h, t, r, generator=g)
    latent, k_rot = torch.randn(b, s, width, generator=g), torch.randn(b, s, r, generator=g)
    mask = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    mask[0, 9:] = False  # a query that sees only the first two blocks
    for m in (mask, None):
        ref = _attention_reference(q_lat, q_rot, latent, k_rot, m)
        out = latent_attention(q_lat, q_rot, latent, k_rot, m)
        assert out.dtype == torch.float32 and (out.double() - ref).abs().max().item() <= 1e-5
        lat16, rot16 = latent.bfloat16(), k_rot.bfloat16()
        ref16 = _attention_reference(q_lat, q_rot, lat16, rot16, m)
        assert (latent_attention(q_lat, q_rot, lat16, rot16, m).double() - ref16).abs().max().item() <= 1e-5
        low = latent_attention(q_lat.bfloat16(), q_rot.bfloat16(), lat16, rot16, m)
        assert low.dtype == torch.bfloat16 and (low.double() - ref16).abs().max().item() <= 0.05
