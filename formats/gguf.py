"""llama.cpp's names for K2 / DeepSeek-V3 tensors (architecture deepseek2).

Checkpoint names are k2quant's everywhere else; this module is the one place that knows
llama.cpp's. The GGUF model writer and reader (issue 6) will live here too.
"""

from __future__ import annotations

import re

# checkpoint module suffix (after model.layers.N.) -> GGUF base name (blk.N.<base>.weight)
LAYER_LINEARS = {
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.q_proj": "attn_q",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    # llama.cpp splits kv_b into attn_k_b / attn_v_b, whose inputs differ from kv_b's; the
    # legacy deepseek2 name attn_kv_b is the one whose input is kv_b's (the kv latent)
    "self_attn.kv_b_proj": "attn_kv_b",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
EXPERT_LINEARS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_BY_GGUF = {v: k for k, v in LAYER_LINEARS.items()}
_EXPERTS_BY_GGUF = {v: k for k, v in EXPERT_LINEARS.items()}
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_GGUF = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_linear(module: str) -> tuple[str, int | None] | None:
    """Checkpoint linear module -> (GGUF tensor name, expert index or None); None if llama.cpp has no such linear."""
    if module == "lm_head":
        return "output.weight", None
    m = _MODULE.match(module)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    e = _EXPERT.match(rest)
    if e:
        return f"blk.{layer}.{EXPERT_LINEARS[e.group(2)]}.weight", int(e.group(1))
    base = LAYER_LINEARS.get(rest)
    return (f"blk.{layer}.{base}.weight", None) if base else None


def checkpoint_linear(gguf_name: str, expert: int | None = None) -> str | None:
    """GGUF tensor name (+ expert index for *_exps) -> checkpoint linear module, or None if unknown."""
    if gguf_name == "output.weight":
        return "lm_head"
    m = _GGUF.match(gguf_name)
    if not m:
        return None
    layer, base = m.group(1), m.group(2)
    if base in _EXPERTS_BY_GGUF:
        return None if expert is None else f"model.layers.{layer}.mlp.experts.{expert}.{_EXPERTS_BY_GGUF[base]}"
    rest = _BY_GGUF.get(base)
    return f"model.layers.{layer}.{rest}" if rest else None
