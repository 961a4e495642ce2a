"""`k2quant calibrate`: tokens in, imatrix.gguf + hotness.json + calibration.json out.

Resumable: each finished layer leaves its statistics and the hidden states after it in
OUT/.k2quant-calibrate (calib/resume.py); `resume=True` starts at the next layer, with
outputs byte-identical to an uninterrupted run. The files are deterministic (no timings:
those are in the returned summary only); calibration.json is written last."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from k2quant.calib.collect import collect, coverage_report
from k2quant.calib.datasets import bundled_documents, load_texts, sample_sequences
from k2quant.calib.resume import CalibrationState, run_key, source_key
from k2quant.formats.hf import write_json
from k2quant.formats.imatrix import write_imatrix
from k2quant.formats.tokenizer import load_tokenizer

from .errors import K2QuantError
from .model import open_model

HESSIANS = "hessians.safetensors"  # X^T X per linear (float32), for convert --method gptq


def calibration_sequences(src: str | Path, data: list[str | Path] | None, tokens: int, ctx: int
                          ) -> tuple[torch.Tensor, int]:  # fmt: skip
    """The calibration text (files, or the bundled set) tokenized with SRC's tokenizer, documents
    joined by EOS, sampled into tokens // ctx windows of ctx: ([n, ctx] ids, tokens in the text)."""
    try:
        tok = load_tokenizer(src)
    except FileNotFoundError:
        raise K2QuantError(f"{src}: no tiktoken.model; calibration needs the model's tokenizer") from None
    stream: list[int] = []
    for d in load_texts(data) if data else bundled_documents():
        stream.extend(tok.encode(d, allow_special=True))
        stream.append(tok.eos_id)
    try:
        return torch.tensor(sample_sequences(stream, max(1, tokens // ctx), ctx), dtype=torch.long), len(stream)
    except ValueError as e:
        raise K2QuantError(str(e)) from None


def calibrate(
    src: str | Path,
    out: str | Path,
    data: list[str | Path] | None = None,
    tokens: int = 65536,
    ctx: int = 512,
    min_expert_tokens: int = 0,
    batch: int = 8,
    progress: bool = True,
    hessian: bool = False,
    resume: bool = False,
) -> dict:
    """Writes imatrix.gguf, hotness.json, calibration.json (and hessians.safetensors with `hessian`).
    An unfinished run in `out` is finished with `resume` (refused without it, or when its inputs or
    options differ from these)."""
    t0 = time.time()
    src, out = Path(src), Path(out)
    if out.exists() and not out.is_dir():
        raise K2QuantError(f"{out}: exists and is not a directory")
    model = open_model(src)  # layer-streamed; collect() keeps one layer's non-expert weights at a time
    ck = model.checkpoint
    seqs, text_tokens = calibration_sequences(src, data, tokens, ctx)
    n = seqs.shape[0]
    hidden = [(min(batch, n - i), ctx, ck.config.hidden_size) for i in range(0, n, batch)]
    options = {"tokens": tokens, "ctx": ctx, "min_expert_tokens": min_expert_tokens, "batch": batch, "hessian": hessian,
               "data": [str(p) for p in data] if data else None}  # fmt: skip
    key = run_key({"source": source_key(src, ck.shards)}, seqs, options)
    state = CalibrationState(out, key, ck.config.num_hidden_layers, ck.config.n_routed_experts, hidden,
                             set(ck.config.moe_layers))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    resumed = state.open(resume)
    (out / "calibration.json").unlink(missing_ok=True)  # written last: until then OUT holds no finished calibration
    start = resumed.layers_done if resumed else 0
    stats = collect(model, seqs, batch=batch, min_expert_tokens=min_expert_tokens, progress=progress, hessian=hessian,
                    resumed=resumed, layer_done=state.save_layer)  # fmt: skip
    datasets = [str(p) for p in data] if data else ["k2quant bundled calibration set"]
    write_imatrix(out / "imatrix.gguf", stats.in_sum2, stats.counts, ck.config.n_routed_experts, datasets, n, ctx)
    write_json(out / "hotness.json", stats.hotness())
    files = {"imatrix": "imatrix.gguf", "hotness": "hotness.json"}  # in OUT
    if stats.hessians is not None:
        from safetensors.torch import save_file

        tmp = out / (HESSIANS + ".tmp")
        save_file({m + ".hessian": h.float().contiguous() for m, h in sorted(stats.hessians.items())}, tmp)
        tmp.replace(out / HESSIANS)
        files["hessians"] = HESSIANS
    summary = {
        "source": str(src),
        "tokens": stats.tokens,
        "sequences": n,
        "ctx": ctx,
        "text_tokens": text_tokens,
        "min_expert_tokens": min_expert_tokens,
        "coverage": coverage_report(stats, min_expert_tokens),
        "linears": len(stats.in_sum2),
        "files": files,
    }
    write_json(out / "calibration.json", summary)
    state.finish()
    seconds = time.time() - t0
    work = stats.tokens * (1 - start / ck.config.num_hidden_layers)  # token-layers run here, in tokens
    return {**summary, "out": str(out), "resumed_at_layer": start, "seconds": round(seconds, 2),
            "tokens_per_second": round(work / max(seconds, 1e-9), 1)}  # fmt: skip


def format_summary(s: dict) -> str:
    resumed = f", resumed at layer {s['resumed_at_layer']}" if s.get("resumed_at_layer") else ""
    lines = [
        f"calibrated {s['source']}: {s['tokens']} tokens ({s['sequences']} x {s['ctx']}), {s['linears']} linears, "
        f"{s['seconds']:.1f} s ({s['tokens_per_second']:.0f} tokens/s{resumed})",
        f"  {'layer':<7}{'never routed':>14}{'below min':>11}{'fewest routed':>15}{'fewest after top-up':>21}",
    ]
    for layer, c in s["coverage"].items():
        lines.append(f"  {layer:<7}{c['never_routed']:>14}{c['experts_below_min']:>11}{c['min_routed']:>15}"
                     f"{c['min_after_top_up']:>21}")  # fmt: skip
    lines.append(f"  wrote {', '.join(str(Path(s['out']) / f) for f in s['files'].values())}")
    return "\n".join(lines)
