"""K2Config: both config forms, derived values, and one clear error per bad field."""

from __future__ import annotations

import copy
import json

import pytest

from k2quant import ConfigError, K2Config

# Kimi-K2-Instruct config.json (shared/reference/k2-checkpoint.md §2.1)
K2_INSTRUCT = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}


def test_k2_instruct_derived_values():
    c = K2Config.from_dict(K2_INSTRUCT)
    assert c.qk_head_dim == 192
    assert c.softmax_scale == pytest.approx(0.130861, abs=1e-6)
    assert c.rope.cos_sin_scale == 1.0
    assert c.dense_layers == [0]
    assert c.moe_layers == list(range(1, 61))
    assert c.rope.type == "yarn" and c.rope.factor == 32.0 and c.rope.theta == 50000.0
    assert c.rope.beta_fast == 1.0 and c.rope.original_max_position_embeddings == 4096


def test_rope_parameters_form_equals_legacy_form():
    new = copy.deepcopy(K2_INSTRUCT)
    new["model_type"] = "deepseek_v3"
    rs = new.pop("rope_scaling")
    rs.pop("type")
    new["rope_parameters"] = {**rs, "rope_type": "yarn", "rope_theta": new.pop("rope_theta")}
    a, b = K2Config.from_dict(K2_INSTRUCT), K2Config.from_dict(new)
    assert a.rope == b.rope and a.softmax_scale == b.softmax_scale


def test_thinking_factor_64():
    d = copy.deepcopy(K2_INSTRUCT)
    d["rope_scaling"]["factor"] = 64.0
    c = K2Config.from_dict(d)
    assert c.softmax_scale / 192**-0.5 == pytest.approx((0.1 * __import__("math").log(64) + 1) ** 2)


def test_from_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(K2_INSTRUCT))
    assert K2Config.from_file(tmp_path).num_hidden_layers == 61
    with pytest.raises(ConfigError, match="config.json"):
        K2Config.from_file(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        K2Config.from_file(tmp_path)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"n_group": 5}, "n_group"),
        ({"n_group": 8, "topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 400}, "num_experts_per_tok"),
        ({"first_k_dense_replace": 99}, "first_k_dense_replace"),
        ({"hidden_size": "7168"}, "hidden_size"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"rope_scaling": {"type": "longrope", "factor": 4.0}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "yarn", "factor": "x"}}, "rope_scaling.factor"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
            "quantization_config.weight_block_size",
        ),
        (None, "vocab_size"),
    ],
)
def test_bad_fields_name_the_field(change, field):
    d = copy.deepcopy(K2_INSTRUCT)
    if change is None:
        del d["vocab_size"]
    else:
        d.update(change)
    with pytest.raises(ConfigError) as e:
        K2Config.from_dict(d, source="x/config.json")
    assert e.value.field == field
    assert f"'{field}'" in str(e.value) and "x/config.json" in str(e.value)
