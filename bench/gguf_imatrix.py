"""Benchmark: Q4_K_M on mini-K2 with and without an imatrix, k2quant's quantizer against llama.cpp's.

Calibrates mini-K2 (BF16) with k2quant (bundled calibration text, not the held-out text),
then makes four Q4_K_M GGUFs from the same BF16 weights: k2quant convert without and with
the imatrix, and llama_model_quantize (llama-cpp-python) from k2quant's BF16 GGUF without
and with the same imatrix (as llama-quantize loads it: in_sum2 / counts). Prints the mean
KLD against BF16 and top-1 agreement over held-out text (second half of each 512-token
chunk scored, as llama-perplexity does), all evaluated by k2quant's forward.

llama.cpp's own imatrix tool is not part of llama-cpp-python, so both quantizers get
k2quant's imatrix. Usage: python bench/gguf_imatrix.py [--dir /tmp/k2bench-imatrix] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llamacpp import llama_quantize  # noqa: E402

from k2quant import minik2, open_model  # noqa: E402
from k2quant.calibrate import calibrate  # noqa: E402
from k2quant.convert_gguf import convert_gguf  # noqa: E402
from k2quant.formats.imatrix import read_imatrix_gguf  # noqa: E402
from k2quant.formats.tokenizer import load_tokenizer  # noqa: E402
from k2quant.recipe import build_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/k2bench-imatrix")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    ap.add_argument("--eval-chunks", type=int, default=4)
    a = ap.parse_args()
    root = Path(a.dir)
    info = minik2.build(minik2.default_dir(), progress=False)
    bf16 = Path(info["bf16"])
    calib = root / "calib"
    if not (calib / "imatrix.gguf").exists():
        calibrate(bf16, calib, None, tokens=a.tokens, ctx=256, progress=False)
    imat = calib / "imatrix.gguf"
    paths = {}
    for name, kw in (("k2quant", {}), ("k2quant+imatrix", {"imatrix": imat}), ("bf16", None)):
        out = root / name
        if not out.exists():
            recipe = build_recipe("bf16" if kw is None else "q4_k_m", target="gguf")
            convert_gguf(bf16, out, recipe, progress=False, **(kw or {}))
        paths[name] = next(out.glob("*.gguf"))
    names = {t.name for t in gguf.GGUFReader(str(paths["bf16"])).tensors}
    weights = {n: np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1), 1.0).reshape(-1)
               for n, (s, c) in read_imatrix_gguf(imat, names).items()}  # fmt: skip
    for name, im in (("llama.cpp", None), ("llama.cpp+imatrix", weights)):
        paths[name] = root / f"{name}.gguf"
        if not paths[name].exists():
            llama_quantize(paths["bf16"], paths[name], "q4_k_m", imatrix=im)
    tok = load_tokenizer(bf16)
    ids = tok.encode((bf16.parent / "eval.txt").read_text(encoding="utf-8"))[: 512 * a.eval_chunks]
    x = torch.tensor(ids).view(-1, 512)
    ref = torch.log_softmax(open_model(bf16).logits(x).double(), -1)[:, 256:-1]
    print(f"Q4_K_M vs BF16, mini-K2, {ref.shape[0] * ref.shape[1]} held-out tokens scored, "
          f"imatrix from {a.tokens} calibration tokens")  # fmt: skip
    for name in ("k2quant", "k2quant+imatrix", "llama.cpp", "llama.cpp+imatrix"):
        lq = torch.log_softmax(open_model(paths[name]).logits(x).double(), -1)[:, 256:-1]
        kld = (ref.exp() * (ref - lq)).sum(-1).flatten()
        top1 = (ref.argmax(-1) == lq.argmax(-1)).float().mean().item()
        print(f"  {name:<20} mean KLD {kld.mean().item():.6f} ± {kld.std().item() / kld.numel() ** 0.5:.6f}"
              f"  top-1 {100 * top1:.2f}%  {paths[name].stat().st_size / 1e6:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
