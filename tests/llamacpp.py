"""llama.cpp (the llama-cpp-python package) as a peer: quantize a GGUF with its own quantizer,
evaluate a GGUF and return its logits for every position. Shared by tests and bench/."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

FTYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2,
          "q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q8_0": 7}  # fmt: skip


def llama_quantize(src: Path, dst: Path, ftype: str, *, pure: bool = False, nthread: int = 2,
                   imatrix: dict[str, np.ndarray] | None = None) -> None:  # fmt: skip
    """llama_model_quantize: `imatrix` maps GGUF tensor names to llama-quantize's column weights
    (mean x^2, already divided by the counts; experts' rows concatenated)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = nthread
    p.ftype = FTYPES[ftype]
    p.pure = pure
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, arr) in enumerate(sorted(imatrix.items())):
            a = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
            keep += [a, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = a.size
        entries[len(imatrix)].name = None
        p.imatrix = entries
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {src}")


def llama_logits(path: Path, tokens: list[int], n_ctx: int, beta_fast: float, beta_slow: float) -> np.ndarray:
    """Logits for every position of `tokens` (one sequence) from llama.cpp's CPU backend.

    llama.cpp's deepseek2 loader does not read rope.scaling.yarn_beta_fast/slow from the file
    (it keeps 32 / 1); K2 configures 1 / 1, so the context is given the config's values."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                n_threads=2, yarn_beta_fast=beta_fast, yarn_beta_slow=beta_slow, seed=0)  # fmt: skip
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


def llama_source(root: Path) -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python's source distribution (pip download)."""
    import importlib.metadata

    ver = importlib.metadata.version("llama-cpp-python")
    d = root / f"llama_cpp_python-{ver}"
    if not (d / "vendor/llama.cpp/convert_hf_to_gguf.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(root)], check=True, capture_output=True)  # fmt: skip
        with tarfile.open(root / f"llama_cpp_python-{ver}.tar.gz") as tf:
            tf.extractall(root, filter="data")
    return d / "vendor/llama.cpp"


def llama_tool(name: str, root: Path) -> Path:
    """One of llama.cpp's command-line tools (e.g. llama-imatrix, which llama-cpp-python does not
    ship), built with cmake from the same llama.cpp source the installed package was built from;
    kept under `root` (about 8 minutes on 2 cores the first time)."""
    src = llama_source(root)
    build = root / "build"
    exe = build / "bin" / name
    if not exe.exists():
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                       check=True, capture_output=True)  # fmt: skip
        subprocess.run(["cmake", "--build", str(build), "--target", name, "-j"], check=True, capture_output=True)
    return exe
