"""Benchmark: where k2quant's Q4_K_M and llama-quantize's differ, measured by llama.cpp itself.

Inputs as a new user has them: mini-K2's FP8 release; k2quant converts it directly, llama.cpp
quantizes the BF16 GGUF of the same release (llama_model_quantize); an imatrix from llama.cpp's
own llama-imatrix over the bundled calibration text. KLD is llama-perplexity
--kl-divergence against that BF16 GGUF on held-out text (the project's calib/heldout/ by
default, or --heldout FILE ...; each file is scored on its own). The tools are built from the
llama.cpp source of the installed llama-cpp-python and run with their extra buffer types off.

Prints, with and without the imatrix:
1. the tensor types of both files (must be identical);
2. every tensor's error against the BF16 weights, k2quant / llama-quantize, from the same BF16
   input (importance-weighted when there is an imatrix entry);
3. mean and max KLD of both files per held-out text;
4. attribution: llama-quantize's file with one tensor class swapped in from k2quant's, KLD per text;
5. the noise floor: token_embd (a lookup table: no imatrix entry, llama.cpp's reference
   procedure in both tools' no-importance case) re-encoded four ways of near-equal error,
   each swapped into llama-quantize's file, KLD per text.

--preset iq4_xs (or any llama.cpp file type k2quant names) compares that preset instead;
--no-swaps leaves out 4 (and 5, which is Q4_K_M's).

Usage: python bench/q4km_cause.py [--dir /tmp/k2bench-q4km] [--heldout FILE ...] [--chunks 40]
       [--preset q4_k_m] [--no-swaps]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llamacpp import SETTING, errors_against_llama, kld_summary, llama_quantize, llama_tool, no_repack_args  # noqa: E402

from k2quant import minik2_bench, open_checkpoint  # noqa: E402
from k2quant.calib.datasets import bundled_texts  # noqa: E402
from k2quant.convert_gguf import convert_gguf  # noqa: E402
from k2quant.formats.imatrix import read_imatrix_gguf  # noqa: E402
from k2quant.quant import ggml  # noqa: E402
from k2quant.recipe import LLAMA_FTYPES, build_recipe  # noqa: E402

CLASSES = ("token_embd", "output.weight", "attn_", "_shexp", "_exps", "blk.0.ffn")


def _yarn(cfg) -> list[str]:
    return ["--yarn-beta-fast", str(cfg.rope.beta_fast), "--yarn-beta-slow", str(cfg.rope.beta_slow)]


def _kld(exe: Path, model: Path, bf16: Path, base: Path, text: Path, chunks: int, yarn: list[str]):
    """(mean KLD, its uncertainty, max KLD) of `model` against `bf16`'s logits of `text`, saved in `base`."""
    s = kld_summary(exe, model, bf16, base, text, chunks, yarn)
    return (*s["kld"], s["max_kld"])


def _patched(base: Path, out: Path, tensors: dict[str, bytes]) -> Path:
    """A copy of GGUF `base` with the data of some tensors replaced (same types, same sizes)."""
    shutil.copy(base, out)
    infos = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    with open(out, "r+b") as f:
        for name, data in tensors.items():
            assert len(data) == infos[name].n_bytes, name
            f.seek(infos[name].data_offset)
            f.write(data)
    return out


def _data(path: Path, names) -> dict[str, bytes]:
    return {t.name: np.asarray(t.data).view(np.uint8).tobytes() for t in gguf.GGUFReader(str(path)).tensors
            if t.name in names}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/k2bench-q4km")
    ap.add_argument("--heldout", nargs="*", type=Path, help="held-out text files (default: calib/heldout/*.txt)")
    ap.add_argument("--chunks", type=int, default=40, help="512-token chunks scored per text (at most)")
    ap.add_argument("--cases", nargs="*", default=["plain", "imatrix"], choices=["plain", "imatrix"])
    ap.add_argument("--preset", default="q4_k_m", choices=[p for p in LLAMA_FTYPES if p not in ("f32", "f16", "bf16")])
    ap.add_argument("--no-swaps", action="store_true", help="leave out the per-class attribution and the noise floor")
    ap.add_argument("--demo-model", action="store_true",
                    help="the demo's mini-K2 (built in minutes) instead of the bench model (an hour once)")  # fmt: skip
    a = ap.parse_args()
    P = a.preset
    root = Path(a.dir) / ("demo-model" if a.demo_model else "bench-model")  # each model's files apart
    root.mkdir(parents=True, exist_ok=True)
    fp8, _, about = minik2_bench.releases(a.demo_model)
    print(about)
    heldout = a.heldout or sorted((Path(__file__).resolve().parent.parent / "calib/heldout").glob("*.txt"))
    perplexity = llama_tool("llama-perplexity", Path(a.dir) / "llama.cpp")
    imatrix_exe = llama_tool("llama-imatrix", Path(a.dir) / "llama.cpp")
    print(f"llama.cpp tools from the llama-cpp-python source, {SETTING}")

    def convert(name: str, preset: str, **kw) -> Path:
        if not (root / name).exists():
            convert_gguf(fp8, root / name, build_recipe(preset, target="gguf"), progress=False, **kw)
        return next((root / name).glob("*.gguf"))

    bf16 = convert("bf16", "bf16")
    ref = open_checkpoint(bf16)
    yarn = _yarn(ref.config)
    calib = root / "calib.txt"
    calib.write_text("".join(bundled_texts().values()), encoding="utf-8")
    imat = root / "llama-imatrix.gguf"
    if not imat.exists():
        subprocess.run([str(imatrix_exe), *no_repack_args(imatrix_exe), "-m", str(bf16), "-f", str(calib), "-o",
                        str(imat), "-c", "256", "-b", "256", "--chunks", "64", "-t", "2", *yarn],
                       check=True, capture_output=True)  # fmt: skip
    names = set(ref.by_gguf)
    colw = {n: np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1), 1.0).astype(np.float32)
            for n, (s, c) in read_imatrix_gguf(imat, names).items()}  # fmt: skip
    texts = []
    for i, src in enumerate(heldout):
        texts.append((f"{src.parent.name}/{src.name}", root / f"heldout-{i}.txt"))
        texts[-1][1].write_text(src.read_text(encoding="utf-8"), encoding="utf-8")

    for label, im in (("no imatrix", None), ("llama-imatrix's imatrix", colw)):
        tag = "plain" if im is None else "imatrix"
        if tag not in a.cases:
            continue
        ours = convert(f"k2quant-{P}-{tag}", P, **({} if im is None else {"imatrix": imat}))
        theirs = root / f"llama-quantize-{P}-{tag}.gguf"
        if not theirs.exists():
            llama_quantize(bf16, theirs, P, imatrix={k: v.reshape(-1) for k, v in im.items()} if im else None)
        A, B = open_checkpoint(ours), open_checkpoint(theirs)
        print(f"\n== {P.upper()}, {label}")
        diff = [n for n in names if A.by_gguf[n].tensor_type != B.by_gguf[n].tensor_type]
        print(f"tensor types: {len(names)} tensors, {len(diff)} differ {sorted(diff)}")
        print("per-tensor error vs BF16, k2quant / llama-quantize, same BF16 input (weighted by the imatrix entry):")
        quantized = sorted(n for n in names if B.by_gguf[n].tensor_type.name != "F32")
        weights = {n: torch.from_numpy(v) for n, v in (im or {}).items()}
        worst = [(ours_e / llama_e, n, B.by_gguf[n].tensor_type.name, use)
                 for n, (ours_e, llama_e, use) in errors_against_llama(ref, B, quantized, weights).items()]  # fmt: skip
        for r, n, t, use in sorted(worst, reverse=True)[:6]:
            print(f"  {n:<30} {t:<5} {r:.4f}{'  (weighted)' if use else ''}")
        med = np.median([w[0] for w in worst])
        print(f"  ... {len(worst)} tensors, ratio max {max(worst)[0]:.4f} median {med:.4f}")
        swaps = {} if a.no_swaps else {
            c: _patched(theirs, root / f"swap-{P}-{tag}-{i}.gguf", _data(ours, {n for n in names if c in n}))
            for i, c in enumerate(CLASSES)}  # fmt: skip
        for tname, tpath in texts:
            print(f"held-out {tname}: mean KLD ± unc, max")
            for who, path in (("k2quant", ours), ("llama-quantize", theirs)):
                m, u, mx = _kld(perplexity, path, bf16, tpath.with_suffix(".kld"), tpath, a.chunks, yarn)
                print(f"  {who:<16} {m:.6f} ± {u:.6f}  max {mx:.4f}")
            for c, swap in swaps.items():
                m, u, mx = _kld(perplexity, swap, bf16, tpath.with_suffix(".kld"), tpath, a.chunks, yarn)
                print(f"  llama-quantize's file with k2quant's {c:<14} {m:.6f} ± {u:.6f}  max {mx:.4f}")

    if a.no_swaps or P != "q4_k_m":
        return
    print("\n== noise floor: token_embd re-encoded in llama-quantize's plain file (errors vs BF16 / llama's)")
    if not (root / "llama-quantize-q4_k_m-plain.gguf").exists():
        llama_quantize(bf16, root / "llama-quantize-q4_k_m-plain.gguf", "q4_k_m")
    theirs = root / "llama-quantize-q4_k_m-plain.gguf"
    w = ref._decode("token_embd.weight").float()
    lerr = ((open_checkpoint(theirs)._decode("token_embd.weight").float() - w) ** 2).sum().item()
    g = torch.Generator().manual_seed(0)
    col = torch.rand(w.shape[1], generator=g) + 0.5  # an arbitrary mild column weighting
    variants = {"llama.cpp procedure (rtn)": ggml.quantize(w, "Q4_K", None, search=False),
                "k2quant search (mse)": ggml.quantize(w, "Q4_K", None, search=True),
                "search, columns weighted U(0.5,1.5)": ggml.quantize(w, "Q4_K", col, search=True),
                "rtn of weights + 1% noise": ggml.quantize(w + torch.randn(w.shape, generator=g) * w.std() * 0.01,
                                                           "Q4_K", None, search=False)}  # fmt: skip
    for vname, data in variants.items():
        err = ((ggml.dequantize(data, "Q4_K", w.shape[1]) - w) ** 2).sum().item() / lerr
        swap = _patched(theirs, root / "swap.gguf", {"token_embd.weight": data.numpy().tobytes()})
        klds = [(tn, _kld(perplexity, swap, bf16, tp.with_suffix(".kld"), tp, a.chunks, yarn)) for tn, tp in texts]
        row = "  ".join(f"{tn} {m:.6f} ± {u:.6f}" for tn, (m, u, _) in klds)
        print(f"  {vname:<38} error {err:.4f}  {row}")


if __name__ == "__main__":
    main()
