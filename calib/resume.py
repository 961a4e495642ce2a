"""Calibration's resumable state: what a finished layer leaves on disk, and how a run picks it up.

`calibrate` runs every calibration token through one layer before the next (calib/collect.py),
so after layer i it holds two things worth keeping: the statistics of layer i's linears and
experts (they never change again) and the hidden states of all tokens after layer i (the next
layer's input: tokens x hidden x 4 bytes, 3.8 GB for K2 at 131072 tokens). Both go into
`OUT/.k2quant-calibrate/` as each layer finishes:

- `layer-NNN.safetensors`: layer NNN's statistics (float64 sums as they are, counts in the
  metadata), written once;
- `hidden-NNN.safetensors`: the hidden states after layer NNN, one tensor per batch;
- `state.json`: the run's key (source, tokens, options) and how many layers are done.

Each file is written under a temporary name, fsynced and renamed (formats/hashed.py), in that
order, and the previous layer's hidden states are deleted only after `state.json` names the
new ones, so a SIGKILL at any point leaves either the old state or the new one, never a mix.
A resumed run reads them back bit for bit and starts at the next layer: its outputs are
byte-identical to an uninterrupted run's. The key is compared field by field: a changed
source (config.json, a shard's size or its first MiB, where the headers are), changed
calibration tokens (--data, --tokens, --ctx) or another option is refused, with the
difference named. Every file here is read as untrusted (a crashed run leaves it; a user may
edit it): a bad one raises CalibrationStateError naming it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from k2quant import __version__
from k2quant.calib.collect import CalibStats, Resumed
from k2quant.errors import K2QuantError
from k2quant.formats.hashed import atomic_write
from k2quant.formats.safetensors_file import SafetensorsFile, write_tensors
from k2quant.manifest import hash_file

STATE_DIR = ".k2quant-calibrate"
STATE_FILE = "state.json"
HEAD_BYTES = 1 << 20  # of each shard, hashed into the key: safetensors and GGUF headers live there
_LAYER_KEYS = ("routed", "weight_sum", "topped_up")  # per-MoE-layer statistics, keyed by layer number


class CalibrationStateError(K2QuantError):
    """An unfinished calibration's state that cannot be used; names the file or the difference."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SOURCE_FILES = ("config.json", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja")


def source_key(root: Path, shards: list[Path]) -> str:
    """A digest of a source checkpoint that is cheap for 1 TB: config.json and the tokenizer's files
    (where there are), then each shard's name, size and first MiB (its header)."""
    h = hashlib.sha256()
    for name in SOURCE_FILES:
        f = Path(root) / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"") + b"\0")
    for p in shards:
        with open(p, "rb") as f:
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode() + f.read(HEAD_BYTES))
    return h.hexdigest()


def run_key(sources: dict[str, str], sequences: torch.Tensor, options: dict[str, object]) -> dict[str, object]:
    """What a resumable state was made from: field name -> value (compared one by one on resume by
    `key_difference`). `sources`: each input model's digest by field name (source_key). torch's version
    and thread count are in it: its float sums may differ with either, and a resume must give the
    bytes an uninterrupted run gives. Used by calibrate and by diff (report/diff_state.py)."""
    return {"k2quant": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(), **options,
            **sources, "tokens_digest": _sha256(sequences.contiguous().numpy().tobytes())}  # fmt: skip


RUN_FIELDS = {"k2quant": "the k2quant version", "torch": "the torch version", "threads": "torch's thread count"}


def key_difference(saved: dict, now: dict, names: dict[str, str], digests: tuple[str, ...]) -> str | None:
    """The first field in which a saved run key and this run's differ, as a refusal names it: its
    description in `names` (else the option, `--name`), with both values unless it is a digest; None
    when they agree."""
    for name in dict.fromkeys([*now, *saved]):
        if saved.get(name) != now.get(name):
            what = names.get(name, f"--{name.replace('_', '-')}")
            return what if name in digests else f"{what} ({saved.get(name)!r} then, {now.get(name)!r} now)"
    return None


_FIELD_NAMES = {**RUN_FIELDS,
                "source": "its source checkpoint (config.json, the tokenizer's files, a shard's size or header)",
                "tokens_digest": "its calibration tokens (the --data text)"}  # fmt: skip


def check_finished(calib: Path, error: type[K2QuantError] = K2QuantError) -> None:
    """Refuse a calibrate output directory that an unfinished run is still writing (or was killed in)."""
    if (Path(calib) / STATE_DIR / STATE_FILE).exists():
        raise error(f"{calib}: holds an unfinished calibration ({Path(calib) / STATE_DIR}); finish it with "
                    "k2quant calibrate ... --resume")  # fmt: skip


class CalibrationState:
    """OUT/.k2quant-calibrate for one run: `open` checks it (or starts it), `save_layer` after each
    layer, `finish` once the outputs are written. `hidden_shapes`: the hidden states' batches,
    [sequences, ctx, hidden] each (what a saved set must match)."""

    def __init__(self, out: Path, key: dict[str, object], layers: int, n_experts: int,
                 hidden_shapes: list[tuple[int, ...]], moe_layers: set[int] | None = None):  # fmt: skip
        self.dir = Path(out) / STATE_DIR
        self.key, self.layers, self.n_experts, self.hidden_shapes = key, layers, n_experts, hidden_shapes
        self.moe_layers = set(range(layers)) if moe_layers is None else set(moe_layers)
        self.files: dict[str, str] = {}  # state file -> sha256, as written (state.json keeps them)

    # ------------------------------------------------------------------ opening
    def open(self, resume: bool) -> Resumed | None:
        """A new state (nothing to resume), or what the unfinished run left (with `resume`).
        Without `resume`, an unfinished run in OUT is refused rather than overwritten."""
        state_file = self.dir / STATE_FILE
        if not state_file.exists():
            if self.dir.exists():  # killed before its first state.json: nothing worth keeping
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self._write_state(0)
            return None
        state = self._read_state(state_file)
        done = state["layers_done"]
        if not resume:
            raise CalibrationStateError(
                f"{self.dir.parent}: holds an unfinished calibration ({done} of {self.layers} layers done); "
                f"pass --resume to finish it, or delete {self.dir} to start over"
            )
        self._check_key(state["key"], state_file)
        self.files = dict(state["files"])
        keep = {f"layer-{i:03d}.safetensors" for i in range(done)} | {f"hidden-{done - 1:03d}.safetensors", STATE_FILE}
        for p in self.dir.iterdir():  # a kill between two writes leaves a newer layer or an older hidden file
            if p.name not in keep and p.is_file():
                p.unlink()
        for p in self.dir.parent.glob("*.tmp"):  # an output cut short by the kill
            p.unlink()
        if done == 0:
            return None
        tokens = sum(shape[0] * shape[1] for shape in self.hidden_shapes)
        stats = CalibStats(tokens=tokens, peak_hessian_bytes=state["peak_hessian_bytes"])
        for layer in range(done):
            self._read_layer(layer, stats)
        hidden = self._read_hidden(done - 1)
        return Resumed(done, hidden, stats)

    def _read_state(self, path: Path) -> dict:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CalibrationStateError(f"{path}: unreadable ({e}); delete {self.dir} to start over") from None
        ok = (
            isinstance(state, dict)
            and isinstance(state.get("key"), dict)
            and isinstance(state.get("files"), dict)
            and all(isinstance(v, str) for v in state["files"].values())
            and all(type(state.get(k)) is int and state[k] >= 0 for k in ("layers_done", "peak_hessian_bytes"))
        )
        if not ok:
            raise CalibrationStateError(f"{path}: not a k2quant calibration state; delete {self.dir} to start over")
        if state["layers_done"] > self.layers:
            raise CalibrationStateError(f"{path}: says {state['layers_done']} layers are done, the model has "
                                        f"{self.layers}")  # fmt: skip
        return state

    def _check_key(self, saved: dict, path: Path) -> None:
        what = key_difference(saved, self.key, _FIELD_NAMES, ("source", "tokens_digest"))
        if what is not None:
            raise CalibrationStateError(
                f"{self.dir.parent}: the unfinished calibration there ({path}) differs from this run in {what}; "
                f"run again with its inputs and options, or delete {self.dir} to start over"
            )

    def _open_file(self, name: str) -> SafetensorsFile:
        """A state file, checked against the sha256 state.json recorded when it was written."""
        path = self.dir / name
        try:
            got = hash_file(path)
        except OSError as e:
            raise CalibrationStateError(f"{path}: cannot be read ({e.strerror}); delete {self.dir} to start over"
                                        ) from None  # fmt: skip
        if self.files.get(name) != got:
            raise CalibrationStateError(f"{path}: its sha256 is not the one state.json recorded when it was "
                                        f"written (damaged or changed); delete {self.dir} to start over")  # fmt: skip
        try:
            return SafetensorsFile(path)
        except K2QuantError as e:
            raise CalibrationStateError(f"{e}; delete {self.dir} to start over") from None

    def _read_layer(self, layer: int, stats: CalibStats) -> None:
        name = f"layer-{layer:03d}.safetensors"
        f = self._open_file(name)
        path, prefix = self.dir / name, f"model.layers.{layer}."

        def bad(msg: str) -> CalibrationStateError:
            return CalibrationStateError(f"{path}: {msg}; delete {self.dir} to start over")

        try:
            counts = json.loads(f.metadata.get("counts", ""))
        except (ValueError, RecursionError):
            raise bad("its counts metadata is not JSON") from None
        if not (isinstance(counts, dict) and all(type(v) is int and v >= 0 for v in counts.values())):
            raise bad("its counts metadata is not an object of counts")
        sums: dict[str, torch.Tensor] = {}
        hessians: dict[str, torch.Tensor] = {}
        for key in f.keys():
            kind, _, module = key.partition(".")
            info = f.tensors[key]
            if kind in _LAYER_KEYS and not module:
                want = torch.float64 if kind == "weight_sum" else torch.int64
                if info.dtype != want or info.shape != (self.n_experts,):
                    raise bad(f"{key} is {info.dtype} {list(info.shape)}, not {want} [{self.n_experts}]")
                getattr(stats, kind)[layer] = f.load(key).clone()
            elif kind in ("in_sum2", "hessian") and module.startswith(prefix) and module in counts:
                if info.dtype != torch.float64 or len(info.shape) not in (1, 2) or 0 in info.shape:
                    raise bad(f"{key} is {info.dtype} {list(info.shape)}, not a float64 vector or matrix")
                (sums if kind == "in_sum2" else hessians)[module] = f.load(key).clone()
            else:
                raise bad(f"tensor {key!r} is not a statistic of layer {layer}")
        for module, h in hessians.items():
            n = sums[module].numel() if module in sums else -1
            if h.shape != (n, n):
                raise bad(f"hessian.{module} is {list(h.shape)}, its sums have {n} channels")
        if set(counts) != set(sums):
            raise bad(f"counts and sums name different modules ({sorted(set(counts) ^ set(sums))[0]!r})")
        if not sums:
            raise bad("no statistics")
        if layer in self.moe_layers and not all(layer in getattr(stats, k) for k in _LAYER_KEYS):
            raise bad(f"an MoE layer without all of {', '.join(_LAYER_KEYS)}")
        stats.in_sum2.update(sums)
        stats.counts.update(counts)
        if hessians:
            stats.hessians = {**(stats.hessians or {}), **hessians}

    def _read_hidden(self, layer: int) -> list[torch.Tensor]:
        name = f"hidden-{layer:03d}.safetensors"
        f = self._open_file(name)
        keys = f.keys()
        shapes = [f.tensors[k].shape for k in keys]
        dtypes = {str(f.tensors[k].dtype) for k in keys}
        if keys != [f"h.{j}" for j in range(len(keys))] or shapes != self.hidden_shapes or \
                dtypes != {f.metadata.get("dtype")}:  # fmt: skip
            raise CalibrationStateError(f"{self.dir / name}: not the hidden states of this calibration "
                                        f"({len(keys)} tensors, {self.hidden_shapes[:1]}...); delete {self.dir} "
                                        "to start over")  # fmt: skip
        return [f.load(k).clone() for k in keys]

    # ------------------------------------------------------------------ saving
    def save_layer(self, layer: int, hidden: list[torch.Tensor], stats: CalibStats) -> None:
        """Layer `layer` is done: its statistics, the hidden states after it, then state.json."""
        prefix = f"model.layers.{layer}."
        tensors: dict[str, torch.Tensor] = {}
        for kind in _LAYER_KEYS:
            if layer in getattr(stats, kind):
                tensors[kind] = getattr(stats, kind)[layer]
        mods = sorted(m for m in stats.in_sum2 if m.startswith(prefix))
        for m in mods:
            tensors[f"in_sum2.{m}"] = stats.in_sum2[m]
            if stats.hessians is not None and m in stats.hessians:
                tensors[f"hessian.{m}"] = stats.hessians[m]
        counts = json.dumps({m: stats.counts[m] for m in mods}, sort_keys=True)
        name, hidden_name = f"layer-{layer:03d}.safetensors", f"hidden-{layer:03d}.safetensors"
        old = f"hidden-{layer - 1:03d}.safetensors"
        self.files[name] = write_tensors(self.dir / name, tensors, {"layer": str(layer), "counts": counts})
        self.files[hidden_name] = write_tensors(self.dir / hidden_name, {f"h.{j}": h for j, h in enumerate(hidden)},
                                         {"after_layer": str(layer), "dtype": str(hidden[0].dtype)})  # fmt: skip
        self.files.pop(old, None)
        self._write_state(layer + 1, stats)
        (self.dir / old).unlink(missing_ok=True)

    def _write_state(self, done: int, stats: CalibStats | None = None) -> None:
        state = {"key": self.key, "layers_done": done, "layers": self.layers,
                 "peak_hessian_bytes": stats.peak_hessian_bytes if stats else 0, "files": self.files}  # fmt: skip
        atomic_write(self.dir / STATE_FILE, [(json.dumps(state, indent=2) + "\n").encode("utf-8")])

    def finish(self) -> None:
        """The outputs are written: the state goes, state.json first (a kill midway then leaves a
        directory a new run clears, never a state that names missing files)."""
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
