"""`k2quant demo`: build mini-K2 and run what k2quant can do on it, end to end.

mini-K2 (k2quant/minik2.py) is built once in the official release layout (FP8 block
weights, bf16 embeddings, four shards with an index, tiktoken tokenizer) plus a BF16
copy, and reused on later runs. Each step prints what it produced and where.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from k2quant.calib.datasets import bundled_texts
from k2quant.formats.tokenizer import load_tokenizer

from . import minik2
from .inspect import format_inspect, inspect_checkpoint
from .model import generate, open_model


def run(out: str | Path, echo=print) -> dict:
    out = Path(out)
    t0 = time.time()
    echo("== 1. mini-K2 (K2's architecture, trained here, saved as K2 ships)")
    info = minik2.build(out / "mini-k2", echo)
    fp8, bf16 = Path(info["fp8"]), Path(info["bf16"])
    echo(f"   FP8 release form: {fp8}\n   BF16 reference:   {bf16}")
    echo(
        f"   held-out perplexity: {info['heldout_ppl_before']:.1f} untrained -> {info['heldout_ppl_after']:.1f} trained"
    )

    echo("\n== 2. k2quant inspect")
    echo(format_inspect(inspect_checkpoint(fp8)))

    echo("\n== 3. the K2 forward, layer-streamed: FP8 release against its BF16 copy on held-out text")
    tok = load_tokenizer(fp8)
    text = bundled_texts()["en_prose.txt"]
    ids = torch.tensor([tok.encode(text[-2000:])[:256]])
    ref = open_model(bf16).logits(ids)
    cand = open_model(fp8).logits(ids)
    kld = torch.nn.functional.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    kld = kld.sum(-1)
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean().item()
    echo(f"   {ids.numel()} tokens: mean KLD {kld.mean().item():.5f}, top-1 agreement {top1:.1%}")

    echo("\n== 4. greedy generation from the FP8 model (KV cache of compressed latents)")
    model = open_model(fp8, resident=True)
    prompt = "def read_config(path):\n"
    new = generate(model, tok.encode(prompt), 40, stop=(tok.eos_id,))
    echo("   " + (prompt + tok.decode(new)).replace("\n", "\n   "))

    summary = {
        "fp8": str(fp8),
        "bf16": str(bf16),
        "params": info["params"],
        "heldout_ppl_trained": info["heldout_ppl_after"],
        "fp8_vs_bf16": {"tokens": ids.numel(), "mean_kld": kld.mean().item(), "top1_agreement": top1},
        "seconds": round(time.time() - t0, 1),
    }
    echo("\n== summary\n" + json.dumps(summary, indent=2))
    return summary
