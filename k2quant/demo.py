"""`k2quant demo`: build a small K2 and run what k2quant can do on it, end to end.

The model is built in the official release layout (FP8 block weights, bf16 embeddings,
sharded, indexed) plus a BF16 copy, cached under the output directory and reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .inspect import format_inspect, inspect_checkpoint
from .model import open_model
from .synthetic import k2_config_dict, write_synthetic_checkpoint

DEMO_DIMS = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=256,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=16384,
)


def build(out: Path, echo=print) -> tuple[Path, Path]:
    fp8, bf16 = out / "model-fp8", out / "model-bf16"
    cfg = k2_config_dict(**DEMO_DIMS)
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=512)
    for path, is_fp8 in ((fp8, True), (bf16, False)):
        if (path / "model.safetensors.index.json").exists():
            echo(f"reusing {path}")
            continue
        write_synthetic_checkpoint(path, cfg, num_shards=4, fp8=is_fp8)
        echo(f"built {path}")
    return fp8, bf16


def run(out: str | Path, echo=print) -> dict:
    out = Path(out)
    t0 = time.time()
    fp8, bf16 = build(out, echo)
    echo("\n== inspect (FP8 release form)")
    echo(format_inspect(inspect_checkpoint(fp8)))
    echo("\n== forward: FP8 release against its BF16 copy, layer-streamed")
    ids = torch.randint(0, DEMO_DIMS["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    ref = open_model(bf16).logits(ids)
    cand = open_model(fp8).logits(ids)
    kld = torch.nn.functional.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(
        -1
    )
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean().item()
    summary = {
        "fp8": str(fp8),
        "bf16": str(bf16),
        "tokens": ids.numel(),
        "mean_kld_fp8_vs_bf16": kld.mean().item(),
        "top1_agreement": top1,
        "seconds": round(time.time() - t0, 1),
    }
    echo(json.dumps(summary, indent=2))
    return summary
