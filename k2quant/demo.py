"""`k2quant demo`: build mini-K2 and run what k2quant can do on it, end to end.

mini-K2 (k2quant/minik2.py) is built once in the official release layout (FP8 block
weights, bf16 embeddings, four shards with an index, tiktoken tokenizer) plus a BF16
copy, and reused on later runs. Each step prints what it produced and where.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from k2quant.calib.datasets import heldout_text

from . import minik2
from .calibrate import calibrate
from .calibrate import format_summary as format_calibration
from .convert import convert, format_summary
from .convert_gguf import convert_gguf
from .inspect import format_inspect, inspect_checkpoint
from .manifest import MANIFEST
from .recipe import build_recipe
from .report.diff import run_diff
from .report.render import report_paths, terminal_summary
from .runner.console import answer, format_report, stop_ids
from .runner.engine import Sampling
from .runner.runner import Runner, RunOptions


def _run_or_reuse(where: Path, done_marker: Path, echo, step) -> None:
    """Run a demo step (it returns its printed summary) unless an earlier run finished it. Each step
    is called with resume, so an interrupted demo run again goes on where the step stopped."""
    if done_marker.exists():
        echo(f"   reusing {where}")
        return
    echo(step())


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

    echo("\n== 3. k2quant calibrate (bundled text, layer-streamed): imatrix.gguf and expert hotness")
    calib = out / "calib"
    _run_or_reuse(calib, calib / "calibration.json", echo, lambda: format_calibration(
        calibrate(fp8, calib, tokens=4096, ctx=256, min_expert_tokens=32, progress=False, resume=True)))  # fmt: skip

    echo("\n== 3b. k2quant convert --to safetensors --preset k2-int4 --calib (routed experts INT4 g32, as K2-Thinking)")
    int4 = out / "mini-k2-int4"
    _run_or_reuse(int4, int4 / MANIFEST, echo, lambda: format_summary(
        convert(fp8, int4, build_recipe("k2-int4"), transformers_config=True, progress=False,
                imatrix=calib / "imatrix.gguf", resume=True)))  # fmt: skip

    echo("\n== 3c. k2quant convert --to gguf --preset q4_k_m --calib (llama.cpp, one pass from FP8)")
    gguf_dir = out / "mini-k2-gguf"
    _run_or_reuse(gguf_dir, gguf_dir / MANIFEST, echo, lambda: format_summary(
        convert_gguf(fp8, gguf_dir, build_recipe("q4_k_m", target="gguf"), progress=False,
                     imatrix=calib / "imatrix.gguf", name="mini-k2-Q4_K_M", resume=True)))  # fmt: skip
    gguf_file = gguf_dir / "mini-k2-Q4_K_M.gguf"

    # held-out text: calib/heldout/, read by neither mini-K2's training nor calibration
    data = out / "heldout.txt"
    data.write_text(heldout_text(), encoding="utf-8")
    results = {}
    for step, (name, cand) in enumerate((("fp8", fp8), ("int4", int4), ("gguf-q4_k_m", gguf_file)), start=4):
        echo(f"\n== {step}. k2quant diff: {name} against the BF16 reference (layer-streamed)")
        m = run_diff(bf16, cand, [data], ctx=128, progress=False, out=out / f"diff-{name}", resume=True)
        paths = report_paths(out / f"diff-{name}")
        echo("   " + terminal_summary(m).replace("\n", "\n   "))
        echo(f"   report: {paths['html']}")
        results[name] = {k: m[k] for k in ("tokens", "top1_agreement")} | {"mean_kld": m["kld"]["mean"],
                                                                           "ppl_ratio": m["ppl"]["ratio"]}  # fmt: skip

    echo("\n== 7. k2quant run: the INT4 model through the runner (packed weights, absorbed MLA, greedy)")
    runner = Runner(int4, RunOptions(ctx=512), progress=False)
    generations = {}
    try:
        for lang, prompt in (("en", "Write a short note about how a bicycle wheel is trued."),
                             ("zh", "请用两句话介绍一下你自己。")):  # fmt: skip
            text = runner.template.render([{"role": "user", "content": prompt}])
            ids = runner.tokenizer.encode(text, allow_special=True)
            turn = answer(runner, ids, Sampling(temperature=0, max_tokens=48, stop_ids=stop_ids(runner.tokenizer)),
                          (), None, None)  # fmt: skip
            echo(f"   > {prompt}\n   " + turn.text.replace("\n", "\n   "))
            report = runner.report()
            echo("   " + format_report(report).replace("\n", "\n   "))
            generations[lang] = {"text": turn.text, "decode_tokens_per_s": report["decode_tokens_per_s"]}
    finally:
        runner.close()

    summary = {
        "fp8": str(fp8),
        "bf16": str(bf16),
        "params": info["params"],
        "heldout_ppl_trained": info["heldout_ppl_after"],
        "int4": str(int4),
        "fp8_vs_bf16": results["fp8"],
        "int4_vs_bf16": results["int4"],
        "gguf": str(gguf_file),
        "gguf_q4_k_m_vs_bf16": results["gguf-q4_k_m"],
        "runner": generations,
        "seconds": round(time.time() - t0, 1),
    }
    echo("\n== summary\n" + json.dumps(summary, indent=2))
    return summary
