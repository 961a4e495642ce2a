"""What is in a checkpoint: architecture, parameters, bytes and bits per weight by component."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, open_checkpoint
from .names import COMPONENTS, parse_name


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    ck: Checkpoint = open_checkpoint(path)
    c = ck.config
    comps: dict[str, dict[str, Any]] = {
        k: {"params": 0, "bytes": 0, "tensors": 0, "storage": defaultdict(int)} for k in COMPONENTS
    }
    for name, lt in ck.tensors.items():
        comp = comps[parse_name(name).component if name not in ck.extra else "other"]
        comp["params"] += lt.numel
        comp["bytes"] += lt.stored_bytes
        comp["tensors"] += 1
        comp["storage"][lt.storage] += lt.numel
    components = {}
    for k, v in comps.items():
        if not v["tensors"]:
            continue
        v["bits_per_weight"] = round(8 * v["bytes"] / v["params"], 3) if v["params"] else 0.0
        v["storage"] = dict(sorted(v["storage"].items(), key=lambda kv: -kv[1]))
        components[k] = v
    total_params = sum(v["params"] for v in components.values())
    total_bytes = sum(v["bytes"] for v in components.values())
    per_token = _active_params(ck)
    q = c.quantization_config or ({"quant_method": "gguf"} if getattr(ck, "by_gguf", None) else {})
    return {
        "path": str(ck.path),
        "model_type": c.model_type,
        "architecture": {
            "layers": c.num_hidden_layers,
            "dense_layers": len(c.dense_layers),
            "moe_layers": len(c.moe_layers),
            "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads,
            "q_lora_rank": c.q_lora_rank,
            "kv_lora_rank": c.kv_lora_rank,
            "qk_head_dim": c.qk_head_dim,
            "v_head_dim": c.v_head_dim,
            "routed_experts": c.n_routed_experts,
            "experts_per_token": c.num_experts_per_tok,
            "shared_experts": c.n_shared_experts,
            "moe_intermediate_size": c.moe_intermediate_size,
            "vocab_size": c.vocab_size,
            "rope": c.rope.type,
            "rope_factor": c.rope.factor,
            "context": c.max_position_embeddings,
            "softmax_scale": round(c.softmax_scale, 6),
        },
        "quantization": q.get("quant_method") or "none",
        "shards": len(ck.shards),
        "file_bytes": ck.total_bytes,
        "params": total_params,
        "active_params_per_token": per_token,
        "bytes": total_bytes,
        "bits_per_weight": round(8 * total_bytes / total_params, 3) if total_params else 0.0,
        "components": components,
        "unused_tensors": ck.extra,
    }


def _active_params(ck: Checkpoint) -> int:
    """Parameters a token touches: everything but the routed experts it is not sent to (embeddings count once)."""
    c = ck.config
    total = 0
    for name, lt in ck.tensors.items():
        ni = parse_name(name)
        if name in ck.extra or name == "model.embed_tokens.weight":
            continue
        if ni.component == "routed_experts":
            total += lt.numel * c.num_experts_per_tok // c.n_routed_experts
        else:
            total += lt.numel
    return total


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n}"


def format_inspect(info: dict[str, Any]) -> str:
    a = info["architecture"]
    lines = [
        f"{info['path']}",
        f"  {info['model_type']}: {a['layers']} layers ({a['dense_layers']} dense, {a['moe_layers']} MoE), "
        f"hidden {a['hidden_size']}, {a['heads']} heads, MLA q_lora {a['q_lora_rank']} kv_lora {a['kv_lora_rank']}",
        f"  experts: {a['routed_experts']} routed, {a['experts_per_token']} per token, {a['shared_experts']} shared, "
        f"width {a['moe_intermediate_size']}; vocab {a['vocab_size']}; rope {a['rope']} x{a['rope_factor']:g}, "
        f"context {a['context']}",
        f"  {_human(info['params'])} parameters ({_human(info['active_params_per_token'])} active per token), "
        f"{_human(info['bytes'], 'B')} in {info['shards']} shard(s), {info['bits_per_weight']:.2f} bits/weight, "
        f"quantization: {info['quantization']}",
        "",
        f"  {'component':<16}{'params':>10}{'bytes':>11}{'bpw':>8}  storage",
    ]
    for name, v in info["components"].items():
        storage = ", ".join(info_s for info_s in v["storage"])
        lines.append(
            f"  {name:<16}{_human(v['params']):>10}{_human(v['bytes'], 'B'):>11}{v['bits_per_weight']:>8.2f}  {storage}"
        )
    if info["unused_tensors"]:
        lines.append(
            f"  ignored by the forward: {len(info['unused_tensors'])} tensor(s), e.g. {info['unused_tensors'][0]}"
        )
    return "\n".join(lines)
