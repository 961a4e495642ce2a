"""llama.cpp (the llama-cpp-python package) as a peer: quantize a GGUF with its own quantizer,
evaluate a GGUF and return its logits for every position, tokenize with its vocabulary, and
build its command-line tools from the same source. Shared by tests and bench/.

Two rules hold for every use:
- llama.cpp runs in a child process (`in_child`): a native abort inside llama.cpp (a
  GGML_ASSERT, SIGSEGV, SIGILL) is then one failed test that carries llama.cpp's last stderr
  lines, not a dead test session.
- llama.cpp's extra CPU buffer types are off (`SETTING`): on AMX CPUs the vendored llama.cpp of
  llama-cpp-python 0.3.36 puts quantized weights into its AMX buffer and then aborts in
  `ggml_backend_sched_split_graph` (GGML_ASSERT(*cur_backend_id != -1)) on every quantized
  deepseek2 GGUF. The library gets `use_extra_bufts = False` in its model params; the tools get
  the no-repack switch their `--help` names (`no_repack_args`). This also turns off the x86
  repacked Q4_0 / Q4_K / IQ4_NL layouts on CPUs without AMX.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"  # the version the project was checked with (pyproject pins it)
SETTING = "llama.cpp extra buffer types off (library: use_extra_bufts=False; tools: --no-repack / --repack 0)"

FTYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2,
          "Q4_1": 3, "IQ4_NL": 25, "IQ4_XS": 30, "IQ2_XXS": 19, "IQ2_XS": 20,
          "IQ2_S": 29, "IQ3_XXS": 23, "IQ3_S": 26, "IQ1_S": 24, "IQ1_M": 31,
          "q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q8_0": 7, "q4_0": 2, "iq4_nl": 25,
          "iq4_xs": 30, "iq2_xxs": 19, "iq2_xs": 20, "iq2_s": 28, "iq2_m": 29, "iq3_xxs": 23, "iq3_xs": 22,
          "iq3_s": 26, "iq3_m": 27, "iq1_s": 24, "iq1_m": 31}  # fmt: skip


class LlamaCppCrashed(AssertionError):
    """llama.cpp's child process died (abort, signal or non-zero exit); the message carries its stderr tail."""


# ---------------------------------------------------------------------------- the child process
def in_child(func: str, *args, timeout: float = 1800, **kwargs):
    """Run `func(*args, **kwargs)` of this module in a fresh Python process and return its result.

    Arguments and result travel pickled (through stdin and a temporary file, since llama.cpp
    writes to stdout and stderr). A child that dies raises LlamaCppCrashed naming how it died
    and the last 25 lines of its stderr."""
    with tempfile.TemporaryDirectory(prefix="k2quant-llamacpp-") as d:
        result = Path(d) / "result.pkl"
        r = subprocess.run([sys.executable, __file__, str(result)], input=pickle.dumps((func, args, kwargs)),
                           capture_output=True, timeout=timeout)  # fmt: skip
        if r.returncode != 0 or not result.exists():
            if r.returncode < 0:
                how = f"killed by {signal.Signals(-r.returncode).name}"
            else:
                how = f"exit status {r.returncode}"
            tail = "\n".join(r.stderr.decode("utf-8", "replace").splitlines()[-25:])
            raise LlamaCppCrashed(f"llama.cpp child process for {func}() died ({how}); {SETTING}; "
                                  f"last stderr lines:\n{tail}")  # fmt: skip
        return pickle.loads(result.read_bytes())


def _child_main(result_path: str) -> None:
    func, args, kwargs = pickle.loads(sys.stdin.buffer.read())
    _turn_off_extra_buffer_types()
    out = globals()[func](*args, **kwargs)
    Path(result_path).write_bytes(pickle.dumps(out))


def _turn_off_extra_buffer_types() -> None:
    """Every llama_model_params llama-cpp-python makes from here on has use_extra_bufts = False
    (`Llama` reads the defaults through this module attribute and does not expose the field)."""
    import llama_cpp.llama_cpp as lc

    real = lc.llama_model_default_params
    if getattr(real, "_k2quant_no_extra_bufts", False):
        return

    def params():
        p = real()
        p.use_extra_bufts = False
        return p

    params._k2quant_no_extra_bufts = True
    lc.llama_model_default_params = params


# ---------------------------------------------------------------------------- what the child runs
def _quantize(src: str, dst: str, ftype: str, pure: bool, nthread: int, imatrix: dict[str, np.ndarray] | None) -> int:
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
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))


def _quantize_many(jobs: list[tuple]) -> list[int]:
    return [_quantize(*job) for job in jobs]


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return lib


def quantize_chunk_here(type_id: int, row_bytes: int, x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk in this process (one thread): for timing it; tests use ggml_quantize_chunk."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], row_bytes), dtype=np.uint8)
    imp = None if imp is None else np.ascontiguousarray(imp, dtype=np.float32)
    _ggml_base().ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                     None if imp is None else imp.ctypes.data)  # fmt: skip
    return out


def _logits(path: str, tokens: list[int], n_ctx: int, beta_fast: float, beta_slow: float) -> tuple[np.ndarray, str]:
    from llama_cpp import Llama

    with _captured_stderr() as log:
        llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=True,
                    n_threads=2, yarn_beta_fast=beta_fast, yarn_beta_slow=beta_slow, seed=0)  # fmt: skip
        llm.eval(tokens)
        out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
        llm.close()
    return out, log.read()


def _tokenize(path: str, texts: list[str]) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]


def _chat_apply_template(template: str, messages: list[tuple[str, str]], add_assistant: bool) -> str | None:
    """llama_chat_apply_template: llama.cpp's built-in (non-Jinja) chat formatter, the one it picks by
    recognizing `template`'s text; None when it recognizes no template it knows."""
    import llama_cpp

    msgs = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, (role, content) in enumerate(messages):
        keep += [role.encode(), content.encode()]
        msgs[i].role, msgs[i].content = keep[-2], keep[-1]
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template.encode(), msgs, len(messages), add_assistant, buf, size)
        if n < 0:
            return None
        if n <= size:
            return buf.raw[:n].decode("utf-8")
        size = n


def _extra_bufts_default() -> bool:
    """What llama-cpp-python's model params say about extra buffer types here (False in a child)."""
    import llama_cpp.llama_cpp as lc

    return bool(lc.llama_model_default_params().use_extra_bufts)


def _abort(message: str) -> None:
    """For the isolation test: say something on stderr, then die as a GGML_ASSERT does."""
    os.write(2, message.encode() + b"\n")
    os.abort()


class _captured_stderr:
    """Redirect file descriptor 2 (where llama.cpp logs) to a temporary file; `.read()` after."""

    def __enter__(self):
        self._file = tempfile.TemporaryFile()
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if exc[0] is not None:  # let the parent see the log of a failure
            self._file.seek(0)
            os.write(2, self._file.read()[-8000:])
        return False

    def read(self) -> str:
        self._file.seek(0)
        return self._file.read().decode("utf-8", "replace")


# ---------------------------------------------------------------------------- the public calls
def llama_quantize(src: Path, dst: Path, ftype: str, *, pure: bool = False, nthread: int = 2,
                   imatrix: dict[str, np.ndarray] | None = None) -> None:  # fmt: skip
    """llama_model_quantize: `imatrix` maps GGUF tensor names to llama-quantize's column weights
    (mean x^2, already divided by the counts; experts' rows concatenated)."""
    rc = in_child("_quantize", str(src), str(dst), ftype, pure, nthread, imatrix)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {src}")


def llama_quantize_many(jobs: list[tuple[Path, Path, str, dict[str, np.ndarray] | None]]) -> None:
    """llama_model_quantize of each (src, dst, ftype, imatrix) in one child process (one start-up)."""
    rcs = in_child("_quantize_many", [(str(s), str(d), f, False, 2, im) for s, d, f, im in jobs])
    bad = [(str(j[1]), rc) for j, rc in zip(jobs, rcs, strict=True) if rc != 0]
    if bad:
        raise RuntimeError(f"llama_model_quantize failed: {bad}")


def ggml_quantize_chunk(type_id: int, row_bytes: int, x: np.ndarray, imp: np.ndarray | None = None) -> np.ndarray:
    """ggml's own encoder (ggml_quantize_chunk of llama-cpp-python's libggml-base, the function
    llama-quantize calls) of the rows of x as GGML type `type_id`, with column importance imp."""
    return in_child("quantize_chunk_here", type_id, row_bytes, x, imp)


def errors_against_llama(ref, theirs, names, importance=None) -> dict[str, tuple[float, float, bool]]:
    """Per GGUF tensor name: (k2quant's error, llama.cpp's error, weighted) against `ref`'s weights, where
    `theirs` is llama_model_quantize's file (both open_checkpoint'ed) and k2quant encodes the same weights
    in the type llama.cpp chose. Squared errors summed, weighted per input column by importance[name]
    (torch (nmat | 1, n_in)) where it has an entry as wide as the rows."""
    import torch

    from k2quant.quant import ggml

    out = {}
    for name in names:
        t = theirs.by_gguf[name].tensor_type.name
        w = ref._decode(name).float()
        mats = w if w.dim() == 3 else w[None]
        lw = theirs._decode(name).float().reshape(mats.shape)
        imp = (importance or {}).get(name)
        if imp is not None and imp.shape[-1] != mats.shape[-1] and imp.shape[-1] % mats.shape[-1] == 0:
            imp = imp.reshape(-1, mats.shape[-1])  # attn_k_b / attn_v_b: one row of heads x cols
        use = imp is not None and imp.shape[-1] == mats.shape[-1]
        ours = llama = 0.0
        for e in range(mats.shape[0]):
            col = imp[e if imp.shape[0] > 1 else 0] if use else None
            mw = col if col is not None else torch.ones(mats.shape[-1])
            q = ggml.dequantize(ggml.quantize(mats[e], t, mw if t in ggml.NEEDS_IMATRIX else col), t, mats.shape[-1])
            ours += ((q - mats[e]) ** 2 * mw).sum().item()
            llama += ((lw[e] - mats[e]) ** 2 * mw).sum().item()
        out[name] = (ours, llama, use)
    return out


def llama_logits(path: Path, tokens: list[int], n_ctx: int, beta_fast: float, beta_slow: float) -> np.ndarray:
    """Logits for every position of `tokens` (one sequence) from llama.cpp's CPU backend.

    llama.cpp's deepseek2 loader does not read rope.scaling.yarn_beta_fast/slow from the file
    (it keeps 32 / 1); K2 configures 1 / 1, so the context is given the config's values. The
    load log is checked: no weight may sit in an extra (AMX / repacked) buffer."""
    logits, log = in_child("_logits", str(path), tokens, n_ctx, beta_fast, beta_slow)
    extra = [line for line in log.splitlines() if "model buffer size" in line and ("AMX" in line or "REPACK" in line)]
    assert not extra, f"llama.cpp used an extra buffer type although {SETTING}: {extra}"
    return logits


def llama_tokenize(path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's tokenization (no BOS, no special-token parsing) of each text with the GGUF's vocabulary."""
    return in_child("_tokenize", str(path), list(texts))


def llama_chat_format(template: str, messages: list[tuple[str, str]], add_assistant: bool = True) -> str | None:
    """The prompt llama.cpp's built-in chat formatter makes of (role, content) `messages` for a model
    whose GGUF carries `template` (it detects the model family from the template's text); None if it
    recognizes none."""
    return in_child("_chat_apply_template", template, [(r, c) for r, c in messages], add_assistant, timeout=120)


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


def llama_tool(name: str, root: Path, cmake_args: tuple[str, ...] = ()) -> Path:
    """One of llama.cpp's command-line tools (e.g. llama-imatrix, which llama-cpp-python does not
    ship), built with cmake from the same llama.cpp source the installed package was built from;
    kept under `root` (about 8 minutes on 2 cores the first time). Run it with `no_repack_args`."""
    src = llama_source(root)
    build = root / "build"
    exe = build / "bin" / name
    if not exe.exists():
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        *cmake_args], check=True, capture_output=True)  # fmt: skip
        subprocess.run(["cmake", "--build", str(build), "--target", name, "-j"], check=True, capture_output=True)
    return exe


def no_repack_args(exe: Path) -> list[str]:
    """The switch that keeps a llama.cpp tool off its extra buffer types, as its `--help` names it:
    `--no-repack` (llama-perplexity, llama-imatrix, llama-cli, llama-server) or `--repack 0` (llama-bench)."""
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    help_text = r.stdout + r.stderr
    if "--no-repack" in help_text:
        return ["--no-repack"]
    if "--repack" in help_text:
        return ["--repack", "0"]
    raise RuntimeError(f"{exe.name} --help names neither --no-repack nor --repack; cannot turn off extra buffers")


def kld_summary(exe: Path, model: Path, bf16: Path, base: Path, text: Path, chunks: int,
                extra: list[str]) -> dict[str, tuple[float, float] | float]:  # fmt: skip
    """llama-perplexity --kl-divergence of `model` against `bf16`'s logits of `text` (saved once in
    `base`), 512-token chunks: {"kld": (mean, uncertainty), "max_kld", "top1": (%, unc), "ppl_ratio":
    (mean, unc)}. `extra`: more arguments (YaRN's, say)."""
    args = [str(exe), *no_repack_args(exe), "-c", "512", "-b", "512", "--chunks", str(chunks), "-t", "2", *extra,
            "--kl-divergence-base", str(base)]  # fmt: skip
    if not base.exists():  # BF16's logits of the text, saved once
        subprocess.run([*args, "-m", str(bf16), "-f", str(text)], check=True, capture_output=True)
    for _ in range(3):  # llama.cpp logs from a thread of its own: the last lines are now and then lost at exit
        out = subprocess.run([*args, "-m", str(model), "--kl-divergence"], check=True, capture_output=True, text=True)
        log = (out.stdout + out.stderr).splitlines()
        lines = {ln.split(":")[0].strip(): ln.split(":", 1)[1] for ln in log if ":" in ln}
        if all(k in lines for k in ("Mean    KLD", "Maximum KLD", "Same top p", "Mean PPL(Q)/PPL(base)")):
            break
    else:
        raise RuntimeError(f"llama-perplexity printed no KLD summary for {model}: " + "\n".join(log[-10:]))

    def pm(key: str) -> tuple[float, float]:
        a, b = lines[key].replace("%", "").split("±")
        return float(a), float(b)

    return {"kld": pm("Mean    KLD"), "max_kld": float(lines["Maximum KLD"]), "top1": pm("Same top p"),
            "ppl_ratio": pm("Mean PPL(Q)/PPL(base)")}  # fmt: skip


if __name__ == "__main__":
    _child_main(sys.argv[1])
