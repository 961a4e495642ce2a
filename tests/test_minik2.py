"""mini-K2: architecturally K2, trained (it learned something), saved exactly as K2 ships."""

from __future__ import annotations

import json

import torch

from k2quant import open_checkpoint, open_model
from k2quant.config import K2Config
from k2quant.formats.tokenizer import load_tokenizer
from k2quant.minik2 import TRAIN, config_dict, init_params, train
from k2quant.names import parse_name


def test_layout_is_the_official_release(mini_k2):
    fp8 = mini_k2["fp8"]
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2"
    assert cfg["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert sorted(p.name for p in fp8.glob("*.safetensors")) == [f"model-{i}-of-4.safetensors" for i in range(1, 5)]
    assert (fp8 / "tiktoken.model").exists() and (fp8 / "tokenizer_config.json").exists()
    ck = open_checkpoint(fp8)
    for name, lt in ck.tensors.items():
        ni = parse_name(name)
        if ni.is_linear and ni.component != "embeddings":
            assert lt.format == "fp8_block", name
            assert lt.parts["weight"].dtype == torch.float8_e4m3fn
            assert lt.parts["weight_scale_inv"].dtype == torch.float32
        elif name.endswith("e_score_correction_bias"):
            assert lt.parts["e_score_correction_bias"].dtype == torch.float32
        else:
            assert lt.format == "dense" and lt.parts["weight"].dtype == torch.bfloat16, name
    bf16 = open_checkpoint(mini_k2["bf16"])
    assert bf16.config.quantization_config is None
    assert {lt.format for lt in bf16.tensors.values()} == {"dense"}


def test_architecture_is_k2_scaled_down(mini_k2):
    c = open_checkpoint(mini_k2["fp8"]).config
    assert c.q_lora_rank and c.kv_lora_rank and c.rope.type == "yarn"
    assert c.dense_layers == [0] and len(c.moe_layers) >= 2 and c.n_shared_experts == 1
    assert c.n_routed_experts >= 32 and c.num_experts_per_tok >= 4
    assert 20e6 <= mini_k2["info"]["params"] <= 60e6
    for name, lt in open_checkpoint(mini_k2["fp8"]).tensors.items():
        if parse_name(name).is_linear:
            assert lt.shape[1] % 256 == 0, f"{name}: input width {lt.shape[1]} is not a multiple of 256"


def test_it_learned_something(mini_k2):
    info = mini_k2["info"]
    assert info["heldout_ppl_after"] < info["heldout_ppl_before"] / 5
    assert info["loss_last"] < info["loss_first"] - 2
    # auxiliary-loss-free balancing kept routing from collapsing onto a few experts
    assert max(info["max_over_mean_expert_load"].values()) < 4
    bias = open_checkpoint(mini_k2["fp8"]).tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.abs().max() > 0


def test_fp8_release_is_close_to_bf16_and_transformers_agrees(mini_k2, tmp_path):
    tok = load_tokenizer(mini_k2["fp8"])
    ids = torch.tensor([tok.encode("import os\nimport sys\n\n\ndef main(argv):\n    parser = ")[:32]])
    ref = open_model(mini_k2["bf16"]).logits(ids)
    cand = open_model(mini_k2["fp8"]).logits(ids)
    kld = torch.nn.functional.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    assert kld.sum(-1).mean() < 0.05
    assert (ref.argmax(-1) == cand.argmax(-1)).float().mean() > 0.8

    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(
        _as_deepseek_v3(mini_k2["bf16"], tmp_path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (theirs - ref).abs().max() < 1e-3


def _as_deepseek_v3(src, tmp):
    """transformers reads model_type kimi_k2 only with remote code; give it the deepseek_v3 twin."""
    import shutil

    d = tmp / "twin"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    rope = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {**rope, "rope_type": "yarn", "rope_theta": cfg.pop("rope_theta")}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_training_is_deterministic():
    cfg = K2Config.from_dict(config_dict())
    stream = torch.randint(0, cfg.vocab_size, (5000,), generator=torch.Generator().manual_seed(0))
    a, b = init_params(cfg, 0), init_params(cfg, 0)
    train(cfg, a, stream, progress=False, steps=2)
    train(cfg, b, stream, progress=False, steps=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The bench model trains for an hour: a run stopped after a save resumes from it and ends
    on exactly the weights of an uninterrupted run; the state file is gone when training ends."""
    cfg = K2Config.from_dict(config_dict())
    stream = torch.randint(0, cfg.vocab_size, (5000,), generator=torch.Generator().manual_seed(0))
    recipe = dict(TRAIN, steps=4, batch=2, seq=32, warmup=2)
    whole = init_params(cfg, 0)
    train(cfg, whole, stream, progress=False, recipe=recipe)
    state = tmp_path / "train-state.pt"
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def stop_at_third_step(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return clip(*args, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", stop_at_third_step)
    parts = init_params(cfg, 0)
    try:
        train(cfg, parts, stream, progress=False, recipe=recipe, state_path=state, save_every=2)
    except KeyboardInterrupt:
        pass
    assert state.is_file()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    resumed = init_params(cfg, 0)
    stats = train(cfg, resumed, stream, progress=False, recipe=recipe, state_path=state, save_every=2)
    assert len(stats["loss_history"]) == 4 and not state.exists()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_demo_runs_end_to_end(mini_k2):
    from k2quant.demo import run

    lines: list[str] = []
    summary = run(mini_k2["fp8"].parent.parent, echo=lines.append)
    text = "\n".join(lines)
    assert "mini-K2: reusing" in text and "routed_experts" in text and "k2quant run" in text
    assert set(summary["runner"]) == {"en", "zh"} and all(
        g["decode_tokens_per_s"] > 0 for g in summary["runner"].values()
    )
    assert "bytes read per token" in text and "请用两句话介绍一下你自己" in text
    assert summary["fp8_vs_bf16"]["top1_agreement"] > 0.9 and summary["int4_vs_bf16"]["top1_agreement"] > 0.9
    assert summary["gguf_q4_k_m_vs_bf16"]["top1_agreement"] > 0.85 and "Q4_K" in text
