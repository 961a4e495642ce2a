"""Streaming reader for Hugging Face K2 / DeepSeek-V3 checkpoints.

Opening a checkpoint reads only headers: config.json, the index and each shard's
safetensors header. Everything a conversion could trip over later (a missing shard, a
truncated file, an index that points outside the directory, a missing tensor, a scale
whose shape does not fit its weight) is found here, before any work starts. Tensor data
is mapped lazily per tensor, so iterating a 1 TB checkpoint holds one group at a time.

A *logical* tensor is what the forward sees (`...q_a_proj.weight`, float); its *stored*
form is the set of on-disk tensors it came from (FP8 weight + weight_scale_inv, or
weight_packed + weight_scale + weight_shape, ...). Both are available: the stored form
for bit-exact repacking, the dequantized float tensor for everything else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from k2quant.formats.safetensors_file import SafetensorsFile, TensorInfo, map_tensor

from .config import K2Config
from .errors import CheckpointError
from .names import expected_shapes, parse_name
from .quant.forms import form
from .quant.fp8 import scale_shape

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPES = (torch.float8_e4m3fn,)

# stored part suffixes that belong to a logical "<module>.weight"
_PART_SUFFIXES = ("weight_scale_inv", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
_SHARD_NUM = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


@dataclass
class LogicalTensor:
    """A logical tensor and where its stored parts live (no data loaded)."""

    name: str
    format: str  # a stored form (quant/forms.py): "dense" | "fp8_block" | "fp8_scaled" | "int4_pack"
    parts: dict[str, TensorInfo]  # part suffix ("weight", "weight_scale_inv", ...) -> location
    shape: tuple[int, ...]  # logical shape; for int4 checked against weight_shape on load
    shard: int  # index of the first shard holding a part, for shard-order iteration
    block: tuple[int, int] | None = None

    @property
    def stored_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def storage(self) -> str:
        """Short storage description for reports, e.g. 'F8_E4M3+F32 block 128x128'."""
        if self.format == "dense":
            return str(self.parts["weight" if "weight" in self.parts else next(iter(self.parts))].dtype)[6:]
        if self.format == "int4_pack":
            g = math.ceil(self.shape[1] / self.parts["weight_scale"].shape[1])
            zp = " asym" if "weight_zero_point" in self.parts else ""
            return f"int4 g{g}{zp} ({str(self.parts['weight_scale'].dtype)[6:]} scales)"
        blk = f" block {self.block[0]}x{self.block[1]}" if self.block else ""
        return f"float8_e4m3fn{blk}"


@dataclass
class StoredWeight:
    """A logical tensor's stored parts, loaded (memory-mapped), decoded by its stored form (quant/forms.py)."""

    name: str
    format: str
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor]
    block: tuple[int, int] | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return form(self.format).dequantize(self.parts, self.shape, self.block).to(dtype)

    def rows(self, r0: int, r1: int) -> StoredWeight:
        """Rows r0:r1 of a 2-D weight in stored form (r0 a multiple of 128: FP8 blocks and packed zero points)."""
        if r0 % 128:
            raise ValueError(f"{self.name}: row slices start at multiples of 128, got {r0}")
        parts = form(self.format).rows(self.parts, self.shape, self.block, r0, r1)
        return StoredWeight(self.name, self.format, (r1 - r0, *self.shape[1:]), parts, self.block)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


@dataclass(frozen=True)
class Group:
    """A unit of streaming work: logical names that are read and processed together."""

    kind: str  # "tensor" | "linear" | "expert" | "experts"
    key: str  # a name for progress bars and journals
    names: tuple[str, ...]
    layer: int | None = None
    expert: int | None = None


@dataclass
class Checkpoint:
    """An opened checkpoint directory: config, shards in order, logical tensors."""

    path: Path
    config: K2Config
    shards: list[Path]
    tensors: dict[str, LogicalTensor]  # logical name -> location, in shard order
    extra: list[str] = field(default_factory=list)  # logical names the forward does not use

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> LogicalTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError("not in checkpoint", str(self.path), name) from None

    def stored(self, name: str) -> StoredWeight:
        """Load (map) the stored parts of one logical tensor and validate them."""
        lt = self.info(name)
        parts = {suffix: map_tensor(ti) for suffix, ti in lt.parts.items()}
        for suffix in ("weight_scale_inv", "weight_scale"):
            if suffix in parts and not torch.isfinite(parts[suffix].to(torch.float32)).all():
                raise CheckpointError(f"{suffix} holds NaN or Inf", str(lt.parts[suffix].file), name)
        if "weight_shape" in parts:
            ws = tuple(int(v) for v in parts["weight_shape"].tolist())
            if ws != lt.shape:
                raise CheckpointError(
                    f"weight_shape {list(ws)} does not match the expected shape {list(lt.shape)}",
                    str(lt.parts["weight_shape"].file),
                    name,
                )
        return StoredWeight(name, lt.format, lt.shape, parts, lt.block)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized logical tensor."""
        return self.stored(name).dequantize(dtype)

    def groups(self, experts: str = "expert") -> Iterator[Group]:
        """Logical groups in shard order. experts="expert": one expert's gate/up/down per group;
        experts="layer": all routed experts of a layer in one group."""
        if experts not in ("expert", "layer"):
            raise ValueError(f"experts must be 'expert' or 'layer', not {experts!r}")
        order: list[str] = []
        members: dict[str, list[str]] = {}
        meta: dict[str, tuple[str, int | None, int | None]] = {}
        for name in self.tensors:
            ni = parse_name(name)
            if ni.component == "routed_experts":
                if experts == "expert":
                    key, kind, ex = f"model.layers.{ni.layer}.mlp.experts.{ni.expert}", "expert", ni.expert
                else:
                    key, kind, ex = f"model.layers.{ni.layer}.mlp.experts", "experts", None
            else:
                key, kind, ex = name, ("linear" if ni.is_linear else "tensor"), None
            if key not in members:
                order.append(key)
                members[key] = []
                meta[key] = (kind, ni.layer, ex)
            members[key].append(name)
        proj_rank = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}
        for key in order:
            kind, layer, ex = meta[key]
            names = members[key]
            if kind in ("expert", "experts"):  # canonical order: by expert id, then gate, up, down
                names = sorted(names, key=lambda n: (parse_name(n).expert, proj_rank[parse_name(n).proj]))
            yield Group(kind, key, tuple(names), layer, ex)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)


def open_checkpoint(path: str | Path, *, strict: bool = True) -> Checkpoint:
    """Open a Hugging Face checkpoint directory (sharded with an index, or single-file).

    With strict=True (the default) every tensor the config implies must be present with
    the right shape; strict=False is for partial checkpoints (one layer, tests). A k2quant
    output whose conversion did not finish (no manifest) is refused (manifest.check_complete).
    """
    from k2quant.formats.gguf import is_gguf, open_gguf

    from .manifest import check_complete

    check_complete(path)
    if is_gguf(path):
        return open_gguf(path)
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError("not a checkpoint directory", str(root))
    config = K2Config.from_file(root / "config.json")
    shard_of = _read_weight_map(root)
    shard_paths = sorted(set(shard_of.values()), key=_shard_sort_key)
    shard_index = {p: i for i, p in enumerate(shard_paths)}
    files = {p: SafetensorsFile(p) for p in shard_paths}

    physical: dict[str, TensorInfo] = {}
    for name, shard in shard_of.items():
        sf = files[shard]
        if name not in sf.tensors:
            raise CheckpointError(f"listed in {INDEX_FILE} but missing from the shard", str(shard), name)
        physical[name] = sf.tensors[name]
    # shard order, then the order inside each shard's header
    physical = dict(sorted(physical.items(), key=lambda kv: (shard_index[kv[1].file], kv[1].start)))
    # expected_shapes names every (layer, expert): a config.json whose counts lie would cost memory and time
    # before any check, so its size is bounded by what is stored (with room for partial checkpoints)
    n_expected = _expected_count(config)
    if n_expected > 4 * len(physical) + 100_000:
        raise CheckpointError(
            f"implies {n_expected} tensors ({config.num_hidden_layers} layers, {config.n_routed_experts} routed "
            f"experts), far more than the {len(physical)} the checkpoint stores",
            str(root / "config.json"),
        )
    expected = expected_shapes(config)
    tensors = _logical_tensors(physical, shard_index, config, expected)
    extra = [n for n in tensors if n not in expected]
    if strict:
        missing = [n for n in expected if n not in tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"missing from the checkpoint{more}", str(root), missing[0])
    for name, lt in tensors.items():
        want = expected.get(name)
        if want is not None and lt.shape != want:
            first = next(iter(lt.parts.values()))
            raise CheckpointError(
                f"shape {list(lt.shape)} does not match config.json, which implies {list(want)}", str(first.file), name
            )
    return Checkpoint(root, config, shard_paths, tensors, extra)


def _expected_count(c: K2Config) -> int:
    """len(expected_shapes(c)), counted without building it."""
    attn = 2 + (3 if c.q_lora_rank is not None else 1) + 4
    dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    moe = attn + 2 + (3 if c.n_shared_experts else 0) + 3 * c.n_routed_experts
    return 2 + (0 if c.tie_word_embeddings else 1) + dense * (attn + 3) + (c.num_hidden_layers - dense) * moe


def _shard_sort_key(p: Path) -> tuple[int, str]:
    m = _SHARD_NUM.search(p.name)
    return (int(m.group(1)) if m else 0, p.name)


def _read_weight_map(root: Path) -> dict[str, Path]:
    index = root / INDEX_FILE
    if not index.exists():
        single = root / SINGLE_FILE
        if not single.exists():
            raise CheckpointError(f"neither {INDEX_FILE} nor {SINGLE_FILE} found", str(root))
        return {name: single for name in SafetensorsFile(single).tensors}
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an int of 5000 digits
        raise CheckpointError(f"not valid JSON ({e})", str(index)) from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError("no weight_map object", str(index))
    resolved: dict[str, Path] = {}
    out: dict[str, Path] = {}
    for name, fname in wmap.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"weight_map entry {fname!r} is not a file name", str(index), name)
        if fname not in resolved:
            # judged by the name the index gives, not by where a link points: the Hugging Face cache holds
            # snapshots/<rev>/*.safetensors as symlinks to ../../blobs/<hash>, and that is a valid checkpoint
            p = Path(fname)
            if p.is_absolute() or ".." in p.parts:
                raise CheckpointError(
                    f"weight_map names {fname!r}, which is outside the checkpoint directory", str(index), name
                )
            target = root / p
            try:
                found = target.is_file()
            except OSError as e:  # a name too long for the file system, say
                raise CheckpointError(f"shard {fname!r} listed in the index cannot be opened ({e.strerror})",
                                      str(index), name) from None  # fmt: skip
            if not found:
                raise CheckpointError(f"shard {fname!r} listed in the index is missing", str(root / p), name)
            resolved[fname] = root / p
        out[name] = resolved[fname]
    return out


def _quant_block(config: K2Config) -> tuple[int, int] | None:
    q = config.quantization_config or {}
    if q.get("quant_method") == "fp8":
        b = q.get("weight_block_size", [128, 128])
        return (int(b[0]), int(b[1]))
    for group in (q.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        if w.get("type") == "float" and w.get("strategy") == "block" and w.get("block_structure"):
            b = w["block_structure"]
            return (int(b[0]), int(b[1]))
    return None


def _int4_bits_ok(config: K2Config) -> bool:
    q = config.quantization_config or {}
    for group in (q.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        if w.get("type") == "int" and w.get("num_bits") not in (None, 4):
            return False
    return True


def _logical_tensors(
    physical: dict[str, TensorInfo],
    shard_index: dict[Path, int],
    config: K2Config,
    expected: dict[str, tuple[int, ...]],
) -> dict[str, LogicalTensor]:
    grouped: dict[str, dict[str, TensorInfo]] = {}
    for name, ti in physical.items():
        module, _, suffix = name.rpartition(".")
        if suffix in _PART_SUFFIXES and module:
            grouped.setdefault(module + ".weight", {})[suffix] = ti
        elif suffix == "weight" and module:
            grouped.setdefault(name, {})["weight"] = ti
        else:
            grouped.setdefault(name, {})[suffix or name] = ti
    block = _quant_block(config)
    out: dict[str, LogicalTensor] = {}
    for name, parts in grouped.items():
        shard = min(shard_index[p.file] for p in parts.values())
        out[name] = _classify(name, parts, shard, block, config, expected.get(name))
    return out


def _classify(
    name: str,
    parts: dict[str, TensorInfo],
    shard: int,
    block: tuple[int, int] | None,
    config: K2Config,
    expected: tuple[int, ...] | None,
) -> LogicalTensor:
    def bad(msg: str, part: str) -> CheckpointError:
        return CheckpointError(msg, str(parts[part].file), name.removesuffix("weight") + part)

    keys = set(parts)
    if "weight_packed" in keys:
        for need in ("weight_scale", "weight_shape"):
            if need not in keys:
                raise CheckpointError(f"weight_packed without {need}", str(parts["weight_packed"].file), name)
        if not _int4_bits_ok(config):
            raise CheckpointError("only 4-bit pack-quantized weights are supported", None, name)
        pk, sc, sh = parts["weight_packed"], parts["weight_scale"], parts["weight_shape"]
        if pk.dtype != torch.int32 or len(pk.shape) != 2:
            raise bad(f"expected int32 [out, in/8], got {pk.dtype} {list(pk.shape)}", "weight_packed")
        if sc.dtype not in FLOAT_DTYPES or len(sc.shape) != 2 or sc.shape[0] != pk.shape[0]:
            raise bad(f"{sc.dtype} {list(sc.shape)} does not fit weight_packed {list(pk.shape)}", "weight_scale")
        if sh.dtype not in (torch.int32, torch.int64) or sh.shape != (2,):
            raise bad(f"expected an int [2] tensor, got {sh.dtype} {list(sh.shape)}", "weight_shape")
        rows = pk.shape[0]
        cols = expected[1] if expected else pk.shape[1] * 8
        groups = sc.shape[1]
        if math.ceil(cols / 8) != pk.shape[1] or groups == 0 or math.ceil(cols / math.ceil(cols / groups)) != groups:
            raise bad(
                f"shape {list(pk.shape)} with scales {list(sc.shape)} cannot hold [{rows}, {cols}]", "weight_packed"
            )
        if "weight_zero_point" in keys:
            zp = parts["weight_zero_point"]
            if zp.dtype != torch.int32 or zp.shape != (math.ceil(rows / 8), sc.shape[1]):
                raise bad(
                    f"expected int32 [{math.ceil(rows / 8)}, {sc.shape[1]}], got {list(zp.shape)}", "weight_zero_point"
                )
        return LogicalTensor(name, "int4_pack", parts, (rows, cols), shard)
    if "weight_zero_point" in keys:
        raise CheckpointError("weight_zero_point without weight_packed", str(parts["weight_zero_point"].file), name)
    scale_key = (
        "weight_scale_inv" if "weight_scale_inv" in keys else ("weight_scale" if "weight_scale" in keys else None)
    )
    if scale_key:
        if "weight" not in keys:
            raise CheckpointError(f"{scale_key} without its weight", str(parts[scale_key].file), name)
        w, s = parts["weight"], parts[scale_key]
        if w.dtype not in FP8_DTYPES or len(w.shape) != 2:
            raise bad(f"has a {scale_key} but is {w.dtype} {list(w.shape)}, not float8_e4m3fn [out, in]", "weight")
        if scale_key == "weight_scale_inv":
            if s.dtype != torch.float32:
                raise bad(f"expected float32, got {s.dtype}", scale_key)
            blk = block or (128, 128)
            if s.shape != scale_shape(w.shape, blk):
                raise bad(
                    f"shape {list(s.shape)} does not fit weight {list(w.shape)} with {blk[0]}x{blk[1]} blocks "
                    f"(expected {list(scale_shape(w.shape, blk))})",
                    scale_key,
                )
            return LogicalTensor(name, "fp8_block", parts, w.shape, shard, blk)
        if s.dtype not in FLOAT_DTYPES:
            raise bad(f"expected a float dtype, got {s.dtype}", scale_key)
        if block is not None and len(s.shape) == 2 and s.shape == scale_shape(w.shape, block):
            return LogicalTensor(name, "fp8_scaled", parts, w.shape, shard, block)
        if s.shape in ((w.shape[0], 1), (1,), (), (1, 1)):
            return LogicalTensor(name, "fp8_scaled", parts, w.shape, shard, None)
        raise bad(f"shape {list(s.shape)} does not fit weight {list(w.shape)}", scale_key)
    if len(parts) != 1:
        raise CheckpointError(f"unexpected stored parts {sorted(keys)}", str(next(iter(parts.values())).file), name)
    (ti,) = parts.values()
    if ti.dtype in FP8_DTYPES:
        raise CheckpointError("float8 weight without a weight_scale_inv or weight_scale", str(ti.file), name)
    return LogicalTensor(name, "dense", parts, ti.shape, shard)
