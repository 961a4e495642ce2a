"""`convert --to gguf`: a K2 checkpoint (FP8 release, BF16, INT4) to a llama.cpp GGUF in one pass.

The whole file set is planned first (every tensor's GGML type, shape, bytes and file),
so headers are written before any data and a split set is keyed like gguf-split from
the start. Tensors are produced one at a time, and a stacked expert tensor one expert at
a time, so peak memory is one expert's (or one dense tensor's) float copy. Each output
file is written to a temporary name and renamed when complete; a journal records
finished files (size and sha256) for --resume; the summary and, last, the manifest
(manifest.py) follow. Every byte of a file (header, metadata, tensor infos, padding,
data) goes through a HashingFile (formats/hashed.py), so its sha256 is known when it is
closed, and a full disk stops the run with one DiskFullError naming the file. Output
bytes depend only on the inputs and settings.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from k2quant.formats.gguf import GGUFFileWriter, add_metadata, add_tokenizer, split_kv_b, tensor_map
from k2quant.formats.hashed import HashingFile
from k2quant.formats.imatrix import read_imatrix_gguf

from .checkpoint import Checkpoint, open_checkpoint
from .manifest import FileEntry, seal
from .names import parse_name
from .pipeline import (
    ConvertError,
    fingerprint_of,
    pin_imatrix,
    prepare_out,
    record,
    settings_of,
    size_totals,
    worker_pool,
)
from .quant import ggml
from .recipe import K2_GGUF_MIXES, LLAMA_FTYPES, Recipe

FORMAT_VERSION = 1


@dataclass
class PlannedGGUF:
    name: str
    type: str
    shape: list[int]
    sources: list[str]
    kind: str
    component: str
    layer: int | None
    nbytes: int
    source_bytes: int

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFPlan:
    source: str
    recipe: dict
    method: str
    stem: str
    files: list[list[PlannedGGUF]]
    file_type: int
    imatrix: str | None = None
    imatrix_sha256: str | None = None

    def file_names(self) -> list[str]:
        n = len(self.files)
        return [f"{self.stem}.gguf"] if n == 1 else [f"{self.stem}-{i + 1:05d}-of-{n:05d}.gguf" for i in range(n)]

    def pinned(self) -> dict:
        """What the output depends on (the fingerprint's content): the imatrix by its sha256, not its path."""
        plan = asdict(self)
        plan.pop("imatrix")
        return plan

    def fingerprint(self) -> str:
        return fingerprint_of(self.pinned(), FORMAT_VERSION)

    @property
    def tensors(self) -> list[PlannedGGUF]:
        return [t for f in self.files for t in f]


def parse_size(text: str | int | None) -> int:
    """'48G', '500M', '2000000' -> bytes (gguf-split's --split-max-size units, powers of 1000)."""
    if text is None or text == 0:
        return 0
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text).upper())
    if not m:
        raise ConvertError(f"--split-max-size {text!r}: expected a size such as 48G or 500M")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


def plan_gguf(ck: Checkpoint, recipe: Recipe, method: str, stem: str, split_max_size: int = 0,
              has_imatrix: bool = False) -> GGUFPlan:  # fmt: skip
    """Each GGUF tensor's type and size and the files they go in; `has_imatrix`: the preset's
    rules as llama-quantize applies them when it is given an importance matrix."""
    cfg = ck.config
    planned = []
    ffn_down = 0
    for gt in tensor_map(cfg):
        for src in gt.sources:
            if src not in ck:
                raise ConvertError(f"{ck.path}: tensor '{src}' (needed for GGUF '{gt.name}') is missing")
        if gt.kind == "f32":
            t = "F32"
        else:
            t = recipe.gguf_type(gt.name, gt.modules, gt.layer, cfg.num_hidden_layers, has_imatrix, ffn_down,
                                 gt.shape[-1])  # fmt: skip
            t = ggml.fit_type(t, gt.shape[-1])
            ffn_down += "ffn_down" in gt.name
        nbytes = math.prod(gt.shape[:-1]) * ggml.TYPES[t].row_bytes(gt.shape[-1])
        src_bytes = sum(ck.info(s).stored_bytes for s in set(gt.sources))
        if gt.kind == "v_b":
            src_bytes = 0  # kv_b is counted once, with attn_k_b
        planned.append(PlannedGGUF(gt.name, t, list(gt.shape), list(gt.sources), gt.kind,
                                   parse_name(gt.sources[0]).component, gt.layer, nbytes, src_bytes))  # fmt: skip
    files: list[list[PlannedGGUF]] = [[]]
    size = 0
    for p in planned:  # gguf-split's rule: a new file when this tensor would pass the limit
        if split_max_size and files[-1] and size + p.nbytes > split_max_size:
            files.append([])
            size = 0
        files[-1].append(p)
        size += p.nbytes
    if recipe.preset in K2_GGUF_MIXES:
        ftype = K2_GGUF_MIXES[recipe.preset][3]
    else:
        ftype = LLAMA_FTYPES[recipe.preset][1]
    return GGUFPlan(str(ck.path), recipe.describe(), method, stem, files, ftype)


# ---------------------------------------------------------------------------- importance
class Importance:
    """Per-column weights for a GGUF tensor (slice e of a stacked or per-head tensor) from an imatrix."""

    def __init__(self, path: str | None, names: set[str]):
        self.data = read_imatrix_gguf(path, names) if path else {}

    def get(self, name: str, index: int = 0, cols: int | None = None) -> torch.Tensor | None:
        """Column weights of matrix `index` of `name` (an expert, or a head of attn_k_b / attn_v_b,
        whose heads llama.cpp stores as one row of heads x cols with one count)."""
        entry = self.data.get(name)
        if entry is None:
            return None
        sums, counts = entry
        if cols and sums.shape[1] != cols and sums.shape[1] % cols == 0:
            sums = sums.reshape(-1, cols)
        if index >= sums.shape[0]:
            index = 0
        n = counts[index] if counts.shape[0] > index else counts[0]
        if n <= 0:  # no token reached it: llama-quantize's load_imatrix gives each column weight 1 (still weighted)
            return torch.ones(sums.shape[1])
        return torch.from_numpy(np.asarray(sums[index], dtype=np.float32) / np.float32(n))


def _check_importance(plan: GGUFPlan, imatrix: str | Path | None) -> None:
    """Types llama-quantize makes only with an importance matrix (IQ2_XXS, ...) need an imatrix
    entry for each tensor planned in them (an expert in it that saw no token gets weight 1, as in
    llama-quantize); refused before anything is written, the tensor named. token_embd and output
    are exempt, as in llama-quantize, where ggml's encoder has no-imatrix weights (not IQ2_XXS / IQ2_XS)."""
    need = [t for t in plan.tensors if t.type in ggml.NEEDS_IMATRIX
            and (t.name not in ggml.IMATRIX_EXEMPT or t.type in ggml.ALWAYS_NEEDS_IMATRIX)]  # fmt: skip
    if not need:
        return
    t = need[0]
    if imatrix is None:
        raise ConvertError(f"tensor '{t.name}' is planned as {t.type}, which llama-quantize (and k2quant) make only "
                           "with an importance matrix: pass --imatrix FILE or --calib DIR (k2quant calibrate writes "
                           "imatrix.gguf), or choose another type for it")  # fmt: skip
    have = read_imatrix_gguf(imatrix, {t.name for t in need})
    for t in need:
        if t.name not in have:
            raise ConvertError(f"{imatrix}: no importance entry for tensor '{t.name}', planned as {t.type}, which "
                               "llama-quantize (and k2quant) make only with an importance matrix")  # fmt: skip


# ---------------------------------------------------------------------------- execution
ROW_CHUNK = 1024  # rows of a dense tensor per task (a multiple of 128: FP8 blocks, packed zero points)


def _tasks(t: PlannedGGUF) -> list[tuple]:
    """The tensor's pieces in file order: one per expert, one per ROW_CHUNK rows, or the whole tensor."""
    if t.kind == "experts":
        return [(t.name, t.kind, src, t.type, e, 0, 0) for e, src in enumerate(t.sources)]
    if t.kind in ("k_b", "v_b", "f32"):
        return [(t.name, t.kind, t.sources[0], t.type, 0, 0, 0)]
    rows = t.shape[0]
    return [(t.name, t.kind, t.sources[0], t.type, 0, r, min(r + ROW_CHUNK, rows)) for r in range(0, rows, ROW_CHUNK)]


_STATE: dict = {}


def _setup(src: str, imatrix: str | None, names: set[str], method: str, threads: int | None = None) -> None:
    """Per process: the opened checkpoint and importance (workers are spawned with plain arguments)."""
    if threads:
        torch.set_num_threads(threads)
    _STATE.update(ck=open_checkpoint(src), imp=Importance(imatrix, names), search=method == "mse")


def _run(task: tuple) -> bytes:
    """One piece's bytes. Rows are independent in every GGML type, so pieces and workers do not change the output."""
    name, kind, src, typ, index, r0, r1 = task
    ck, imp, search = _STATE["ck"], _STATE["imp"], _STATE["search"]
    if kind == "f32":
        return ck.tensor(src, torch.float32).contiguous().numpy().tobytes()
    if kind == "experts":
        w, importance = ck.tensor(src, torch.float32), imp.get(name, index)
    elif kind in ("k_b", "v_b"):  # kv_b once, then each head with its own importance row
        heads = split_kv_b(ck.tensor(src, torch.float32), ck.config, kind)
        return b"".join(_quantize(w, typ, imp.get(name, h, w.shape[1]), search) for h, w in enumerate(heads))
    elif hasattr(ck, "stored"):  # dequantize only these rows from the stored form
        w, importance = ck.stored(src).rows(r0, r1).dequantize(torch.float32), imp.get(name)
    else:  # a GGUF source
        w, importance = ck.tensor(src, torch.float32)[r0:r1], imp.get(name)
    return _quantize(w, typ, importance, search)


def _quantize(w: torch.Tensor, typ: str, importance: torch.Tensor | None, search: bool) -> bytes:
    return ggml.quantize(w, typ, importance, search).numpy().tobytes()


def _write_file(ck: Checkpoint, plan: GGUFPlan, index: int, out: Path, run_map, bar) -> FileEntry:
    """Write output file `index`; `run_map(tasks)` yields each task's bytes in order (in or out of process).
    Returns its name, size and the sha256 of every byte written."""
    names = plan.file_names()
    path = out / names[index]
    tmp = path.with_name(path.name + ".tmp")
    tensors = plan.files[index]
    w = GGUFFileWriter(tmp, model_keys=index == 0)
    if index == 0:
        cfg = ck.config
        add_metadata(w.keys, cfg, plan.stem, plan.file_type)
        add_tokenizer(w.keys, ck.path, cfg.vocab_size)
    if len(plan.files) > 1:
        w.add_split(index, len(plan.files), len(plan.tensors))
    for t in tensors:
        w.add_tensor(t.name, t.shape, t.type, t.nbytes)
    fout = None
    try:
        fout = w.start(lambda: HashingFile(tmp, path))
        per_tensor = [_tasks(t) for t in tensors]
        results = iter(run_map([task for tasks in per_tensor for task in tasks]))
        for t, tasks in zip(tensors, per_tensor, strict=True):
            written = w.tensor(next(results) for _ in tasks)
            if written != t.nbytes:
                raise ConvertError(f"tensor '{t.name}': wrote {written} bytes, planned {t.nbytes}")
            bar.update(t.source_bytes)
        fout.sync()
        w.close()
    except BaseException:
        if fout is not None:
            fout.discard()  # closed without flushing what a full disk would refuse again
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return FileEntry(names[index], fout.size, fout.hexdigest())


def convert_gguf(
    src: str | Path,
    out: str | Path,
    recipe: Recipe,
    *,
    method: str = "mse",
    resume: bool = False,
    progress: bool = True,
    imatrix: str | Path | None = None,
    split_max_size: int | str | None = None,
    name: str | None = None,
    workers: int = 1,
    extra_files: dict[str, str] | None = None,
    extra_summary: dict | None = None,
) -> dict:
    """Convert a checkpoint to GGUF file(s) in `out`; returns the summary.

    method "mse": both of llama.cpp's scale searches plus a scale polish, the lower error per
    block; "rtn": llama.cpp's own procedure only (faster). `imatrix` weights the searches.
    workers > 1: pieces (experts, row chunks, small tensors) are encoded in that many spawned
    processes with one thread each; the bytes do not change. The compiled encoders (k-quants,
    i-quants) spread rows over the process's threads, so one process is as fast or faster on
    few cores (bench/convert_gguf.py); workers help the torch-encoded 32-blocks (Q4_0, Q5_0, ...). `extra_files`
    (name -> text, e.g. a mix's recipe.toml) and `extra_summary` go into OUT before the manifest,
    which lists the files."""
    if method not in ("mse", "rtn"):
        raise ConvertError(f"unknown method {method!r} (mse or rtn)")
    t0 = time.time()
    src, out = Path(src), Path(out)
    ck = open_checkpoint(src)
    stem = name or f"{src.name}-{recipe.preset.upper()}"
    plan = plan_gguf(ck, recipe, method, stem, parse_size(split_max_size), imatrix is not None)
    _check_importance(plan, imatrix)
    pin_imatrix(plan, imatrix)
    pinned = plan.pinned()
    fp, settings = fingerprint_of(pinned, FORMAT_VERSION), settings_of(pinned)
    done = prepare_out(out, fp, resume, settings)
    names = plan.file_names()
    tnames = {t.name for t in plan.tensors}
    total = sum(t.source_bytes for t in plan.tensors)
    finished = sum(t.source_bytes for i, f in enumerate(plan.files) if names[i] in done for t in f)
    bar = tqdm(total=total, initial=finished, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
               disable=not progress, smoothing=0.1)  # fmt: skip
    todo = [i for i in range(len(plan.files)) if names[i] not in done]
    if workers <= 1:
        _setup(str(src), plan.imatrix, tnames, method)
        for i in todo:
            done[names[i]] = _write_file(ck, plan, i, out, lambda tasks: map(_run, tasks), bar)
            record(out, fp, done, settings)
    else:
        with worker_pool(workers, _setup, (str(src), plan.imatrix, tnames, method, 1)) as pool:
            for i in todo:
                done[names[i]] = _write_file(ck, plan, i, out, lambda tasks: pool.map(_run, tasks), bar)
                record(out, fp, done, settings)
    _STATE.clear()
    bar.close()
    summary = {**_summary(plan, out, time.time() - t0), **(extra_summary or {})}
    entries = [done[n] for n in names]
    for fname, text in (extra_files or {}).items():
        data = text.encode("utf-8")
        (out / fname).write_bytes(data)
        entries.append(FileEntry(fname, len(data), hashlib.sha256(data).hexdigest()))
    seal(out, entries, summary)
    return summary


def _summary(plan: GGUFPlan, out: Path, seconds: float) -> dict:
    types: dict[str, int] = {}
    for t in plan.tensors:
        types[t.type] = types.get(t.type, 0) + 1
    totals = size_totals([(t.component, t.type, t.params, t.nbytes, t.source_bytes) for t in plan.tensors], seconds)
    return {
        "format": "gguf",
        "source": plan.source,
        "output": str(out),
        "files": plan.file_names(),
        "recipe": plan.recipe,
        "method": plan.method,
        "imatrix": plan.imatrix,
        "fingerprint": plan.fingerprint()[:16],
        "shards": len(plan.files),
        "tensors": len(plan.tensors),
        "types": dict(sorted(types.items())),
        "copied_bit_exact": 0,
        "quantized": len(plan.tensors),
        **totals,
    }
