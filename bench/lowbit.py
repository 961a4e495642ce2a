"""Benchmark: k2quant's size-targeted GGUF mixes against llama-quantize's stock low-bit mixes, by llama.cpp.

Inputs as a new user has them: mini-K2's FP8 release; its BF16 GGUF (k2quant convert); two
importance matrices over the bundled calibration text, llama-imatrix's (on the BF16 GGUF) and
k2quant calibrate's. For each imatrix, llama_model_quantize makes the stock mixes IQ2_XXS, IQ2_M,
Q2_K, IQ3_XXS and Q3_K_M of the BF16 GGUF, and `k2quant convert --target-size` makes a mix from
the FP8 release aimed at the size of the smallest stock file of each group (IQ2_XXS's, about
2.1-2.6 bpw, and IQ3_XXS's, about 3.5), with the same imatrix and measured sensitivity. Every
file is scored by llama-perplexity --kl-divergence against the BF16 GGUF on the same held-out
text and chunks (calib/heldout/, disjoint from training and calibration text; each file on its
own). The llama.cpp tools are built from the installed llama-cpp-python's source, extra buffer
types off.

Prints per imatrix and text: bits per weight, size, mean KLD +- uncertainty, max KLD, top-1
agreement, PPL(Q)/PPL(base), and for each k2quant mix its margin over every stock file of the
same or larger size in combined standard errors ((stock - mix) / sqrt(u_stock^2 + u_mix^2); at
least 1 is the issue's bar).

With --diff N every file is also scored by `k2quant diff` (k2quant's own layer-streamed forward)
against the BF16 GGUF on the first held-out text, N chunks.

Usage: python bench/lowbit.py [--dir /tmp/k2bench-lowbit] [--chunks 40] [--imatrix llama k2quant] [--diff N]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llamacpp import SETTING, kld_summary, llama_quantize, llama_tool, no_repack_args  # noqa: E402

from k2quant import minik2_bench, open_checkpoint  # noqa: E402
from k2quant.calib.datasets import bundled_texts  # noqa: E402
from k2quant.convert_gguf import convert_gguf  # noqa: E402
from k2quant.formats.imatrix import read_imatrix_gguf  # noqa: E402
from k2quant.formats.tokenizer import load_tokenizer  # noqa: E402
from k2quant.mix import format_mix, plan_mix  # noqa: E402
from k2quant.recipe import build_recipe  # noqa: E402
from k2quant.report.diff import run_diff  # noqa: E402

GROUPS = {"2-bit": ("iq2_xxs", "iq2_m", "q2_k"), "3-bit": ("iq3_xxs", "q3_k_m")}  # the first: the mix's target


def _bpw(path: Path) -> float:
    r = open_checkpoint(path).readers[0]
    return 8 * sum(int(t.n_bytes) for t in r.tensors) / sum(int(t.n_elements) for t in r.tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/k2bench-lowbit")
    ap.add_argument("--chunks", type=int, default=40, help="512-token chunks scored per text (at most)")
    ap.add_argument("--imatrix", nargs="*", default=["llama", "k2quant"], choices=["llama", "k2quant"])
    ap.add_argument(
        "--diff",
        type=int,
        default=0,
        metavar="CHUNKS",
        help="also score every file with k2quant diff (its forward) on the first text, this many chunks",
    )
    ap.add_argument("--demo-model", action="store_true",
                    help="the demo's mini-K2 (built in minutes) instead of the bench model (an hour once)")  # fmt: skip
    a = ap.parse_args()
    root = Path(a.dir) / ("demo-model" if a.demo_model else "bench-model")  # each model's files apart
    root.mkdir(parents=True, exist_ok=True)
    fp8, _, about = minik2_bench.releases(a.demo_model)
    print(about)
    perplexity = llama_tool("llama-perplexity", Path(a.dir) / "llama.cpp")
    imatrix_exe = llama_tool("llama-imatrix", Path(a.dir) / "llama.cpp")
    print(f"mini-K2; llama.cpp tools from the llama-cpp-python source, {SETTING}")
    if not (root / "bf16").exists():
        convert_gguf(fp8, root / "bf16", build_recipe("bf16", target="gguf"), progress=False)
    bf16 = next((root / "bf16").glob("*.gguf"))
    cfg = open_checkpoint(bf16).config
    yarn = ["--yarn-beta-fast", str(cfg.rope.beta_fast), "--yarn-beta-slow", str(cfg.rope.beta_slow)]
    calib = root / "calib.txt"
    calib.write_text("".join(bundled_texts().values()), encoding="utf-8")
    imatrices = {"llama": root / "llama-imatrix.gguf", "k2quant": root / "k2quant-calib" / "imatrix.gguf"}
    if not imatrices["llama"].exists():
        subprocess.run([str(imatrix_exe), *no_repack_args(imatrix_exe), "-m", str(bf16), "-f", str(calib), "-o",
                        str(imatrices["llama"]), "-c", "256", "-b", "256", "--chunks", "64", "-t", "2", *yarn],
                       check=True, capture_output=True)  # fmt: skip
    if not imatrices["k2quant"].exists():
        subprocess.run([sys.executable, "-m", "k2quant", "calibrate", str(fp8), "--out", str(root / "k2quant-calib"),
                        "--tokens", "16384", "--ctx", "256", "--min-expert-tokens", "8"], check=True,
                       capture_output=True)  # fmt: skip
    heldout = sorted((Path(__file__).resolve().parent.parent / "calib/heldout").glob("*.txt"))
    names = set(open_checkpoint(bf16).by_gguf)

    for which in a.imatrix:
        imat = imatrices[which]
        colw = {n: np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1), 1.0).astype(np.float32).reshape(-1)
                for n, (s, c) in read_imatrix_gguf(imat, names).items()}  # fmt: skip
        files: dict[str, Path] = {}
        for group, presets in GROUPS.items():
            for p in presets:
                out = root / f"llama-{p}-{which}.gguf"
                if not out.exists():
                    llama_quantize(bf16, out, p, imatrix=colw)
                files[f"llama-quantize {p}"] = out
            target = files[f"llama-quantize {presets[0]}"].stat().st_size
            mix_dir = root / f"k2quant-mix-rtn-{group}-{which}"
            if not mix_dir.exists():
                mix = plan_mix(open_checkpoint(fp8), target_size=target, imatrix=str(imat))
                print(format_mix(mix))
                convert_gguf(fp8, mix_dir, mix.recipe(), method="rtn", progress=False, imatrix=str(imat), name="mix")
            files[f"k2quant mix @ {presets[0]} size"] = next(mix_dir.glob("*.gguf"))
        print(f"\n== imatrix: {which}'s ({imat.name})")
        for src in heldout:
            text = root / f"heldout-{src.stem}.txt"
            text.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
            base = text.with_suffix(".kld")
            print(f"held-out {src.parent.name}/{src.name}:")
            print(f"  {'file':34} {'bpw':>6} {'MB':>7} {'mean KLD':>21} {'max':>7} {'top-1 %':>15} {'PPL ratio':>9}")
            res = {}
            for label, path in files.items():
                s = res[label] = kld_summary(perplexity, path, bf16, base, text, a.chunks, yarn)
                (m, u), (t1, t1u) = s["kld"], s["top1"]
                print(f"  {label:34} {_bpw(path):6.3f} {path.stat().st_size / 1e6:7.2f} {m:10.6f} ± {u:8.6f} "
                      f"{s['max_kld']:7.3f} {t1:7.3f} ± {t1u:5.3f} {s['ppl_ratio'][0]:9.4f}")  # fmt: skip
            _margins(files, res, "llama-perplexity")
            if a.diff and src == heldout[0]:
                print(f"  k2quant diff, {a.diff} chunks of 512 (the second half of each scored):")
                ids = text.with_suffix(".ids.json")  # the GGUFs carry no tiktoken.model beside them
                ids.write_text(json.dumps(load_tokenizer(fp8).encode(text.read_text(encoding="utf-8"))))
                dres = {}
                for label, path in files.items():
                    m = run_diff(bf16, path, [ids], ctx=512, chunks=a.diff, progress=False)
                    dres[label] = {"kld": (m["kld"]["mean"], m["kld"]["stderr"])}
                    k = m["kld"]
                    print(f"  {label:34} {k['mean']:10.6f} ± {k['stderr']:8.6f}  max {k['max']:.3f}")
                _margins(files, dres, "k2quant diff")


def _margins(files: dict[str, Path], res: dict, who: str) -> None:
    """Each mix against every stock file of the same or larger size, in combined standard errors."""
    for presets in GROUPS.values():
        mix_label = f"k2quant mix @ {presets[0]} size"
        mm, mu = res[mix_label]["kld"]
        size = files[mix_label].stat().st_size
        for p in presets:
            label = f"llama-quantize {p}"
            if files[label].stat().st_size < size:
                continue  # only stock files of the same or larger size count
            sm, su = res[label]["kld"]
            z = (sm - mm) / math.sqrt(su * su + mu * mu)
            verdict = "better" if z >= 1 else ("level" if z > -1 else "worse")
            print(f"  {who}: {mix_label} vs {p}: {z:+.2f} combined standard errors ({verdict})")


if __name__ == "__main__":
    main()
