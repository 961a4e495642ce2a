"""`convert --to safetensors`: stream a checkpoint into compressed-tensors safetensors, shard by shard.

Every output tensor (name, scheme, dtype, shape, bytes, file) is planned before anything
is written; the plan's fingerprint guards `--resume`. Output shard i holds what source
shard i held, so shards convert independently (in parallel with --workers) and peak
memory is one tensor group per worker. Each shard is written to a temporary file and
renamed when complete; a journal records finished shards (size and sha256); config.json,
the small files, the index, the summary and, last, the manifest (manifest.py: every
file's size and sha256, hashed while it was written) are written only when every shard is
done, so an interrupted or failed conversion (a full disk included: one DiskFullError
naming the file) never looks complete. Output bytes depend only on the inputs. The output
directory's lifecycle (refusal, journal, resume, workers) is pipeline.py's, shared with GGUF.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from k2quant.formats.hashed import copy_file
from k2quant.formats.hf import write_json
from k2quant.formats.imatrix import importance, read_imatrix
from k2quant.formats.packed import quantization_config
from k2quant.formats.safetensors_file import DTYPE_NAMES, DTYPES, SafetensorsFile, SafetensorsWriter

from .checkpoint import INDEX_FILE, Checkpoint, LogicalTensor, open_checkpoint
from .errors import CheckpointError
from .gptq_stream import GPTQ_MIN_TOKENS, SPOOL, SpoolReader, run_gptq_stream, spooled_fallbacks
from .gptq_stream import module_of as _module
from .manifest import MANIFEST, SUMMARY, FileEntry, hash_file, seal
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
from .quant.int4_kernel import set_threads as set_kernel_threads
from .quant.schemes import Scheme, parse_scheme
from .recipe import LINEAR_COMPONENTS, Recipe, RecipeError

FORMAT_VERSION = 1


@dataclass
class PlannedTensor:
    name: str  # logical name in the source
    component: str
    scheme: str  # resolved scheme of the output ("keep" for unquantized copies)
    action: str  # "copy" (bit-exact) or "quantize"
    outputs: list[tuple[str, str, list[int]]]  # (output tensor name, safetensors dtype, shape)
    source_parts: dict[str, str] = field(default_factory=dict)  # copies: output tensor name -> source part
    params: int = 0
    nbytes: int = 0
    source_bytes: int = 0


@dataclass
class PlannedShard:
    file: str
    tensors: list[PlannedTensor]

    @property
    def source_bytes(self) -> int:
        return sum(t.source_bytes for t in self.tensors)


@dataclass
class Plan:
    source: str
    recipe: dict
    method: str
    shards: list[PlannedShard]
    quantization_config: dict
    imatrix: str | None = None  # path of the importance file (sha256 in imatrix_sha256)
    imatrix_sha256: str | None = None
    hessians: str | None = None  # GPTQ: path of calibrate's hessians.safetensors (sha256 below)
    hessians_sha256: str | None = None
    gptq_fallbacks: list[str] = field(default_factory=list)  # int4 modules quantized by the weighted search instead
    gptq_calibration: dict | None = None  # layer-streamed GPTQ: sha256 of the token windows and the settings
    gptq_stream: dict | None = None  # what the layer-streamed GPTQ did (not part of the fingerprint)

    def pinned(self) -> dict:
        """What the output depends on (the fingerprint's content)."""
        plan = asdict(self)
        plan.pop("imatrix")  # the files' content counts, not where they lie
        plan.pop("hessians")
        plan.pop("gptq_stream")
        if self.gptq_calibration:  # the fallbacks are found during the run, from the calibration that is pinned
            plan.pop("gptq_fallbacks")
        return plan

    def fingerprint(self) -> str:
        return fingerprint_of(self.pinned(), FORMAT_VERSION)

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for s in self.shards for t in s.tensors]


# ---------------------------------------------------------------------------- planning
def _int4(tensors) -> list[PlannedTensor]:
    """The planned tensors that are quantized to INT4 (the ones GPTQ takes)."""
    return [t for t in tensors if t.action == "quantize" and t.scheme.startswith("int4")]


def _source_int4_scheme(lt: LogicalTensor) -> Scheme:
    g = lt.shape[1] // lt.parts["weight_scale"].shape[1]
    return parse_scheme(f"int4-g{g}" + ("-asym" if "weight_zero_point" in lt.parts else ""))


def _resolve(name: str, lt: LogicalTensor, scheme: Scheme) -> tuple[Scheme, str]:
    """(effective scheme, 'copy' | 'quantize'): repack bit-exactly whenever the source is already the target."""
    fp8_source = lt.format in ("fp8_block", "fp8_scaled") and lt.block == (128, 128)
    if scheme.kind == "keep":
        if lt.format == "dense":
            return scheme, "copy"
        if fp8_source:
            return parse_scheme("fp8-block"), "copy"
        if lt.format == "int4_pack":
            return _source_int4_scheme(lt), "copy"
        return parse_scheme("fp8-block"), "quantize"  # per-channel / odd-block FP8: requantize to 128x128
    why = scheme.applies_to(lt.shape)
    if why:
        raise RecipeError(f"tensor '{name}': scheme {scheme.name} does not apply: {why}")
    if scheme.kind == "int4" and lt.format == "int4_pack":
        src = _source_int4_scheme(lt)
        if (src.group_size, src.symmetric) == (scheme.group_size, scheme.symmetric):
            return scheme, "copy"
    if scheme.kind == "fp8" and fp8_source:
        return scheme, "copy"
    if scheme.kind == "bf16" and lt.format == "dense" and next(iter(lt.parts.values())).dtype == torch.bfloat16:
        return scheme, "copy"
    return scheme, "quantize"


def plan_conversion(ck: Checkpoint, recipe: Recipe, method: str = "mse") -> Plan:
    n = len(ck.shards)
    shards = [PlannedShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", []) for i in range(n)]
    schemes: dict[str, Scheme] = {}
    assignment: dict[str, str] = {}
    linears: list[str] = []
    for name in ck.names():
        if name in ck.extra:
            continue  # not part of the model (e.g. rotary inv_freq, MTP layers)
        lt = ck.info(name)
        ni = parse_name(name)
        scheme, action = _resolve(name, lt, recipe.scheme_for(name))
        mod = _module(name)
        pt = PlannedTensor(name, ni.component, scheme.name, action, [], params=lt.numel, source_bytes=lt.stored_bytes)
        if scheme.kind in ("int4", "fp8"):
            if action == "copy":
                for suffix in sorted(lt.parts, key=_part_order):
                    # DeepSeek's weight_scale_inv is compressed-tensors' weight_scale: same numbers, new name
                    out_name = f"{mod}.{'weight_scale' if suffix == 'weight_scale_inv' else suffix}"
                    info = lt.parts[suffix]
                    pt.outputs.append((out_name, DTYPE_NAMES[info.dtype], list(info.shape)))
                    pt.source_parts[out_name] = suffix
            else:
                for suffix, dtype, shape in scheme.layout(lt.shape):
                    pt.outputs.append((f"{mod}.{suffix}", DTYPE_NAMES[dtype], list(shape)))
        else:
            dtype = torch.bfloat16  # bf16 from any stored form (an FP8 or INT4 weight is decoded first)
            if action == "copy":
                (suffix, info), = lt.parts.items()  # fmt: skip
                dtype = info.dtype
                pt.source_parts[name] = suffix
            pt.outputs.append((name, DTYPE_NAMES[dtype], list(lt.shape)))
        pt.nbytes = sum(_nbytes(d, s) for _, d, s in pt.outputs)
        schemes[scheme.name] = scheme
        if ni.component in LINEAR_COMPONENTS:
            linears.append(mod)
            assignment[mod] = scheme.name
        shards[lt.shard].tensors.append(pt)
    shards = [s for s in shards if s.tensors]
    for i, s in enumerate(shards):
        s.file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    qc = quantization_config(schemes, assignment, linears) if any(s.ct_format for s in schemes.values()) else {}
    return Plan(str(ck.path), recipe.describe(), method, shards, qc)


_ORDER = ("weight", "weight_packed", "weight_scale", "weight_scale_inv", "weight_zero_point", "weight_shape")


def _part_order(suffix: str) -> int:
    return _ORDER.index(suffix) if suffix in _ORDER else len(_ORDER)


def _nbytes(dtype: str, shape: list[int]) -> int:
    return DTYPES[dtype].itemsize * math.prod(shape)


# ---------------------------------------------------------------------------- execution
def convert_shard(
    src: str, out: str, shard: dict, method: str, progress_q=None, threads: int | None = None,
    imatrix: str | None = None, hessians: str | None = None, fallbacks: tuple[str, ...] = (),
    spool: str | None = None,
) -> dict:  # fmt: skip
    """Write one planned output shard. Runs in the main process or a worker (arguments are plain data)."""
    if threads:
        torch.set_num_threads(threads)
        set_kernel_threads(threads)
    ck = open_checkpoint(src)
    tensors = [PlannedTensor(**t) for t in shard["tensors"]]
    imp = {}
    if imatrix:
        wanted = {_module(t.name) for t in tensors if t.action == "quantize"}
        imp = importance(*read_imatrix(imatrix, wanted))
    gptq = None
    if hessians:
        gptq = _HessianGPTQ(hessians, set(fallbacks), method.endswith("act-order"))
    elif spool:
        gptq = SpoolReader(spool)
    entries = [(o[0], DTYPES[o[1]], tuple(o[2])) for t in tensors for o in t.outputs]
    writer = SafetensorsWriter(Path(out) / shard["file"], entries)
    t0 = time.time()
    pending: Future | None = None  # the previous tensor's write, overlapping this one's encoding
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="k2quant-shard") as ex:
            for t in tensors:
                for name, tensor in _produce(ck, t, method, imp.get(_module(t.name)), gptq):
                    if pending is not None:
                        pending.result()
                    pending = ex.submit(writer.write, name, tensor)
                if progress_q is not None:
                    progress_q.put(t.source_bytes)
            if pending is not None:
                pending.result()
        writer.close()
    except BaseException:
        if pending is not None:  # let a write in flight end before the file goes
            wait([pending])
        writer.abort()
        raise
    return {"file": shard["file"], "bytes": writer.size, "sha256": writer.sha256, "seconds": time.time() - t0}


def _produce(ck: Checkpoint, t: PlannedTensor, method: str, imp: torch.Tensor | None = None, gptq=None):
    """(output name, tensor) pairs for one planned tensor, in planned order."""
    if t.action == "copy":
        stored = ck.stored(t.name)
        for out_name, _, _ in t.outputs:
            yield out_name, stored.parts[t.source_parts[out_name]]
        return
    scheme = parse_scheme(t.scheme)
    mod = _module(t.name)
    parts = gptq.parts(mod) if isinstance(gptq, SpoolReader) and scheme.kind == "int4" else None
    if parts is None:  # not spooled by the layer-streamed GPTQ: quantize here
        if scheme.kind in ("bf16", "keep"):
            yield t.name, ck.tensor(t.name).to(torch.bfloat16)
            return
        if isinstance(gptq, _HessianGPTQ) and mod not in gptq.fallbacks and scheme.kind == "int4":
            parts = gptq.quantize(scheme, ck.tensor(t.name), mod)
        elif scheme.kind == "int4":  # the fused kernel reads the stored form; importance weights its search
            parts = scheme.quantize(ck.stored(t.name), importance=imp, search=method != "rtn")
        else:
            parts = scheme.quantize(ck.tensor(t.name))
    for out_name, _, _ in t.outputs:
        yield out_name, parts[out_name[len(mod) + 1 :]]


class _HessianGPTQ:
    """GPTQ from calibrate's stored Hessians (computed here, in the shard's process). The file is read
    through k2quant's validating reader and each Hessian is checked before use (a finite float32 or
    float64 square matrix as wide as the module's input, that GPTQ can factor): anything else is
    refused with the file and tensor named."""

    def __init__(self, path: str, fallbacks: set[str], act_order: bool):
        self.path, self.file = str(path), SafetensorsFile(path)
        self.keys, self.fallbacks, self.act_order = set(self.file.keys()), fallbacks, act_order

    def hessian(self, module: str, cols: int) -> torch.Tensor:
        name = module + ".hessian"
        if name not in self.keys:
            raise CheckpointError("no Hessian for this module", file=self.path, tensor=name)
        h = self.file.load(name)
        if h.dtype not in (torch.float32, torch.float64) or tuple(h.shape) != (cols, cols):
            found = f"{DTYPE_NAMES.get(h.dtype, h.dtype)} {list(h.shape)}"
            raise CheckpointError(f"expected a float32 or float64 [{cols}, {cols}] Hessian (the module's input "
                                  f"width), found {found}", file=self.path, tensor=name)  # fmt: skip
        if not torch.isfinite(h).all():
            raise CheckpointError("the Hessian holds NaN or infinite values", file=self.path, tensor=name)
        return h

    def quantize(self, scheme: Scheme, w: torch.Tensor, module: str) -> dict[str, torch.Tensor]:
        h = self.hessian(module, w.shape[-1])
        try:
            return scheme.quantize(w, hessian=h, act_order=self.act_order)
        except ValueError as e:  # e.g. not positive definite after damping: the Hessian is not one
            raise CheckpointError(str(e), file=self.path, tensor=module + ".hessian") from None


def _plan_gptq(plan: Plan, hessians: Path) -> None:
    """Pin the Hessians file and decide, before any work, which INT4 modules fall back."""
    have = {k.removesuffix(".hessian") for k in SafetensorsFile(hessians).keys()}
    modules = [_module(t.name) for t in _int4(plan.tensors)]
    counts = read_imatrix(plan.imatrix, set(modules))[1] if plan.imatrix else {}
    plan.hessians = str(hessians.resolve())
    plan.hessians_sha256 = hash_file(hessians)
    thin = {m for m in modules if counts.get(m, GPTQ_MIN_TOKENS) < GPTQ_MIN_TOKENS}
    plan.gptq_fallbacks = sorted(m for m in modules if m not in have or m in thin)


def convert(
    src: str | Path,
    out: str | Path,
    recipe: Recipe,
    *,
    method: str = "mse",
    workers: int = 1,
    resume: bool = False,
    transformers_config: bool = False,
    progress: bool = True,
    imatrix: str | Path | None = None,
    hessians: str | Path | None = None,
    calib_data: list[str | Path] | None = None,
    calib_tokens: int = 65536,
    calib_ctx: int = 512,
    min_expert_tokens: int = 0,
    propagate: bool = False,
) -> dict:
    """Convert a checkpoint to compressed-tensors safetensors in `out`; returns the summary.

    `imatrix`: an importance file (k2quant calibrate's or llama.cpp's imatrix GGUF) that
    weights the INT4 clipping search per input channel. method "gptq" / "gptq-act-order":
    INT4 by GPTQ from `hessians` (calibrate --hessian) or, without them, layer-streamed
    over `calib_data` (default: the bundled set; calib_tokens in windows of calib_ctx, see
    gptq_stream.py; `propagate`: each layer calibrated on the quantized layers' outputs);
    modules without a Hessian or with fewer than GPTQ_MIN_TOKENS
    calibration rows fall back to the weighted search (listed in the summary)."""
    if method not in ("mse", "rtn", "gptq", "gptq-act-order"):
        raise ConvertError(f"unknown method {method!r} (mse, rtn, gptq or gptq-act-order)")
    if imatrix is not None and method == "rtn":
        raise ConvertError("--imatrix weights the clipping search: use --method mse (or gptq)")
    if method.startswith("gptq") and hessians is not None and not Path(hessians).is_file():
        raise ConvertError(f"{hessians}: not found; make it with `k2quant calibrate --hessian`, or leave out --calib "
                           "to calibrate layer by layer during the conversion")  # fmt: skip
    if propagate and not (method.startswith("gptq") and hessians is None):
        raise ConvertError("--propagate applies to the layer-streamed GPTQ (--method gptq without --calib)")
    t0 = time.time()
    src, out = Path(src), Path(out)
    ck = open_checkpoint(src)
    plan = plan_conversion(ck, recipe, method)
    pin_imatrix(plan, imatrix)
    streamed = method.startswith("gptq") and hessians is None
    if streamed:
        from .calibrate import calibration_sequences

        seqs, _ = calibration_sequences(src, calib_data, calib_tokens, calib_ctx)
        plan.gptq_calibration = {"tokens_sha256": hashlib.sha256(seqs.numpy().tobytes()).hexdigest(),
                                 "sequences": seqs.shape[0], "ctx": seqs.shape[1],
                                 "min_expert_tokens": min_expert_tokens, "propagate": propagate}  # fmt: skip
    elif method.startswith("gptq"):
        _plan_gptq(plan, Path(hessians))
    pinned = plan.pinned()
    fp, settings = fingerprint_of(pinned, FORMAT_VERSION), settings_of(pinned)
    done = prepare_out(out, fp, resume, settings)
    todo = [s for s in plan.shards if s.file not in done]
    spool = None
    if streamed:
        spool = out / SPOOL
        int4 = [t for t in _int4(t for s in todo for t in s.tensors) if t.name.startswith("model.layers.")]
        plan.gptq_stream = run_gptq_stream(ck, int4, spool, fp, seqs, min_expert_tokens, method.endswith("act-order"),
                                           propagate, progress=progress)  # fmt: skip
    total = sum(s.source_bytes for s in plan.shards)
    bar = tqdm(total=total, initial=total - sum(s.source_bytes for s in todo), unit="B", unit_scale=True,
               unit_divisor=1024, desc="converting", disable=not progress, smoothing=0.1)  # fmt: skip
    if workers <= 1:
        q = _BarQueue(bar)
        for s in todo:
            r = convert_shard(str(src), str(out), asdict(s), method, q, imatrix=plan.imatrix, hessians=plan.hessians,
                              fallbacks=tuple(plan.gptq_fallbacks), spool=spool and str(spool))  # fmt: skip
            done[r["file"]] = FileEntry(r["file"], r["bytes"], r["sha256"])
            record(out, fp, done, settings)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with get_context("spawn").Manager() as manager, worker_pool(workers) as pool:
            q = manager.Queue()
            futures = [
                pool.submit(
                    convert_shard,
                    str(src),
                    str(out),
                    asdict(s),
                    method,
                    q,
                    threads,
                    plan.imatrix,
                    plan.hessians,
                    tuple(plan.gptq_fallbacks),
                    spool and str(spool),
                )
                for s in todo
            ]
            pending = set(futures)
            while pending:
                try:
                    bar.update(q.get(timeout=0.2))
                except queue.Empty:
                    pass
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    r = f.result()  # re-raises a worker's error
                    done[r["file"]] = FileEntry(r["file"], r["bytes"], r["sha256"])
                    record(out, fp, done, settings)
            while not q.empty():
                bar.update(q.get())
    bar.close()
    if spool is not None:
        outside = [_module(t.name) for t in _int4(plan.tensors) if not t.name.startswith("model.layers.")]
        plan.gptq_fallbacks = spooled_fallbacks(spool) + sorted(outside)  # lm_head etc.: never calibrated
    summary = _finish(ck, plan, out, transformers_config, time.time() - t0, done)
    if spool is not None:
        shutil.rmtree(spool)
    return summary


class _BarQueue:
    def __init__(self, bar):
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def _finish(ck: Checkpoint, plan: Plan, out: Path, transformers_config: bool, seconds: float,
            done: dict[str, FileEntry]) -> dict:  # fmt: skip
    """config.json and the small files, the index, then (manifest.seal) the summary and the manifest last."""
    cfg = dict(ck.config.raw)
    if plan.quantization_config:
        cfg["quantization_config"] = plan.quantization_config
    else:
        cfg.pop("quantization_config", None)
    if transformers_config:
        # transformers reads model_type kimi_k2 only with remote code; K2's deploy guide sets deepseek_v3
        cfg["model_type"] = "deepseek_v3"
        cfg.pop("auto_map", None)
    written = [write_json(out / "config.json", cfg)]
    ours = ("config.json", INDEX_FILE, SUMMARY, MANIFEST)  # written here, never copied from the source
    for p in sorted(ck.path.iterdir()):
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ours and not p.name.startswith(".") \
                and p.stat().st_size < 256 * 2**20:  # fmt: skip
            written.append(copy_file(p, out / p.name))
    weight_map = {o[0]: s.file for s in plan.shards for t in s.tensors for o in t.outputs}
    summary = _summary(plan, out, seconds)
    index = {"metadata": {"total_size": summary["bytes"]}, "weight_map": weight_map}
    written.append(write_json(out / INDEX_FILE, index))
    seal(out, [done[s.file] for s in plan.shards] + [FileEntry.of(w, out) for w in written], summary)
    return summary


def _summary(plan: Plan, out: Path, seconds: float) -> dict:
    totals = size_totals([(t.component, t.scheme, t.params, t.nbytes, t.source_bytes) for t in plan.tensors], seconds)
    return {
        "source": plan.source,
        "output": str(out),
        "recipe": plan.recipe,
        "method": plan.method,
        "imatrix": plan.imatrix,
        "hessians": plan.hessians,
        "gptq_fallbacks": plan.gptq_fallbacks,
        "gptq_calibration": plan.gptq_calibration,
        "gptq_stream": plan.gptq_stream,
        "fingerprint": plan.fingerprint()[:16],
        "shards": len(plan.shards),
        "copied_bit_exact": sum(1 for t in plan.tensors if t.action == "copy"),
        "quantized": sum(1 for t in plan.tensors if t.action == "quantize"),
        **totals,
    }


def format_summary(s: dict) -> str:
    lines = [
        f"wrote {s['output']}: {s['bytes'] / 1e9:.3f} GB in {s['shards']} shard(s), "
        f"{s['bits_per_weight']:.2f} bits/weight (source {s['source_bytes'] / 1e9:.3f} GB)",
        f"  {s['quantized']} tensors quantized, {s['copied_bit_exact']} copied bit-exactly; "
        f"{s['seconds']:.1f} s, {s['source_gb_per_s']:.3f} GB/s of source",
        f"  {'component':<16}{'params':>12}{'bpw':>8}  schemes",
    ]
    for name, c in s["components"].items():
        schemes = ", ".join(f"{k}" for k in c["schemes"])
        lines.append(f"  {name:<16}{c['params']:>12,}{c['bits_per_weight']:>8.2f}  {schemes}")
    if s.get("hessians") or s.get("gptq_calibration"):
        fb, c = s["gptq_fallbacks"], s.get("gptq_calibration")
        source = s["hessians"] or f"layer-streamed calibration ({c['sequences']} x {c['ctx']} tokens)"
        lines.append(f"  GPTQ from {source}; {len(fb)} module(s) fell back to the weighted search"
                     + (f" (too few calibration tokens or no Hessian), e.g. {fb[0]}" if fb else ""))  # fmt: skip
        g = s.get("gptq_stream")
        if g and g.get("gptq_modules") is not None:
            lines.append(f"  streamed GPTQ: {g['gptq_modules']} modules in {g['layers_quantized']} layer(s), "
                         f"{g['layers_reused']} reused; at most {g['peak_hessian_bytes'] / 2**20:.1f} MiB of "
                         f"Hessians held, {g['seconds']:.1f} s")  # fmt: skip
    return "\n".join(lines)
