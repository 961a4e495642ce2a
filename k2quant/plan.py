"""`k2quant plan`: which K2 file fits a machine's RAM and VRAM, and how fast it will decode.

Contract:
- `resolve_model(MODEL)` reads a checkpoint directory (headers only), a `config.json` alone
  (the tensor inventory follows from the config, stored as its `quantization_config` says:
  the FP8 release, K2-Thinking's INT4 experts, or BF16), or a known name (`KNOWN_MODELS`:
  the public configs shipped in k2quant/data/configs/). Nothing else is read.
- `measure_machine(...)` fills in what the caller did not give: RAM and VRAM of this
  machine, the RAM read bandwidth with the runner's method (runner/bandwidth.py), the
  disk's sequential read bandwidth (a temporary file written, dropped from the page
  cache, read back), the VRAM bandwidth on this machine's GPU, or a stated default
  (`DEFAULT_VRAM_BANDWIDTH`) marked "assumed" when there is none. Every figure carries
  where it came from.
- `plan(model, machine, ctx, targets, calib)` is arithmetic on those inputs (it reads nothing but
  the model's headers or config and the calib directory's hotness.json) and returns
  a typed `Plan`: per target ("gguf": llama.cpp, "runner": k2quant's runner) every recipe
  with its file size, RAM and VRAM at run time, predicted decode speed and whether it fits,
  the best-quality one that fits (the largest file), the commands, and, when no GGUF fits,
  running one from a memory-mapped NVMe file.

Where the numbers come from:
- File sizes are the converters' own plans (`convert.plan_conversion`, `convert_gguf.plan_gguf`):
  safetensors to the byte for a checkpoint directory (headers included); GGUF tensor data and
  tensor infos exact, the metadata (mostly the tokenizer) estimated.
- Runner memory is what its kernels hold (runner/kernels.py: INT4 repacked for torch's CPU
  kernel holds 2 bytes of scale+zero per group and row where the file has 2 of scale;
  norms and the router in float32; per-call decoding otherwise), placed by
  `runner.placement.place()`, plus the KV cache, the prefill working set (`attention_work`,
  measured) and the interpreter (`measure_runtime_rss`: a fresh process of this Python with the
  runner imported and its CPU code paths run once on tiny shapes).
- llama.cpp memory is its buffers: the model (mapped file), the KV cache (MLA: K only,
  kv_lora_rank + qk_rope_head_dim values per token and layer, F16) and the compute buffer
  (`llama_compute_buffer`, estimated for flash attention off).
- Decode speed, at an empty context and with the KV cache full at --ctx. GGUF: the bandwidth
  bound, bytes one token reads from each tier over that tier's bandwidth, summed (the GGUF
  tensors' bytes; llama.cpp's kernels are not measured here). Runner: the bytes each of its
  CPU kernels streams per token (`runner_cpu_reads`: int4pack, the bf16 and FP8 matvecs,
  decoded per call) at that kernel's rate measured on this machine (runner/bandwidth.py `kernel_rates`,
  never above the RAM bandwidth), the GPU's share at the VRAM bandwidth; every option also
  carries its bandwidth bound (`bound_tokens_per_s`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .calib.resume import check_finished
from .checkpoint import Checkpoint, LogicalTensor, open_checkpoint
from .config import K2Config
from .convert import Plan as ConvertPlan
from .convert import plan_conversion
from .convert_gguf import GGUFPlan, plan_gguf
from .errors import K2QuantError
from .formats.gguf import ALIGN
from .formats.safetensors_file import DTYPES, TensorInfo
from .memory import meminfo
from .names import expected_shapes, parse_name
from .quant.fp8 import scale_shape
from .quant.ggml import NEEDS_IMATRIX
from .recipe import GGUF_PRESETS, IMATRIX_PRESETS, build_recipe
from .runner.kernels import FP8_CHUNK_BYTES
from .runner.placement import Placement, bytes_per_token, load_hotness, place, reads_per_token, tensor_class
from .runner.runner import GPU_MARGIN, WORK_BYTES_PER_TOKEN

TARGETS = ("gguf", "runner")
DEFAULT_CTX = 32768
PREFILL_CHUNK = 512  # the runner's RunOptions.prefill_chunk and llama.cpp's default n_ubatch
GB = 1e9

# the public configs shipped as package data (k2quant/data/configs/), transcribed from
# /work/shared/reference/k2-checkpoint.md (its sources: MoonshotAI/Kimi-K2's README and a dump of
# moonshotai/Kimi-K2-Instruct/config.json; K2-Thinking's quantization_config from compressed-tensors
# reproductions). Base is taken to equal Instruct; Thinking's 262144 context, YaRN factor 64 and
# eos 163586 are as reported, not read from the file (see README).
KNOWN_MODELS = {  # name: (data file, the release's directory name, its shard count, what is transcribed)
    "kimi-k2-instruct": ("kimi-k2-instruct.json", "Kimi-K2-Instruct", 61, "config.json transcribed"),
    "kimi-k2-base": ("kimi-k2-base.json", "Kimi-K2-Base", 61, "Instruct's config.json, which Base is taken to match"),
    "kimi-k2-thinking": (
        "kimi-k2-thinking.json",
        "Kimi-K2-Thinking",
        62,
        "Instruct's config.json with the reported 262144 context, YaRN factor 64, eos and INT4 quantization_config",
    ),
}

# Kept free: RAM for the OS, page tables and other programs; VRAM as the runner leaves it (driver,
# CUDA context, fragmentation).
RAM_HEADROOM_FRACTION = 0.05
RAM_HEADROOM_MIN = 2 << 30
VRAM_HEADROOM = GPU_MARGIN

DEFAULT_VRAM_BANDWIDTH = 1008e9  # RTX 4090's 1008 GB/s (offloading.md 6.1); assumed when no GPU is here
DISK_TEST_BYTES = 512 << 20

# The runner's process before any weight (python + torch + k2quant's runner imported, its kernels,
# attention and sampling run once on tiny shapes) is measured by `measure_runtime_rss` in a child
# process of this interpreter. It depends on the environment: 250 MB in the development venv, 279 MB
# in a fresh CI one, same machine and torch, before the runner's numba kernels; 375 MB with them (numba,
# llvmlite and the compiled kernels loaded). The kernels' first calls map library code and thread pools
# that a bare import does not (CI once measured the runner 10% above such a plan). RUNNER_RUNTIME is
# what a plan assumes when it is not measured. With CUDA the libraries and context add host memory:
# RUNNER_CUDA_RUNTIME is assumed (no GPU here to measure it).
RUNNER_RUNTIME = 375_000_000
_RUNTIME_SCRIPT = (
    "import sys, k2quant.runner.runner; from k2quant.runner.bandwidth import warm_up; "
    "warm_up(int(sys.argv[1])); from k2quant.memory import peak_rss; print(peak_rss())"
)
RUNNER_CUDA_RUNTIME = 1_500_000_000
LLAMA_RUNTIME = 200_000_000  # llama.cpp's own process, assumed

# The runner's prefill working set: one chunk of T tokens attending over S cached tokens (model.py's
# unabsorbed prefill attention: kv_b expanded over the cache, keys concatenated, torch's SDPA), in bytes.
# Peak RSS of one attention layer alone, fitted by least squares (torch 2.13, CPU, bf16; T 128..512,
# S up to 8704). torch's CPU SDPA runs its fused kernel, which holds no score matrix, when q, k and v
# have one head dimension; model.expanded_sdpa pads K2's narrower v (128 vs 192) with zeros so that it
# always does. Working set: H*S*2*(nope+v+qk) (the bf16 kv_b expansion and keys), H*S*2*qk more for the
# padded copy of v, plus ATTN_FUSED on (T*S, H*T*(qk+v), 1), within 5% (mini-K2, and K2 with v 192).
# On CUDA the same form is assumed (memory-efficient SDPA, no padding; not measured here).
ATTN_FUSED = (2.45, 5.38, 12.4e6)
DEQUANT_BYTES_PER_WEIGHT = 6  # a weight decoded per call: float32 decode, then its bf16 copy (measured)
INT4PACK_GROUPS = (32, 64, 128, 256)  # the runner's torch int4pack kernel (runner/kernels.py)

RUNNER_RECIPES = [  # (preset, convert overrides): the INT4 presets of `k2quant convert`, experts g32 or g128
    ("k2-int4", []),
    ("int4-all", []),
    ("k2-int4", [r"mlp\.experts\.=int4-g128"]),
    ("int4-all", [r"mlp\.experts\.=int4-g128"]),
]
GGUF_PLAN_PRESETS = [p for p in GGUF_PRESETS if p not in ("f32", "f16")]  # f16: bf16's size, less range
SLOWEST_CHOICE = 0.25  # a larger runner file is not chosen when it decodes under 1/4 as fast as the fastest that fits
GGUF_SPLIT = 48_000_000_000  # --split-max-size 48G for files larger than this


class PlanError(K2QuantError):
    pass


# ---------------------------------------------------------------------------- the machine
@dataclass
class Figure:
    """A number and where it came from ("given", "measured: ...", "assumed: ...", "this machine")."""

    value: float
    source: str


@dataclass
class Machine:
    ram: Figure  # bytes
    vram: Figure  # bytes; 0: CPU only
    ram_bandwidth: Figure  # bytes/s
    vram_bandwidth: Figure
    disk_bandwidth: Figure
    amx: bool = False  # this machine's CPU has AMX (llama.cpp needs --no-repack there)
    runtime: Figure = field(default_factory=lambda: Figure(RUNNER_RUNTIME, "assumed"))  # RSS before any weight
    # bytes/s of the runner's CPU kernels by kind (runner/bandwidth.py kernel_rates); empty: not measured,
    # the runner's CPU tier is then predicted at the bandwidth bound
    kernel_rates: dict[str, Figure] = field(default_factory=dict)


def _meminfo_total() -> int:
    total = meminfo("MemTotal")
    return total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (from /proc/mounts), or 'unknown'."""
    best, kind = "", "unknown"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            f = line.split()
            if len(f) > 2 and (real == f[1] or real.startswith(f[1].rstrip("/") + "/")) and len(f[1]) >= len(best):
                best, kind = f[1], f[2]
    except OSError:
        pass
    return kind


def measure_disk_bandwidth(directory: str | Path, size: int = DISK_TEST_BYTES) -> float:
    """Bytes/s of a sequential read of a `size`-byte temporary file in `directory`, written with
    random bytes, flushed and dropped from the page cache first (posix_fadvise DONTNEED)."""
    d = Path(directory)
    fd, name = tempfile.mkstemp(prefix=".k2quant-disk-", dir=d)
    try:
        block = os.urandom(16 << 20)
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # Linux: drop the file's pages, so the read comes from the disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        fd = -1
        t = time.perf_counter()
        with open(name, "rb", buffering=0) as f:
            got = 0
            while chunk := f.read(16 << 20):
                got += len(chunk)
        return got / (time.perf_counter() - t)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(name)


def measure_vram_bandwidth() -> float | None:
    """Bytes/s of a read (sum) of a 1 GiB float32 buffer on this machine's GPU, best of five; None without one."""
    if not torch.cuda.is_available():
        return None
    buf = torch.ones(1 << 28, dtype=torch.float32, device="cuda")
    buf.sum()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    n = buf.nbytes
    del buf
    torch.cuda.empty_cache()
    return n / best


def measure_runtime_rss(threads: int = 2) -> int:
    """Peak RSS in bytes of a fresh process of this Python with the runner imported and its CPU code paths
    run once on tiny shapes (runner/bandwidth.py `warm_up`; no weights yet)."""
    r = subprocess.run([sys.executable, "-c", _RUNTIME_SCRIPT, str(int(threads))], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    if r.returncode != 0:
        raise PlanError(f"measuring the runner's interpreter RSS failed: {r.stderr.strip()[-500:]}")
    return int(r.stdout.split()[-1])


def measure_machine(ram: int | None = None, vram: int | None = None, ram_bandwidth: float | None = None,
                    vram_bandwidth: float | None = None, disk_bandwidth: float | None = None,
                    disk_dir: str | Path | None = None, threads: int | None = None,
                    kernels: bool | None = None) -> Machine:  # fmt: skip
    """A Machine from what is given; the rest is this machine's (measured, or a stated assumption).
    kernels: measure the runner's CPU kernel rates (about 20 s the first time, then cached); by default
    only when the RAM bandwidth is this machine's too (a given bandwidth plans for another machine, whose
    kernels cannot be measured here: its runner is then predicted at the bound)."""
    from .runner.bandwidth import kernel_rates, read_bandwidth

    ram_f = Figure(ram, "given") if ram is not None else Figure(_meminfo_total(), "this machine (MemTotal)")
    if vram is not None:
        vram_f = Figure(vram, "given")
    elif torch.cuda.is_available():
        vram_f = Figure(torch.cuda.mem_get_info()[1], f"this machine ({torch.cuda.get_device_name()})")
    else:
        vram_f = Figure(0, "this machine (no CUDA GPU)")
    if ram_bandwidth is not None:
        rb = Figure(ram_bandwidth, "given")
    else:
        n = threads or os.cpu_count() or 1
        bw, cached = read_bandwidth(n)
        rb = Figure(bw, f"measured on this machine ({n} threads, the runner's method{', cached' if cached else ''})")
    if vram_bandwidth is not None:
        vb = Figure(vram_bandwidth, "given")
    else:
        got = measure_vram_bandwidth()
        vb = Figure(got, "measured on this machine's GPU") if got else \
            Figure(DEFAULT_VRAM_BANDWIDTH, "assumed: an RTX 4090's 1008 GB/s (no GPU here to measure)")  # fmt: skip
    if disk_bandwidth is not None:
        db = Figure(disk_bandwidth, "given")
    else:
        d = Path(disk_dir or ".")
        if not os.access(d, os.W_OK):
            d = Path(tempfile.gettempdir())
        db = Figure(measure_disk_bandwidth(d), f"measured: sequential read in {d.resolve()} ({_fs_type(d)})")
    n = threads or os.cpu_count() or 1
    runtime = Figure(measure_runtime_rss(n), f"measured: a fresh {Path(sys.executable).name} with the runner "
                     f"imported and its kernels run once ({n} threads)")  # fmt: skip
    rates = {}
    if kernels or (kernels is None and ram_bandwidth is None):
        got, cached = kernel_rates(n)
        how = f"measured on this machine ({n} threads, K2 expert shapes{', cached' if cached else ''})"
        rates = {kind: Figure(v, how) for kind, v in got.items()}
    return Machine(ram_f, vram_f, rb, vb, db, has_amx(), runtime, rates)


# ---------------------------------------------------------------------------- the model
@dataclass
class ModelSource:
    """What `plan` plans for: the config, a checkpoint (real, or made from the config), its name."""

    name: str  # for display and output names
    kind: str  # "checkpoint" | "config" | "known"
    config: K2Config
    checkpoint: Checkpoint
    src: str  # the SRC argument for `k2quant convert` in the printed commands
    description: str

    @property
    def directory(self) -> Path | None:
        """Where the model lives on this machine (for the disk measurement); None for a known name."""
        return None if self.kind == "known" else Path(self.src)


def known_config(name: str) -> dict:
    """The shipped config.json of a known model name."""
    fname = KNOWN_MODELS[name][0]
    return json.loads((resources.files("k2quant") / "data" / "configs" / fname).read_text(encoding="utf-8"))


def resolve_model(model: str | Path) -> ModelSource:
    """A checkpoint directory, a config.json (or a directory holding only one), or a known name."""
    p = Path(model)
    if p.exists():
        from .formats.gguf import is_gguf

        if is_gguf(p):
            raise PlanError(f"{p}: a GGUF file; plan takes the source checkpoint (a directory), its config.json, "
                            f"or a known name ({', '.join(KNOWN_MODELS)})")  # fmt: skip
        if p.is_dir() and ((p / "model.safetensors.index.json").exists() or (p / "model.safetensors").exists()):
            ck = open_checkpoint(p)
            return ModelSource(p.name, "checkpoint", ck.config, ck, str(p),
                               f"checkpoint {p} (headers read)")  # fmt: skip
        cfg_file = p / "config.json" if p.is_dir() else p
        if not cfg_file.is_file():
            raise PlanError(f"{p}: no config.json and no safetensors checkpoint here")
        cfg = K2Config.from_file(cfg_file)
        name = cfg_file.parent.name or "model"
        return ModelSource(name, "config", cfg, config_checkpoint(cfg, cfg_file), str(cfg_file.parent),
                           f"config {cfg_file} (tensor inventory from the config)")  # fmt: skip
    key = str(model).lower()
    if key not in KNOWN_MODELS:
        raise PlanError(f"MODEL {model!r}: not a path, and not a known name ({', '.join(KNOWN_MODELS)})")
    fname, dirname, shards, what = KNOWN_MODELS[key]
    cfg = K2Config.from_dict(known_config(key), source=f"k2quant/data/configs/{fname}")
    return ModelSource(dirname, "known", cfg, config_checkpoint(cfg, Path(dirname), shards), dirname,
                       f"known name {key}: moonshotai/{dirname}, {what} (k2quant/data/configs/{fname})")  # fmt: skip


def _ct_weights(cfg: K2Config, module: str) -> dict | None:
    """compressed-tensors: the weights args of the first config group targeting this linear, unless ignored."""
    q = cfg.quantization_config or {}
    if _matches(module, list(q.get("ignore") or [])):
        return None
    for g in (q.get("config_groups") or {}).values():
        targets = list((g or {}).get("targets") or [])
        if "Linear" in targets or _matches(module, targets):
            return (g or {}).get("weights")
    return None


def _matches(module: str, patterns: list[str]) -> bool:
    for pat in patterns:
        if pat.startswith("re:"):
            if re.match(pat[3:], module):
                return True
        elif pat == module or module.endswith("." + pat):
            return True
    return False


def _stored_parts(cfg: K2Config, name: str, shape: tuple[int, ...]) -> tuple[str, list, tuple[int, int] | None]:
    """(stored form, [(suffix, dtype, shape)], block) of one tensor as a release with this config stores it."""
    ni = parse_name(name)
    if name.endswith("e_score_correction_bias"):
        return "dense", [("weight", torch.float32, shape)], None
    bf16 = ("dense", [("weight", torch.bfloat16, shape)], None)
    if not ni.is_linear or name == "lm_head.weight":
        return bf16
    q = cfg.quantization_config or {}
    method = q.get("quant_method")
    if method == "fp8":
        block = tuple(q.get("weight_block_size") or (128, 128))
        return "fp8_block", [("weight", torch.float8_e4m3fn, shape),
                             ("weight_scale_inv", torch.float32, scale_shape(shape, block))], block  # fmt: skip
    if method != "compressed-tensors":
        return bf16
    w = _ct_weights(cfg, name.removesuffix(".weight"))
    if w is None:
        return bf16
    rows, cols = shape
    if w.get("type") == "int" and w.get("num_bits") == 4 and w.get("strategy") in ("group", "channel"):
        g = int(w.get("group_size") or cols) if w.get("strategy") == "group" else cols
        parts = [("weight_packed", torch.int32, (rows, math.ceil(cols / 8))),
                 ("weight_scale", torch.bfloat16, (rows, math.ceil(cols / g)))]  # fmt: skip
        if not w.get("symmetric", True):
            parts.append(("weight_zero_point", torch.int32, (math.ceil(rows / 8), math.ceil(cols / g))))
        return "int4_pack", parts + [("weight_shape", torch.int64, (2,))], None
    if w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") == "block":
        block = tuple(w.get("block_structure") or (128, 128))
        return "fp8_scaled", [("weight", torch.float8_e4m3fn, shape),
                              ("weight_scale", torch.float32, scale_shape(shape, block))], block  # fmt: skip
    raise PlanError(f"config field 'quantization_config.config_groups': weights {w!r} are not a stored form k2quant "
                    "reads (int4 group/channel, fp8 block)")  # fmt: skip


def config_checkpoint(cfg: K2Config, source: Path, shards: int | None = None) -> Checkpoint:
    """The checkpoint a release with this config would be, without data: every tensor `expected_shapes`
    names, stored as the config's quantization_config says, layers spread over `shards` files
    (default one per layer) as the release does: embeddings in the first, norm and lm_head in the last."""
    shapes = expected_shapes(cfg)
    n = max(1, min(shards or cfg.num_hidden_layers, cfg.num_hidden_layers))
    files = [Path(f"{source}#model-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)]
    offsets = [0] * n
    tensors: dict[str, LogicalTensor] = {}
    for name, shape in shapes.items():
        if name.startswith("model.layers."):
            s = int(name.split(".")[2]) * n // cfg.num_hidden_layers
        else:
            s = 0 if name.startswith("model.embed") else n - 1
        fmt, parts, block = _stored_parts(cfg, name, shape)
        infos = {}
        base = name.removesuffix(".weight")
        for suffix, dtype, pshape in parts:
            nbytes = math.prod(pshape) * dtype.itemsize
            pname = name if suffix == "weight" else f"{base}.{suffix}"
            infos[suffix] = TensorInfo(pname, files[s], dtype, tuple(pshape), offsets[s], nbytes)
            offsets[s] += nbytes
        tensors[name] = LogicalTensor(name, fmt, infos, tuple(shape), s, block)
    return Checkpoint(source, cfg, files, tensors)


# ---------------------------------------------------------------------------- file sizes
def safetensors_size(entries: list[tuple[str, str, list[int]]]) -> int:
    """Bytes of the .safetensors file SafetensorsWriter writes for (name, dtype name, shape) entries:
    8, its JSON header (compact separators, padded to 8 bytes), the data."""
    pieces = ['{"__metadata__":{"format":"pt"}']
    offset = 0
    for name, dtype, shape in entries:
        nb = math.prod(shape) * DTYPES[dtype].itemsize
        dims = ",".join(str(d) for d in shape)
        pieces.append(
            f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[{dims}],"data_offsets":[{offset},{offset + nb}]}}'
        )
        offset += nb
    raw = len(",".join(pieces).encode("utf-8")) + 1
    return 8 + raw + (-raw % 8) + offset


def converted_bytes(p: ConvertPlan) -> tuple[int, list[int]]:
    """(tensor bytes, bytes of each output shard) of a safetensors conversion plan."""
    data = sum(t.nbytes for t in p.tensors)
    return data, [safetensors_size([o for t in s.tensors for o in t.outputs]) for s in p.shards]


GGUF_KV_BYTES_PER_TOKEN = 40  # metadata estimate: each token's text, its merge and its type (K2: about 6.5 MB)
GGUF_KV_FIXED = 16 << 10  # architecture keys, chat template


def gguf_sizes(g: GGUFPlan, vocab: int) -> tuple[int, list[int], int]:
    """(tensor data bytes, bytes of each file, estimated header bytes) of a GGUF plan: data and
    tensor infos exact (32-byte aligned, as convert writes them), the key/values estimated."""
    sizes, header_total = [], 0
    for i, tensors in enumerate(g.files):
        info = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
        kv = (GGUF_KV_FIXED + GGUF_KV_BYTES_PER_TOKEN * vocab) if i == 0 else 256
        header = 24 + kv + info
        header += -header % ALIGN
        data = sum(t.nbytes + (-t.nbytes % ALIGN) for t in tensors)
        sizes.append(header + data)
        header_total += header
    return sum(t.nbytes for t in g.tensors), sizes, header_total


# ---------------------------------------------------------------------------- the runner's memory
SMALL = ("norms", "router")  # float32 in the runner, on the compute device


@dataclass
class StoredTensor:
    """One tensor of a converted model: its stored form, and what the runner holds for it."""

    name: str
    cls: str  # runner.placement.tensor_class
    layer: int | None
    expert: int | None
    parts: dict[str, tuple[str, tuple[int, ...]]]  # suffix -> (safetensors dtype, shape)
    shape: tuple[int, ...]
    nbytes: int  # stored bytes (the runner's inventory)

    def part_bytes(self, suffix: str) -> int:
        d, s = self.parts.get(suffix, ("U8", (0,)))
        return DTYPES[d].itemsize * math.prod(s)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def int4pack_cpu(self) -> bool:
        """Whether the runner's torch int4pack CPU kernel takes this weight (runner/kernels.py
        Int4PackCPU.supports; kv_b_proj is read whole by absorbed attention and stays decodable)."""
        if "weight_packed" not in self.parts or "weight_zero_point" in self.parts or len(self.shape) != 2:
            return False
        if self.name.endswith("kv_b_proj.weight"):
            return False
        n, k = self.shape
        groups = self.parts["weight_scale"][1][1]
        return k % groups == 0 and k // groups in INT4PACK_GROUPS and n % 16 == 0 and k % 2 == 0

    @property
    def fp8_cpu(self) -> bool:
        """Whether the runner's FP8 matvec takes this weight on the CPU (runner/kernels.py FP8CPU.supports;
        kv_b_proj too, through absorbed attention's StoredHeads)."""
        d = self.parts.get("weight", ("", ()))[0]
        return d == "F8_E4M3" and len(self.shape) == 2 and len(self.parts) == 2

    @property
    def dense(self) -> bool:
        return len(self.parts) == 1 and "weight" in self.parts

    def held(self, device: str) -> int:
        """Bytes the runner holds for this tensor on `device` ("cpu" | "cuda") in its fast mode."""
        if self.cls in SMALL:
            return self.numel * 4
        if self.dense or self.cls == "embeddings":
            return self.nbytes  # used (or, the embedding table, gathered) as stored
        if device == "cpu" and self.int4pack_cpu:
            n, k = self.shape
            return n * k // 2 + self.parts["weight_scale"][1][1] * n * 4  # nibbles; (scale, zero) bf16 per group
        return self.nbytes - self.part_bytes("weight_shape")  # decoded per call: the parts as stored

    def transient(self, device: str) -> int:
        """The decode transient of a weight the runner decodes per use on `device`, else 0."""
        if self.cls in SMALL or self.dense or (device == "cpu" and self.int4pack_cpu):
            return 0
        if device == "cpu" and self.fp8_cpu:  # prompts: decoded to bf16 a chunk of rows at a time
            return min(FP8_CHUNK_BYTES, 2 * self.numel)
        return DEQUANT_BYTES_PER_WEIGHT * self.numel


def stored_tensors(p: ConvertPlan, ck: Checkpoint) -> list[StoredTensor]:
    """The converted model's tensors (from the plan of converting `ck`), in the order its checkpoint lists them."""
    out = []
    for t in p.tensors:
        base = t.name.removesuffix(".weight")
        parts = {}
        for oname, dtype, shape in t.outputs:
            suffix = "weight" if oname == t.name else oname[len(base) + 1 :]
            parts[suffix] = (dtype, tuple(shape))
        ni = parse_name(t.name)
        out.append(StoredTensor(t.name, tensor_class(t.name), ni.layer, ni.expert, parts,
                                tuple(ck.info(t.name).shape), t.nbytes))  # fmt: skip
    return out


def kv_cache_bytes(cfg: K2Config, ctx: int, bytes_per_value: int = 2) -> int:
    """The MLA KV cache: (kv_lora_rank + qk_rope_head_dim) values per token and layer."""
    return ctx * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value


def attention_work(cfg: K2Config, ctx: int, chunk: int = PREFILL_CHUNK, device: str = "cpu") -> int:
    """The runner's peak working set of one prefill chunk at a full context (see ATTN_FUSED)."""
    t, s, h = min(chunk, ctx), ctx, cfg.num_attention_heads
    qk, v, nope = cfg.qk_head_dim, cfg.v_head_dim, cfg.qk_nope_head_dim
    padded = qk if device == "cpu" and v < qk else 0  # model.expanded_sdpa's zero-padded copy of v
    f = ATTN_FUSED
    return int(h * s * 2 * (nope + v + qk + padded) + f[0] * t * s + f[1] * h * t * (qk + max(v, padded)) + f[2])


@dataclass
class Memory:
    """Bytes of one tier at run time, by part."""

    total: int
    parts: dict[str, int]


def _memory(parts: dict[str, int]) -> Memory:
    parts = {k: int(v) for k, v in parts.items() if v}
    return Memory(sum(parts.values()), parts)


@dataclass
class RunnerEstimate:
    ram: Memory
    vram: Memory
    placement: Placement
    per_token: dict[str, float]  # bytes one decoded token reads per tier ("cpu", "gpu"), empty context
    kv_tier: str  # where the KV cache is read from
    gpu_memory_arg: int | None  # `k2quant run --gpu-memory` that gives the runner this placement
    note: str | None = None


def runner_estimate(tensors: list[StoredTensor], cfg: K2Config, ctx: int, vram: int,
                    hotness: dict[int, list[float]] | None = None, chunk: int = PREFILL_CHUNK,
                    runtime: int = RUNNER_RUNTIME) -> RunnerEstimate:  # fmt: skip
    """RAM, VRAM, placement and bytes per token of the runner on these tensors (fast mode).

    With a GPU the budget `place()` fills is what VRAM leaves after the headroom, the KV cache,
    the prefill working set and the float32 copies of norms and router; routed experts fill
    it hottest first (`hotness`), or, without hotness, as the runner's dynamic placement fills
    it while decoding (which experts does not matter under uniform routing)."""
    inventory = {t.name: t.nbytes for t in tensors}
    kv = kv_cache_bytes(cfg, ctx)
    vocab_work = chunk * cfg.vocab_size * 2 + cfg.vocab_size * 4  # the chunk's bf16 logits, the last row as float32
    note = None
    gpu = vram > 0
    if gpu:
        small_extra = sum(t.held("cuda") - t.nbytes for t in tensors if t.cls in SMALL)
        work_gpu = max(attention_work(cfg, ctx, chunk, "cuda"), vocab_work,
                       max((t.transient("cuda") for t in tensors), default=0))  # fmt: skip
        budget = vram - VRAM_HEADROOM - kv - work_gpu - small_extra
        if budget < 0:
            gpu, note = False, (f"{vram / GB:.1f} GB of VRAM do not hold the KV cache of --ctx {ctx} and the "
                                "prefill working set: planned for the CPU alone")  # fmt: skip
    if not gpu:
        pl = place(inventory, cfg, 0)
        ram = {"weights (held by the runner's kernels)": sum(t.held("cpu") for t in tensors),
               "KV cache": kv,
               "prefill working set": max(attention_work(cfg, ctx, chunk, "cpu"), vocab_work,
                                          max((t.transient("cpu") for t in tensors), default=0)),
               "interpreter and torch": runtime}  # fmt: skip
        return RunnerEstimate(_memory(ram), _memory({}), pl, bytes_per_token(pl, inventory, cfg, hotness), "cpu",
                              None, note)  # fmt: skip
    fill = hotness or {i: [1.0] * cfg.n_routed_experts for i in cfg.moe_layers}
    pl = place(inventory, cfg, budget, fill)
    experts = [t for t in tensors if t.cls == "routed_experts"]
    cpu_dense = [t for t in tensors if t.name not in pl.gpu and t.cls not in ("routed_experts", *SMALL)]
    vram_parts = {
        "dense weights": sum(t.held("cuda") for t in tensors if t.name in pl.gpu and t.cls not in SMALL),
        "norms and router (float32)": sum(t.held("cuda") for t in tensors if t.cls in SMALL),
        "routed experts": sum(t.held("cuda") for t in experts if pl.expert_on_gpu(t.layer, t.expert)),
        "KV cache": kv,
        "prefill working set (assumed)": work_gpu,
    }
    ram_parts = {
        "routed experts (all, held by the CPU kernels)": sum(t.held("cpu") for t in experts),
        "dense weights and embeddings": sum(t.held("cpu") for t in cpu_dense),
        "decode transients": max((t.transient("cpu") for t in cpu_dense), default=0),
        "interpreter, torch and CUDA (CUDA's share assumed)": runtime + RUNNER_CUDA_RUNTIME,
    }
    arg = budget + kv + chunk * WORK_BYTES_PER_TOKEN  # the runner's own budget is gpu_memory - kv - chunk * 64 KiB
    return RunnerEstimate(_memory(ram_parts), _memory(vram_parts), pl, bytes_per_token(pl, inventory, cfg, hotness),
                          "gpu", arg, note)  # fmt: skip


def kernel_kind(t: StoredTensor) -> str:
    """Which of the runner's CPU kernels reads `t` in a decode step (runner/bandwidth.py KERNEL_KINDS), or
    "other" (norms and router in float32, the embedding row: read at memory speed)."""
    if t.cls in SMALL or t.cls == "embeddings":
        return "other"
    if t.dense:
        return "dense"
    if t.fp8_cpu:
        return "fp8"
    return "int4pack" if t.int4pack_cpu else "decode per call"


def runner_cpu_reads(tensors: list[StoredTensor], pl: Placement, cfg: K2Config,
                     frequency: dict[int, list[float]] | None = None) -> dict[str, float]:  # fmt: skip
    """Bytes one decoded token makes each kind of CPU kernel stream: what the kernels hold, times how
    often a token reads the tensor (`runner.placement.reads_per_token`)."""
    reads = reads_per_token(pl, [t.name for t in tensors], cfg, frequency)
    out: dict[str, float] = {}
    for t in tensors:
        tier, times = reads[t.name]
        if tier == "cpu":
            kind = kernel_kind(t)
            out[kind] = out.get(kind, 0.0) + times * t.held("cpu")
    return out


def _runner_seconds(reads: dict[str, float], rates: dict[str, float], bandwidth: float) -> float:
    """CPU seconds per token: each kernel kind's bytes at its measured rate, never above the bandwidth."""
    return sum(b / min(rates.get(kind, bandwidth), bandwidth) for kind, b in reads.items())


# ---------------------------------------------------------------------------- llama.cpp's memory
def llama_kv_bytes(cfg: K2Config, ctx: int) -> int:
    """llama.cpp's deepseek2 MLA cache: K only, kv_lora_rank + qk_rope_head_dim F16 values per token and layer."""
    return kv_cache_bytes(cfg, ctx, 2)


def llama_compute_buffer(cfg: K2Config, ctx: int, ubatch: int = PREFILL_CHUNK) -> int:
    """llama.cpp's compute buffer with flash attention off (llama-cpp-python's default), estimated: the
    f32 attention scores of one ubatch over the whole context (heads x ubatch x ctx), each ubatch
    token's logits (llama.cpp reserves them all) and its absorbed-MLA activations
    (heads x (qk_head_dim + 2 kv_lora_rank + v_head_dim) floats)."""
    h, ub = cfg.num_attention_heads, min(ubatch, ctx)
    per_token = 4 * cfg.vocab_size + 4 * h * (cfg.qk_head_dim + 2 * cfg.kv_lora_rank + cfg.v_head_dim)
    return 4 * h * ub * ctx + ub * per_token


def llama_cpu_compute_buffer(cfg: K2Config, ubatch: int = PREFILL_CHUNK) -> int:
    """The CPU's compute buffer when only the routed experts run there (-ot exps=CPU), estimated:
    gate, up and their product for each token's experts, and the hidden state in and out."""
    return ubatch * (12 * cfg.num_experts_per_tok * cfg.moe_intermediate_size + 8 * cfg.hidden_size)


def gguf_tokens_bytes(g: GGUFPlan, cfg: K2Config) -> dict[str, float]:
    """Bytes one decoded token reads, by what: routed experts (k of each layer's E), the embedding
    row, and everything else (attention, shared experts, dense MLP, norms, router, output)."""
    out = {"experts": 0.0, "embedding": 0.0, "dense": 0.0}
    for t in g.tensors:
        if t.kind == "experts":
            out["experts"] += t.nbytes * cfg.num_experts_per_tok / t.shape[0]
        elif t.name == "token_embd.weight":
            out["embedding"] += t.nbytes / cfg.vocab_size
        else:
            out["dense"] += t.nbytes
    return out


# ---------------------------------------------------------------------------- options and the plan
@dataclass
class Option:
    """One recipe on one target: what it costs and how fast it decodes on the planned machine."""

    target: str  # "gguf" | "runner"
    preset: str
    overrides: list[str]
    label: str
    file_bytes: int  # all weight files
    files: int
    bits_per_weight: float
    size_exact: bool  # to the byte (safetensors from a checkpoint directory); else headers estimated
    ram: Memory
    vram: Memory
    bytes_per_token: dict[str, float]  # tier -> bytes read per decoded token, empty context
    kv_read_at_ctx: float  # KV cache bytes one token reads at a full --ctx
    tokens_per_s: float  # predicted decode, empty context
    tokens_per_s_at_ctx: float
    fits: bool
    short: dict[str, int] = field(default_factory=dict)  # tier -> bytes missing
    placement: dict | None = None
    commands: list[str] = field(default_factory=list)
    mmap: dict | None = None  # the NVMe option: cached share of the experts, bytes per token from disk
    note: str | None = None
    bound_tokens_per_s: float = 0.0  # the bandwidth bound, empty context (for GGUF also the prediction)


@dataclass
class TargetPlan:
    target: str
    title: str
    options: list[Option]  # largest file first
    chosen: Option | None
    fallback: Option | None  # when nothing fits: a GGUF from a memory-mapped NVMe file
    summary: str


@dataclass
class Plan:
    model: dict
    machine: Machine
    ctx: int
    kv_cache_bytes: int
    usable: dict[str, int]  # tier -> bytes a plan may use (after the headroom)
    headroom: dict[str, str]
    targets: list[TargetPlan]
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _tps(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _speed(per_tier: dict[str, float], bw: dict[str, float]) -> float:
    t = sum(b / bw[tier] for tier, b in per_tier.items() if b)
    return 1.0 / t if t > 0 else float("inf")


def _fits(ram: Memory, vram: Memory, usable: dict[str, int]) -> dict[str, int]:
    short = {}
    if ram.total > usable["ram"]:
        short["ram"] = ram.total - usable["ram"]
    if vram.total > usable["vram"]:
        short["vram"] = vram.total - usable["vram"]
    return short


def _gib(n: int) -> str:
    return f"{math.floor(n / 2**30 * 100) / 100:.2f}GiB"


def _q(s: str) -> str:
    return shlex.quote(s)


def _runner_options(src: ModelSource, machine: Machine, ctx: int, usable: dict[str, int], bw: dict[str, float],
                    hotness: dict | None, calib: Path | None) -> list[Option]:  # fmt: skip
    cfg, ck = src.config, src.checkpoint
    rates = {k: f.value for k, f in machine.kernel_rates.items()}
    opts = []
    for preset, overrides in RUNNER_RECIPES:
        cp = plan_conversion(ck, build_recipe(preset, overrides=overrides))
        data, shard_sizes = converted_bytes(cp)
        tensors = stored_tensors(cp, ck)
        est = runner_estimate(tensors, cfg, ctx, int(machine.vram.value), hotness,
                              runtime=int(machine.runtime.value))  # fmt: skip
        kv_read = kv_cache_bytes(cfg, ctx)
        per_token = {"ram" if k == "cpu" else "vram": v for k, v in est.per_token.items()}
        at_ctx = dict(per_token)
        at_ctx["vram" if est.kv_tier == "gpu" else "ram"] += kv_read
        short = _fits(est.ram, est.vram, usable)
        label = preset + (" + experts int4-g128" if overrides else "")
        out = f"{src.name}-{preset}" + ("-g128" if overrides else "")
        conv = ["k2quant", "convert", src.src, out, "--preset", preset] + \
            [a for o in overrides for a in ("--override", o)] + (["--calib", str(calib)] if calib else [])  # fmt: skip
        run = ["k2quant", "run", out, "--ctx", str(ctx)]
        run += ["--gpu-memory", _gib(est.gpu_memory_arg)] if est.gpu_memory_arg else ["--device", "cpu"]
        if calib and (calib / "hotness.json").exists():
            run += ["--hotness", str(calib / "hotness.json")]
        run.append("--chat")
        params = sum(t.params for t in cp.tensors)
        pl = est.placement
        # CPU tier at the measured kernel rates (none measured: at the bandwidth); the GPU tier at its bandwidth
        cpu_s = _runner_seconds(runner_cpu_reads(tensors, pl, cfg, hotness), rates, bw["ram"])
        gpu_s = per_token["vram"] / bw["vram"] if per_token.get("vram") else 0.0
        kv_s = kv_read / bw["vram" if est.kv_tier == "gpu" else "ram"]
        opts.append(Option(
            "runner", preset, list(overrides), label, sum(shard_sizes), len(shard_sizes), 8 * data / params,
            src.kind == "checkpoint", est.ram, est.vram, per_token, kv_read, 1 / (cpu_s + gpu_s),
            1 / (cpu_s + gpu_s + kv_s), not short, short,
            {"gpu_dense_tensors": len(pl.gpu), "gpu_routed_experts": sum(len(v) for v in pl.gpu_experts.values()),
             "routed_experts": cfg.n_routed_experts * len(cfg.moe_layers), "gpu_bytes": pl.gpu_bytes,
             "kv_cache_on": est.kv_tier, "gpu_memory": est.gpu_memory_arg},
            [" ".join(_q(a) for a in conv), " ".join(_q(a) for a in run)], None, est.note,
            _speed(per_token, bw)))  # fmt: skip
    return opts


def _gguf_stem(src: ModelSource, preset: str) -> str:
    return f"{src.name}-{preset.upper()}"


def _gguf_options(src: ModelSource, machine: Machine, ctx: int, usable: dict[str, int], bw: dict[str, float],
                  calib: Path | None) -> tuple[list[Option], dict]:  # fmt: skip
    cfg, ck = src.config, src.checkpoint
    vram = int(machine.vram.value)
    kv = llama_kv_bytes(cfg, math.ceil(ctx / 256) * 256)
    opts, plans = [], {}
    has_imatrix = calib is not None and (calib / "imatrix.gguf").exists()  # convert --calib passes it
    for preset in GGUF_PLAN_PRESETS:
        recipe = build_recipe(preset, target="gguf")
        stem = _gguf_stem(src, preset)
        g = plan_gguf(ck, recipe, "mse", stem, GGUF_SPLIT, has_imatrix)  # one file when below the limit
        if not has_imatrix and any(t.type in NEEDS_IMATRIX for t in g.tensors):
            continue  # convert refuses it without an importance matrix (see the note)
        split = len(g.files) > 1
        data, sizes, _ = gguf_sizes(g, cfg.vocab_size)
        reads = gguf_tokens_bytes(g, cfg)
        experts = sum(t.nbytes for t in g.tensors if t.kind == "experts")
        embd = sum(t.nbytes for t in g.tensors if t.name == "token_embd.weight")
        dense = data - experts - embd
        compute = llama_compute_buffer(cfg, ctx)
        if vram:
            ram = _memory({"routed experts (mapped file)": experts, "token embeddings (mapped file)": embd,
                           "CPU compute buffer (estimated)": llama_cpu_compute_buffer(cfg),
                           "llama.cpp process (assumed)": LLAMA_RUNTIME})  # fmt: skip
            vram_m = _memory({"weights but experts and token_embd": dense, "KV cache (F16)": kv,
                              "compute buffer (estimated)": compute})  # fmt: skip
            per_token = {"ram": reads["experts"] + reads["embedding"], "vram": reads["dense"]}
        else:
            ram = _memory(
                {
                    "model (mapped file)": data,
                    "KV cache (F16)": kv,
                    "compute buffer (estimated)": compute,
                    "llama.cpp process (assumed)": LLAMA_RUNTIME,
                }
            )
            vram_m = _memory({})
            per_token = {"ram": reads["experts"] + reads["embedding"] + reads["dense"]}
        at_ctx = dict(per_token)
        at_ctx["vram" if vram else "ram"] += kv_cache_bytes(cfg, ctx)
        short = _fits(ram, vram_m, usable)
        files = g.file_names()
        out = f"{src.name}-gguf"
        conv = ["k2quant", "convert", src.src, out, "--to", "gguf", "--preset", preset]
        conv += (["--calib", str(calib)] if calib else []) + (["--split-max-size", "48G"] if split else [])
        run = ["llama-cli", "-m", f"{out}/{files[0]}", "-c", str(ctx)]
        run += (["-ngl", "99", "-ot", "exps=CPU"] if vram else []) + ["--yarn-beta-fast", "1"]
        run += ["--no-repack"] if machine.amx else []
        params = sum(t.params for t in g.tensors)
        opts.append(Option("gguf", preset, [], preset, sum(sizes), len(sizes), 8 * data / params, False, ram, vram_m,
                           per_token, kv_cache_bytes(cfg, ctx), _speed(per_token, bw), _speed(at_ctx, bw),
                           not short, short, None,
                           [" ".join(_q(a) for a in conv), " ".join(_q(a) for a in run)],
                           bound_tokens_per_s=_speed(per_token, bw)))  # fmt: skip
        plans[preset] = (experts, embd, dense, reads, ram, vram_m)
    return opts, plans


def _mmap_option(o: Option, parts: tuple, usable: dict[str, int], bw: dict[str, float], cfg: K2Config,
                 ctx: int, vram: int) -> Option:  # fmt: skip
    """Option `o` run from a memory-mapped file on NVMe: the page cache holds what RAM leaves of the
    experts (any subset: routing is taken as uniform), the other expert reads come from the disk."""
    experts, embd, dense, reads, ram, vram_m = parts
    resident = ram.total - experts  # what must stay in RAM besides the experts' pages
    cache = max(0, usable["ram"] - resident)
    share = min(1.0, cache / experts) if experts else 1.0
    per_token = dict(o.bytes_per_token)
    per_token["ram"] -= (1 - share) * reads["experts"]
    per_token["disk"] = (1 - share) * reads["experts"]
    at_ctx = dict(per_token)
    at_ctx["vram" if vram else "ram"] += kv_cache_bytes(cfg, ctx)
    ram_parts = dict(ram.parts)
    key = next(k for k in ram_parts if k.startswith("routed experts") or k.startswith("model"))
    ram_parts[key] = ram_parts[key] - experts + int(cache if cache < experts else experts)
    new_ram = _memory(ram_parts)
    short = _fits(new_ram, vram_m, usable)
    note = (f"{100 * share:.0f}% of the experts' pages cached in RAM, {_size(per_token['disk'])} per token read "
            "from the disk")  # fmt: skip
    return Option(o.target, o.preset, o.overrides, o.label + " (mmap from NVMe)", o.file_bytes, o.files,
                  o.bits_per_weight, o.size_exact, new_ram, vram_m, per_token, o.kv_read_at_ctx,
                  _speed(per_token, bw), _speed(at_ctx, bw), not short, short, None,
                  o.commands, {"cached_share": share, "disk_bytes_per_token": per_token["disk"]}, note,
                  _speed(per_token, bw))  # fmt: skip


def read_calib(calib: str | Path | None, cfg: K2Config) -> tuple[Path | None, dict | None, list[str]]:
    """A calibrate output directory: (its path, hotness per MoE layer, notes)."""
    if calib is None:
        return None, None, []
    d = Path(calib)
    if not d.is_dir():
        raise PlanError(f"--calib {d}: not a directory")
    check_finished(d, PlanError)
    notes = []
    hot = None
    hf = d / "hotness.json"
    if hf.exists():
        hot = load_hotness(hf, PlanError)
        bad = [i for i, f in hot.items() if not cfg.is_moe(i) or i >= cfg.num_hidden_layers
               or len(f) != cfg.n_routed_experts]  # fmt: skip
        if bad:
            raise PlanError(f"{hf}: layer {bad[0]} does not fit the model ({len(cfg.moe_layers)} MoE layers of "
                            f"{cfg.n_routed_experts} experts): calibrated on another model?")  # fmt: skip
        notes.append(f"{hf}: the runner's GPU holds the hottest experts, and bytes per token follow its routing")
    else:
        notes.append(f"--calib {d}: no hotness.json; routing taken as uniform")
    if (d / "imatrix.gguf").exists():
        notes.append(f"{d / 'imatrix.gguf'}: passed to convert (--calib) to weight the quantizers")
    notes.append(f"--calib {d}: k2quant calibrate writes no per-tensor sensitivity yet, so recipes are ranked by "
                 "bits per weight alone")  # fmt: skip
    return d, hot, notes


def plan(model: str | Path | ModelSource, machine: Machine, ctx: int = DEFAULT_CTX,
         targets: tuple[str, ...] = TARGETS, calib: str | Path | None = None) -> Plan:  # fmt: skip
    """Every recipe of each target on this machine, the best one that fits, and the commands."""
    src = model if isinstance(model, ModelSource) else resolve_model(model)
    cfg = src.config
    if ctx < 1:
        raise PlanError(f"--ctx must be >= 1, got {ctx}")
    if ctx > cfg.max_position_embeddings:
        raise PlanError(f"--ctx {ctx} is longer than the model's maximum ({cfg.max_position_embeddings} tokens)")
    for t in targets:
        if t not in TARGETS:
            raise PlanError(f"--target {t!r}: expected one of {', '.join(TARGETS)}")
    calib_dir, hotness, notes = read_calib(calib, cfg)
    if "gguf" in targets and not (calib_dir and (calib_dir / "imatrix.gguf").exists()):
        low = [p for p in GGUF_PLAN_PRESETS if p in IMATRIX_PRESETS]
        notes.append(f"{', '.join(low)} left out: made only with an importance matrix (k2quant calibrate, then "
                     "plan --calib DIR)")  # fmt: skip
    ram, vram = int(machine.ram.value), int(machine.vram.value)
    keep_ram = max(RAM_HEADROOM_MIN, int(RAM_HEADROOM_FRACTION * ram))
    usable = {"ram": ram - keep_ram, "vram": max(0, vram - VRAM_HEADROOM) if vram else 0}
    headroom = {"ram": f"{keep_ram / GB:.1f} GB kept free ({RAM_HEADROOM_FRACTION:.0%} of RAM, at least 2 GiB: "
                       "the OS, page tables, other programs)",
                "vram": f"{VRAM_HEADROOM / GB:.2f} GB kept free (driver, CUDA context, fragmentation)"
                if vram else "CPU only"}  # fmt: skip
    bw = {"ram": machine.ram_bandwidth.value, "vram": machine.vram_bandwidth.value,
          "disk": machine.disk_bandwidth.value}  # fmt: skip
    out = []
    for target in targets:
        if target == "gguf":
            opts, parts = _gguf_options(src, machine, ctx, usable, bw, calib_dir)
            title = ("llama.cpp (GGUF): routed experts in RAM on the CPU, the rest on the GPU (-ngl 99 -ot exps=CPU)"
                     if vram else "llama.cpp (GGUF), CPU only")  # fmt: skip
        else:
            opts, parts = _runner_options(src, machine, ctx, usable, bw, hotness, calib_dir), {}
            title = ("k2quant runner (compressed-tensors INT4): attention, shared experts and hot experts on the "
                     "GPU, the other experts in RAM on the CPU" if vram else "k2quant runner (compressed-tensors "
                     "INT4), CPU only")  # fmt: skip
        opts.sort(key=lambda o: -o.file_bytes)
        fitting = [o for o in opts if o.fits]
        # the largest file that fits; for the runner, among those within SLOWEST_CHOICE of the fastest that fits
        # (its kernels differ by form: FP8 block decoded per call on a CPU is far slower than its bytes say)
        fast = [o for o in fitting if target == "gguf" or
                o.tokens_per_s >= SLOWEST_CHOICE * max(f.tokens_per_s for f in fitting)]  # fmt: skip
        chosen = fast[0] if fitting else None
        fallback = None
        if chosen is not None:
            summary = (
                f"best that fits: {chosen.label}, {_size(chosen.file_bytes)} in {chosen.files} file(s), "
                f"{chosen.bits_per_weight:.2f} bits per weight; about {_tps(chosen.tokens_per_s)} tokens/s "
                f"(predicted decode, empty context; {_tps(chosen.tokens_per_s_at_ctx)} at {ctx} tokens)"
            )
            if chosen is not fitting[0]:
                summary += (f"; not the larger {fitting[0].label}: predicted at {_tps(fitting[0].tokens_per_s)} "
                            f"tokens/s, under {SLOWEST_CHOICE:.0%} of the fastest that fits")  # fmt: skip
        else:
            small = min(opts, key=lambda o: o.ram.total)
            if "ram" in small.short:
                summary = (
                    f"nothing fits: the smallest, {small.label} ({_size(small.file_bytes)}), needs "
                    f"{_size(small.ram.total)} of RAM, {_size(small.short['ram'])} more than the "
                    f"{_size(usable['ram'])} usable"
                )
            else:
                summary = (
                    f"nothing fits: the smallest, {small.label}, needs {_size(small.vram.total)} of VRAM, "
                    f"{_size(small.short['vram'])} more than the {_size(usable['vram'])} usable"
                )
            if target == "gguf":
                cands = [_mmap_option(o, parts[o.preset], usable, bw, cfg, ctx, vram) for o in opts]
                ok = [c for c in cands if c.fits]
                if ok:
                    fallback = max(ok, key=lambda c: c.tokens_per_s)
            else:
                summary += "; the runner holds its weights in RAM (no memory-mapped mode): see the GGUF target"
        out.append(TargetPlan(target, title, opts, chosen, fallback, summary))
    total_params = sum(math.prod(s) for s in expected_shapes(cfg).values())
    routed = sum(math.prod(s) for n, s in expected_shapes(cfg).items() if parse_name(n).component == "routed_experts")
    embed = cfg.vocab_size * cfg.hidden_size
    active = total_params - embed - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    q = cfg.quantization_config or {}
    info = {"name": src.name, "kind": src.kind, "description": src.description,
            "params": total_params, "active_params_per_token": active,
            "stored_bytes": sum(lt.stored_bytes for lt in src.checkpoint.tensors.values()),
            "quantization": q.get("quant_method") or "none", "layers": cfg.num_hidden_layers,
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "max_context": cfg.max_position_embeddings}  # fmt: skip
    notes.append(
        "tokens/s, GGUF: the bandwidth bound (bytes read per token from each tier / that tier's bandwidth, "
        "summed), which llama.cpp reaches only part of (0.66 on 2 AVX2 cores in bench/run.py); runner: the "
        "bytes each of its CPU kernels streams per token at that kernel's measured rate (never above the RAM "
        "bandwidth), the GPU's share at the VRAM bandwidth"
        + (
            ""
            if machine.kernel_rates
            else " (kernel rates not measured: a given RAM bandwidth plans for another "
            "machine; the runner's CPU share is then at the bandwidth, an upper bound)"
        )
    )
    if not machine.amx and "gguf" in targets:
        notes.append(
            "llama.cpp: on CPUs with AMX (recent Xeons) add --no-repack (llama-cpp-python 0.3.36's llama.cpp "
            "aborts on quantized deepseek2 GGUFs in its AMX buffer)"
        )
    return Plan(info, machine, ctx, kv_cache_bytes(cfg, ctx), usable, headroom, out, notes)


# ---------------------------------------------------------------------------- text
def _unit(n: float) -> tuple[float, str]:
    return next((u, name) for u, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1.0, "B")) if n >= u or u == 1)


def _size(n: float) -> str:
    u, name = _unit(n)
    return f"{n / u:.{2 if name == 'TB' else 1}f} {name}"


def _count(n: float) -> str:
    u, name = next((u, x) for u, x in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1.0, "")) if n >= u or u == 1)
    return f"{n / u:.{2 if name == 'T' else 1}f}{name}"


def format_plan(p: Plan) -> str:
    """The plan as the terminal shows it: machine, one table per target, the choice and its commands."""
    m, mach = p.model, p.machine
    q = {"fp8": "FP8 block", "compressed-tensors": "compressed-tensors INT4", "none": "BF16"}.get(m["quantization"])
    vram = mach.vram.value
    lines = [
        f"model: {m['name']} ({m['description']})",
        f"  {_count(m['params'])} parameters ({_count(m['active_params_per_token'])} active per token), stored "
        f"{q} ({_size(m['stored_bytes'])}); {m['layers']} layers, {m['routed_experts']} routed experts, "
        f"{m['experts_per_token']} per token",
        f"machine: RAM {_size(mach.ram.value)} ({mach.ram.source}), "
        + (f"VRAM {_size(vram)} ({mach.vram.source})" if vram else f"no GPU ({mach.vram.source})"),
        f"  bandwidth: RAM {_size(mach.ram_bandwidth.value)}/s ({mach.ram_bandwidth.source})",
        *([f"             VRAM {_size(mach.vram_bandwidth.value)}/s ({mach.vram_bandwidth.source})"] if vram else []),
        f"             disk {_size(mach.disk_bandwidth.value)}/s ({mach.disk_bandwidth.source})",
        f"  runner's interpreter: {_size(mach.runtime.value)} RSS before weights ({mach.runtime.source})",
        *(
            [
                "  runner's CPU kernels: "
                + ", ".join(f"{k} {_size(f.value)}/s" for k, f in mach.kernel_rates.items())
                + f" ({next(iter(mach.kernel_rates.values())).source})"
            ]
            if mach.kernel_rates
            else []
        ),
        f"  headroom: RAM {p.headroom['ram']}" + (f"; VRAM {p.headroom['vram']}" if vram else ""),
        f"context: {p.ctx} tokens; MLA KV cache {_size(p.kv_cache_bytes)} "
        f"(kv_lora_rank + qk_rope_head_dim values x {m['layers']} layers x {p.ctx} tokens x 2 bytes)",
    ]
    for tp in p.targets:
        u, un = _unit(max(max(o.file_bytes, o.ram.total) for o in tp.options))
        u, un = (1e9, "GB") if un == "TB" else (u, un)
        lines += ["", tp.title,
                  f"  {'recipe':<30}{'file ' + un:>9}{'bpw':>7}{'RAM ' + un:>9}{'VRAM ' + un:>9}{'tok/s':>8}"
                  f"{'@ctx':>7}  fits"]  # fmt: skip
        for o in tp.options:
            why = "yes" if o.fits else "no: " + ", ".join(f"{k.upper()} short {_size(v)}" for k, v in o.short.items())
            mark = "*" if o is tp.chosen else " "
            sizes = f"{o.file_bytes / u:>9.1f}{o.bits_per_weight:>7.2f}{o.ram.total / u:>9.1f}{o.vram.total / u:>9.1f}"
            lines.append(f" {mark}{o.label:<30}{sizes}{_tps(o.tokens_per_s):>8}{_tps(o.tokens_per_s_at_ctx):>7}  {why}")
        lines.append(f"  {tp.summary}")
        best = tp.chosen or tp.fallback
        if tp.fallback is not None:
            f = tp.fallback
            lines.append(f"  instead, from a memory-mapped NVMe file: {f.preset}, {f.note}: about "
                         f"{f.tokens_per_s:.1f} tokens/s (predicted at {_size(mach.disk_bandwidth.value)}/s disk; "
                         f"{f.tokens_per_s_at_ctx:.1f} at {p.ctx} tokens)")  # fmt: skip
        if best is None:
            continue
        lines.append("  RAM: " + ", ".join(f"{k} {_size(v)}" for k, v in best.ram.parts.items()))
        if best.vram.total:
            lines.append("  VRAM: " + ", ".join(f"{k} {_size(v)}" for k, v in best.vram.parts.items()))
        pl = best.placement
        if pl and pl.get("gpu_memory"):
            lines.append(f"  placement: {pl['gpu_dense_tensors']} dense tensors and {pl['gpu_routed_experts']} of "
                         f"{pl['routed_experts']} routed experts on the GPU (--gpu-memory {_size(pl['gpu_memory'])} "
                         "gives the runner this budget)")  # fmt: skip
        if best.note and best.mmap is None:
            lines.append(f"  note: {best.note}")
        lines.append("  commands:")
        lines += [f"    {c}" for c in best.commands]
        if tp.fallback is not None:
            lines.append("    (keep the file on NVMe; llama.cpp maps it by default: no --mlock, no --no-mmap)")
    lines += ["", *(f"note: {n}" for n in p.notes)]
    return "\n".join(lines)


def parse_size(text: str, option: str) -> int:
    """'256G' = 256 x 10^9 bytes, '256GiB' = 256 x 2^30 (the units of the runner's --gpu-memory)."""
    from .runner.console import parse_bytes

    return parse_bytes(text, option)
