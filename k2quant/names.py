"""Tensor names of a K2 / DeepSeek-V3 checkpoint: what exists, and what each name is.

Names are the checkpoint's own (`model.layers.7.mlp.experts.12.up_proj.weight`); the
forward, the recipes and the reports all speak them, and only formats/gguf.py maps them
to llama.cpp's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import K2Config

ATTN_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
ATTN_LINEARS_NO_Q_LORA = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")

COMPONENTS = ("embeddings", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms", "other")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class NameInfo:
    """What a logical tensor name refers to."""

    name: str
    component: str
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None  # linear's short name (q_a_proj, gate_proj, ...), None for non-linears

    @property
    def is_linear(self) -> bool:
        return self.proj is not None


def parse_name(name: str) -> NameInfo:
    if name == "model.embed_tokens.weight":
        return NameInfo(name, "embeddings")
    if name == "lm_head.weight":
        return NameInfo(name, "embeddings", proj="lm_head")
    if name == "model.norm.weight":
        return NameInfo(name, "norms")
    m = _LAYER.match(name)
    if not m:
        return NameInfo(name, "other")
    layer, rest = int(m.group(1)), m.group(2)
    e = _EXPERT.match(rest)
    if e:
        return NameInfo(name, "routed_experts", layer, int(e.group(1)), e.group(2))
    if rest.endswith("layernorm.weight"):
        return NameInfo(name, "norms", layer)
    if rest in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
        return NameInfo(name, "router", layer)
    parts = rest.split(".")
    if len(parts) == 3 and parts[0] == "self_attn" and parts[2] == "weight":
        return NameInfo(name, "attention", layer, proj=parts[1])
    if len(parts) == 3 and parts[0] == "mlp" and parts[1] in MLP_LINEARS and parts[2] == "weight":
        return NameInfo(name, "dense_mlp", layer, proj=parts[1])
    if len(parts) == 4 and parts[:2] == ["mlp", "shared_experts"] and parts[2] in MLP_LINEARS and parts[3] == "weight":
        return NameInfo(name, "shared_experts", layer, proj=parts[2])
    return NameInfo(name, "other", layer)


def attn_linears(cfg: K2Config) -> tuple[str, ...]:
    return ATTN_LINEARS if cfg.q_lora_rank is not None else ATTN_LINEARS_NO_Q_LORA


def expert_weight(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def expected_shapes(cfg: K2Config) -> dict[str, tuple[int, ...]]:
    """Every logical tensor the forward needs, with its shape, in checkpoint order."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if cfg.q_lora_rank is not None:
            shapes[a + "q_a_proj.weight"] = (cfg.q_lora_rank, h)
            shapes[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (heads * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            shapes[a + "q_proj.weight"] = (heads * cfg.qk_head_dim, h)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        shapes[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (h, heads * cfg.v_head_dim)
        if not cfg.is_moe(i):
            f = cfg.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (f, h)
            shapes[p + "mlp.up_proj.weight"] = (f, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f)
            continue
        f = cfg.moe_intermediate_size
        shapes[p + "mlp.gate.weight"] = (cfg.n_routed_experts, h)
        shapes[p + "mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        if cfg.n_shared_experts:
            fs = f * cfg.n_shared_experts
            shapes[p + "mlp.shared_experts.gate_proj.weight"] = (fs, h)
            shapes[p + "mlp.shared_experts.up_proj.weight"] = (fs, h)
            shapes[p + "mlp.shared_experts.down_proj.weight"] = (h, fs)
        for e in range(cfg.n_routed_experts):
            shapes[expert_weight(i, e, "gate_proj")] = (f, h)
            shapes[expert_weight(i, e, "up_proj")] = (f, h)
            shapes[expert_weight(i, e, "down_proj")] = (h, f)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
