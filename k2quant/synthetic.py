"""Synthetic checkpoints in the official K2 layout, streamed shard by shard.

Benchmarks and memory tests need checkpoints at real K2 dimensions (hidden 7168, expert
width 2048) that are gigabytes large; they are generated here one shard at a time, so
making a 10 GB checkpoint needs the memory of one shard. Weights are seeded per tensor
name: the same arguments give byte-identical files.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

from k2quant.formats.hf import save_safetensors, shard_name, write_json
from k2quant.formats.tokenizer import save_tokenizer

from .config import K2Config
from .names import expected_shapes
from .release import FP8_QUANTIZATION_CONFIG, release_tensors


def k2_config_dict(**overrides) -> dict:
    """Kimi-K2-Instruct's config.json, with fields overridden (e.g. fewer layers or experts)."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": 163840,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 384,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.827,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "tie_word_embeddings": False,
        "bos_token_id": 163584,
        "eos_token_id": 163585,
        "torch_dtype": "bfloat16",
        "num_nextn_predict_layers": 0,
        "quantization_config": dict(FP8_QUANTIZATION_CONFIG),
    }
    cfg.update(overrides)
    return cfg


def random_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Deterministic weights for `name`: N(0, 1/sqrt(fan_in)) for matrices, ~1 for norms."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
    if name.endswith("e_score_correction_bias"):
        return 0.01 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(shape[1])


def write_synthetic_checkpoint(
    out_dir: str | Path, config: dict, num_shards: int, fp8: bool = True, seed: int = 0, style: str = "k2"
) -> Path:
    """Write a random checkpoint for `config` in `num_shards` shards (layers split evenly)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    else:
        cfg.pop("quantization_config", None)
    k2 = K2Config.from_dict(cfg)
    shapes = expected_shapes(k2)
    layers = k2.num_hidden_layers
    num_shards = max(1, min(num_shards, layers))

    def shard_of(name: str) -> int:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) * num_shards // layers
        return 0 if name.startswith("model.embed") else num_shards - 1

    write_json(out / "config.json", cfg)
    if k2.vocab_size >= 512:  # a byte-level tokenizer (256 tokens + K2's 256 specials), so GGUF output has a vocabulary
        save_tokenizer(out, {bytes([i]): i for i in range(256)})
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(num_shards):
        names = [n for n in shapes if shard_of(n) == s]
        state = {n: random_tensor(n, shapes[n], seed) for n in names}
        stored = dict(release_tensors(state, fp8=fp8))
        del state
        fname = shard_name(s + 1, num_shards, style)
        save_safetensors(out / fname, stored)
        weight_map.update(dict.fromkeys(stored, fname))
        total += sum(t.numel() * t.element_size() for t in stored.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out
