"""Benchmark: Q4_K_M on mini-K2 with and without an imatrix, k2quant's quantizer and imatrix
against llama.cpp's.

The calibration text is the bundled set's sampled windows (not the held-out text), written
to one file. Two imatrices are computed from it: k2quant calibrate's, and llama.cpp's own
llama-imatrix's (run on k2quant's BF16 GGUF, built from the llama.cpp source of the
installed llama-cpp-python, which does not ship the tool). Then Q4_K_M GGUFs from the same
BF16 weights: k2quant convert and llama_model_quantize (llama-cpp-python), each without an
imatrix, with k2quant's and with llama.cpp's. Prints how close the two imatrices are, and
the mean KLD against BF16 and top-1 agreement over held-out text (second half of each
512-token chunk scored, as llama-perplexity does), all evaluated by k2quant's forward.

Usage: python bench/gguf_imatrix.py [--dir /tmp/k2bench-imatrix] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llamacpp import SETTING, llama_quantize, llama_tool, no_repack_args  # noqa: E402

from k2quant import minik2_bench, open_model  # noqa: E402
from k2quant.calib.datasets import heldout_text  # noqa: E402
from k2quant.calibrate import calibrate, calibration_sequences  # noqa: E402
from k2quant.convert_gguf import convert_gguf  # noqa: E402
from k2quant.formats.imatrix import read_imatrix_gguf  # noqa: E402
from k2quant.formats.tokenizer import load_tokenizer  # noqa: E402
from k2quant.recipe import build_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/k2bench-imatrix")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--demo-model", action="store_true",
                    help="the demo's mini-K2 (built in minutes) instead of the bench model (an hour once)")  # fmt: skip
    a = ap.parse_args()
    print(f"llama.cpp: llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, {SETTING}")
    root = Path(a.dir) / ("demo-model" if a.demo_model else "bench-model")  # each model's files apart
    root.mkdir(parents=True, exist_ok=True)
    _, bf16, about = minik2_bench.releases(a.demo_model)
    print(about)
    cfg = open_model(bf16).config
    text = root / "calib.txt"  # the windows k2quant would sample, as text both tools read
    if not text.exists():
        seqs, _ = calibration_sequences(bf16, None, a.tokens, 256)
        text.write_text("".join(load_tokenizer(bf16).decode(w.tolist()) for w in seqs), encoding="utf-8")
    calib = root / "calib"
    if not (calib / "imatrix.gguf").exists():
        calibrate(bf16, calib, [text], tokens=a.tokens, ctx=256, progress=False)
    imats = {"k2quant": calib / "imatrix.gguf", "llama.cpp": root / "llama-imatrix.gguf"}
    paths = {}
    for name, kw in (("k2quant", {}), ("bf16", None)):
        out = root / name
        if not out.exists():
            recipe = build_recipe("bf16" if kw is None else "q4_k_m", target="gguf")
            convert_gguf(bf16, out, recipe, progress=False, **(kw or {}))
        paths[name] = next(out.glob("*.gguf"))
    if not imats["llama.cpp"].exists():
        exe = llama_tool("llama-imatrix", Path(a.dir) / "llama.cpp")
        subprocess.run([str(exe), *no_repack_args(exe), "-m", str(paths["bf16"]), "-f", str(text), "-o",
                        str(imats["llama.cpp"]), "-c", "256", "-b", "256", "--chunks", str(a.tokens // 256), "-t", "2",
                        "--yarn-beta-fast", str(cfg.rope.beta_fast), "--yarn-beta-slow", str(cfg.rope.beta_slow)],
                       check=True, capture_output=True)  # fmt: skip
    names = {t.name for t in gguf.GGUFReader(str(paths["bf16"])).tensors}
    weights = {}
    for who, imat in imats.items():
        weights[who] = {n: np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1), 1.0).reshape(-1)
                        for n, (s, c) in read_imatrix_gguf(imat, names).items()}  # fmt: skip
        out = root / f"k2quant+{who}-imatrix"
        if not out.exists():
            convert_gguf(bf16, out, build_recipe("q4_k_m", target="gguf"), imatrix=imat, progress=False)
        paths[f"k2quant+{who}-imatrix"] = next(out.glob("*.gguf"))
    common = sorted(set(weights["k2quant"]) & set(weights["llama.cpp"]))
    cos = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for n in common
           for x, y in [(weights["k2quant"][n], weights["llama.cpp"][n])]]  # fmt: skip
    print(
        f"imatrices: k2quant {len(weights['k2quant'])} tensors, llama.cpp {len(weights['llama.cpp'])}, "
        f"{len(common)} in both; cosine of the column weights min {min(cos):.4f} median {np.median(cos):.4f}"
    )
    for name, im in (("llama.cpp", None), ("llama.cpp+k2quant-imatrix", weights["k2quant"]),
                     ("llama.cpp+llama.cpp-imatrix", weights["llama.cpp"])):  # fmt: skip
        paths[name] = root / f"{name}.gguf"
        if not paths[name].exists():
            llama_quantize(paths["bf16"], paths[name], "q4_k_m", imatrix=im)
    tok = load_tokenizer(bf16)
    ids = tok.encode(heldout_text())[: 512 * a.eval_chunks]  # calib/heldout/: not in training or calibration
    x = torch.tensor(ids).view(-1, 512)
    ref = torch.log_softmax(open_model(bf16).logits(x).double(), -1)[:, 256:-1]
    print(f"Q4_K_M vs BF16, mini-K2, {ref.shape[0] * ref.shape[1]} held-out tokens scored, "
          f"imatrix from {a.tokens} calibration tokens")  # fmt: skip
    for name in (
        "k2quant",
        "k2quant+k2quant-imatrix",
        "k2quant+llama.cpp-imatrix",
        "llama.cpp",
        "llama.cpp+k2quant-imatrix",
        "llama.cpp+llama.cpp-imatrix",
    ):
        lq = torch.log_softmax(open_model(paths[name]).logits(x).double(), -1)[:, 256:-1]
        kld = (ref.exp() * (ref - lq)).sum(-1).flatten()
        top1 = (ref.argmax(-1) == lq.argmax(-1)).float().mean().item()
        print(f"  {name:<28} mean KLD {kld.mean().item():.6f} ± {kld.std().item() / kld.numel() ** 0.5:.6f}"
              f"  top-1 {100 * top1:.2f}%  {paths[name].stat().st_size / 1e6:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
