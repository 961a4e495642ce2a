"""Layer-streamed GPTQ: calibrate and quantize in one pass, without storing Hessians.

`calibrate --hessian` keeps X^T X for every linear: in_features^2 floats each, about 9 TB
for K2's 23,000 routed experts. Here calibration's layer-by-layer forward runs inside
convert: each routed expert is quantized as soon as it has seen all of its tokens, and a
layer's other INT4 linears when the layer ends; their Hessians are dropped right after.
Held at once: the hidden states (tokens x hidden), one layer's non-expert Hessians and
one expert's.

The quantized parts go to a spool, one safetensors file per layer in OUT/.gptq-spool
(about the size of the INT4 output), from which the ordinary shard writer copies them.
A layer whose spool file is complete and was made for the same plan is not redone on
--resume; the spool is deleted once the conversion is finished. The statistics are taken
on the unquantized model, so the result equals `calibrate --hessian` followed by
`convert --method gptq --calib` on the same text, byte for byte.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from k2quant.calib.collect import CalibStats, collect
from k2quant.formats.hf import write_json
from k2quant.formats.imatrix import importance
from k2quant.formats.safetensors_file import DTYPES, SafetensorsFile, SafetensorsWriter

from .checkpoint import Checkpoint
from .errors import K2QuantError
from .memory import release_freed_memory
from .model import CheckpointWeights, K2Model
from .quant.schemes import parse_scheme

SPOOL = ".gptq-spool"
GPTQ_MIN_TOKENS = 128  # fewer calibration rows than this: the Hessian is too thin, use the weighted search
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def spool_file(spool: Path, layer: int) -> Path:
    return spool / f"layer-{layer:03d}.safetensors"


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


def _order(t) -> tuple:
    """Write order inside a layer: routed experts by id (gate, up, down), as the forward
    finishes them; then the layer's other linears by name."""
    m = _EXPERT.match(t.name)
    if m:
        return (0, int(m[2]), ("gate_proj", "up_proj", "down_proj").index(m[3]), "")
    return (1, 0, 0, t.name)


def _fallbacks_file(path: Path) -> Path:
    return path.with_suffix(".fallbacks.json")


def spooled_fallbacks(spool: Path) -> list[str]:
    """The modules the spooled layers quantized by the weighted search instead of GPTQ."""
    return sorted(m for p in spool.glob("layer-*.fallbacks.json") for m in json.loads(p.read_text()))


def _complete(path: Path, fingerprint: str) -> bool:
    """Whether a spooled layer is finished and usable: its header parses (k2quant's validating reader),
    it was made for this plan, and its fallbacks file is a list of module names. Anything else (a file
    cut short, a damaged header, an edit) is not finished, and the layer is done again."""
    fallbacks = _fallbacks_file(path)
    if not path.is_file() or not fallbacks.is_file():
        return False
    try:
        plan = SafetensorsFile(path).metadata.get("k2quant_plan")
        names = json.loads(fallbacks.read_text(encoding="utf-8"))
    except (K2QuantError, OSError, ValueError, RecursionError):  # ValueError: not UTF-8 or not JSON
        return False
    return plan == fingerprint and isinstance(names, list) and all(isinstance(n, str) for n in names)


class SpoolSink:
    """Receives collect()'s statistics as experts and layers finish; quantizes and spools."""

    def __init__(self, ck: Checkpoint, tensors: list, spool: Path, fingerprint: str, act_order: bool,
                 propagate: bool = False, progress: bool = True):  # fmt: skip
        self.ck, self.spool, self.fingerprint, self.act_order = ck, spool, fingerprint, act_order
        self.propagate = propagate
        self.by_layer: dict[int, list] = {}
        for t in tensors:
            self.by_layer.setdefault(int(_LAYER.match(t.name)[1]), []).append(t)
        for ts in self.by_layer.values():
            ts.sort(key=_order)
        self.layers = {i for i in self.by_layer if not _complete(spool_file(spool, i), fingerprint)}
        done = set(self.by_layer) - self.layers if propagate else set()  # reused layers run quantized
        self.weights = SpooledWeights(ck, spool, {t.name: t.scheme for t in tensors}, done)
        self.modules = {module_of(t.name) for i in self.layers for t in self.by_layer[i]}  # want Hessians
        self.fallbacks: list[str] = []  # this layer's
        self.gptq_modules = 0
        self.layers_quantized = 0
        self._layer: int | None = None
        self._pending: list = []
        self._writer: SafetensorsWriter | None = None
        self.bar = tqdm(total=len(self.modules), desc="gptq", unit="linear", disable=not progress)

    def _start(self, layer: int) -> None:
        if self._layer == layer:
            return
        self._layer, self._pending, self.fallbacks = layer, list(self.by_layer[layer]), []
        entries = [(o[0], DTYPES[o[1]], tuple(o[2])) for t in self._pending for o in t.outputs]
        self._writer = SafetensorsWriter(spool_file(self.spool, layer), entries,
                                         {"format": "pt", "k2quant_plan": self.fingerprint})  # fmt: skip

    def _write(self, stats: CalibStats, t) -> None:
        mod = module_of(t.name)
        scheme = parse_scheme(t.scheme)
        w = self.ck.tensor(t.name)
        h = stats.hessians.pop(mod, None)
        if h is not None and stats.counts.get(mod, 0) >= GPTQ_MIN_TOKENS:
            parts = scheme.quantize(w, hessian=h.float(), act_order=self.act_order)
            self.gptq_modules += 1
        else:  # the importance weights calibrate's imatrix would give it (ones for an unrouted expert)
            self.fallbacks.append(mod)
            if mod in stats.in_sum2:
                imp = importance({mod: stats.in_sum2[mod].float()}, stats.counts)[mod]
            else:
                imp = torch.ones(w.shape[1]) if _EXPERT.match(t.name) else None
            parts = scheme.quantize(w, importance=imp, search=True)
        for out_name, _, _ in t.outputs:
            self._writer.write(out_name, parts[out_name[len(mod) + 1 :]])
        self.bar.update()

    def expert_done(self, stats: CalibStats, layer: int, expert: int) -> None:
        self._start(layer)
        stats._last = None  # its Hessian may be the one about to be dropped
        while self._pending and _order(self._pending[0]) < (0, expert + 1):
            self._write(stats, self._pending.pop(0))

    def layer_done(self, stats: CalibStats, layer: int) -> None:
        self._start(layer)
        stats._last = None
        while self._pending:
            self._write(stats, self._pending.pop(0))
        path = spool_file(self.spool, layer)
        write_json(_fallbacks_file(path), self.fallbacks)  # before the rename: a complete layer has both
        self._writer.close()
        self._writer = None
        self.layers_quantized += 1
        if self.propagate:
            self.weights.complete.add(layer)
        prefix = f"model.layers.{layer}."
        for m in [m for m in stats.hessians if m.startswith(prefix)]:  # not INT4 here: nothing to do with it
            del stats.hessians[m]
        release_freed_memory()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self.bar.close()


def run_gptq_stream(ck: Checkpoint, tensors: list, spool: Path, fingerprint: str, sequences: torch.Tensor,
                    min_expert_tokens: int, act_order: bool, propagate: bool = False, batch: int = 8,
                    progress: bool = True) -> dict:  # fmt: skip
    """Quantize `tensors` (INT4 linears inside decoder layers) by GPTQ into the spool. With
    `propagate`, each layer is calibrated on the outputs of the layers before it as quantized
    (GPTQ's sequential order), not on the original model's.
    Returns what the summary reports: modules and layers done, layers reused, peak Hessian memory."""
    t0 = time.time()
    spool.mkdir(exist_ok=True)
    sink = SpoolSink(ck, tensors, spool, fingerprint, act_order, propagate, progress)
    peak = 0
    if sink.layers:
        try:
            stats = collect(K2Model(ck.config, sink.weights), sequences, batch=batch,
                            min_expert_tokens=min_expert_tokens, progress=progress, hessian=sink.modules,
                            sink=sink)  # fmt: skip
            peak = stats.peak_hessian_bytes
        finally:
            sink.abort()  # only an unfinished layer's file is removed
    return {
        "gptq_modules": sink.gptq_modules,
        "layers_quantized": sink.layers_quantized,
        "layers_reused": len(sink.by_layer) - len(sink.layers),
        "peak_hessian_bytes": peak,
        "seconds": round(time.time() - t0, 2),
    }


class SpooledWeights(CheckpointWeights):
    """The forward's weights during streamed GPTQ: with --propagate, a layer's INT4 linears as
    quantized once its spool file is complete (`complete`); the checkpoint's own otherwise."""

    def __init__(self, ck: Checkpoint, spool: Path, schemes: dict[str, str], complete: set[int]):
        super().__init__(ck)
        self.reader, self.schemes, self.complete = SpoolReader(spool), schemes, complete

    def fetch(self, name: str) -> torch.Tensor:
        m = _LAYER.match(name)
        if name in self.schemes and m and int(m[1]) in self.complete:
            parts = self.reader.parts(module_of(name))
            return parse_scheme(self.schemes[name]).dequantize(parts, self.checkpoint.info(name).shape)
        return super().fetch(name)


class SpoolReader:
    """The spooled parts of a module, or None where the spool has none. One layer's file is open
    at a time (reads go layer by layer), so mapped spool pages do not pile up."""

    def __init__(self, spool: str | Path):
        self.spool = Path(spool)
        self._layer: int | None = None
        self._file = None
        self._keys: set[str] = set()

    def parts(self, module: str) -> dict[str, torch.Tensor] | None:
        m = _LAYER.match(module)
        if not m:
            return None
        if self._layer != int(m[1]):
            path = spool_file(self.spool, int(m[1]))
            if not path.is_file():
                return None
            self._layer, self._file = int(m[1]), SafetensorsFile(path)
            self._keys = set(self._file.keys())
        if module + ".weight_packed" not in self._keys:
            return None
        parts = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
        return {p: self._file.load(f"{module}.{p}") for p in parts if f"{module}.{p}" in self._keys}
