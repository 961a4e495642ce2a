"""`k2quant diff`'s resumable state: what a finished batch of chunks leaves on disk, and how a run picks it up.

`run_diff` evaluates the chunks a batch at a time, through every layer of both models, and
adds each batch's numbers to running sums (per-layer squared errors and cosines, router
agreement, expert counts) and per-token lists (NLL, KLD, top-1, delta p). After each batch
those go into `OUT/.k2quant-diff/`:

- `progress-NNNNNN.safetensors`: every running sum and per-token tensor after NNNNNN batches
  (float64, as they are);
- `state.json`: the run's key (both models, the tokens, the options, torch's version and thread
  count) and the batches done, with the progress file's sha256.

The progress file is written under a temporary name, fsynced and renamed, then state.json
names it, then the previous one is deleted, so a SIGKILL at any point leaves a state that
names a complete file. A resumed run reads the sums back bit for bit and goes on with the next
batch: its metrics.json is byte-identical to an uninterrupted run's. (The last phase, each
tensor's weight error, is not checkpointed: a run stopped there does it again.) The key is
compared field by field, and a changed model, data or option is refused with the difference
named. The files are read as untrusted (a crashed run leaves them; a user may edit them): a bad
one raises DiffStateError naming it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from k2quant.calib.resume import RUN_FIELDS, key_difference, run_key, source_key
from k2quant.errors import K2QuantError
from k2quant.formats.hashed import atomic_write
from k2quant.formats.safetensors_file import SafetensorsFile, write_tensors
from k2quant.manifest import hash_file

STATE_DIR = ".k2quant-diff"
STATE_FILE = "state.json"
LAYER_SUMS = ("teacher_err2", "free_err2", "ref2", "teacher_cos", "free_cos", "route_total", "route_agree")
TOKEN_KEYS = ("nll_ref", "nll_cand", "kld", "same_top", "delta_p")  # metrics.token_quantities' outputs


class DiffStateError(K2QuantError):
    """An unfinished diff's state that cannot be used; names the file or the difference."""


@dataclass
class DiffProgress:
    """The running numbers after `batches` batches: per-layer sums [layers] (LAYER_SUMS), expert
    counts [layers, experts], vectors seen, and the per-token tensors so far (TOKEN_KEYS)."""

    batches: int
    layer: dict[str, torch.Tensor]
    expert_counts: torch.Tensor
    n_vec: int
    per_token: dict[str, torch.Tensor]

    @classmethod
    def start(cls, layers: int, experts: int) -> DiffProgress:
        empty = torch.zeros(0, dtype=torch.float64)
        return cls(0, {k: torch.zeros(layers, dtype=torch.float64) for k in LAYER_SUMS},
                   torch.zeros(layers, experts, dtype=torch.float64), 0, {k: empty for k in TOKEN_KEYS})  # fmt: skip


def model_key(path: Path) -> str:
    """A cheap digest of a model: a checkpoint directory's config, tokenizer and shard headers
    (calib.resume.source_key), or a single file's name, size and first MiB (a GGUF)."""
    path = Path(path)
    if path.is_dir():
        return source_key(path, sorted([*path.glob("*.safetensors"), *path.glob("*.gguf")]))
    return source_key(path.parent, [path])


def diff_key(ref: Path, cand: Path, tokens: torch.Tensor, options: dict[str, object]) -> dict[str, object]:
    """What a diff state was made from (calib.resume.run_key with both models' digests)."""
    return run_key({"reference": model_key(ref), "candidate": model_key(cand)}, tokens, options)


_FIELD_NAMES = {**RUN_FIELDS,
                "reference": "its reference model (config, tokenizer or a shard's size or header)",
                "candidate": "its candidate model (config, tokenizer or a file's size or header)",
                "tokens_digest": "its evaluation tokens (the --data files)"}  # fmt: skip


class DiffState:
    """OUT/.k2quant-diff for one run: `open` checks it (or starts it), `save` after each batch,
    `finish` once the report is written."""

    def __init__(self, out: Path, key: dict[str, object], layers: int, experts: int, batches: int):
        self.dir = Path(out) / STATE_DIR
        self.key, self.layers, self.experts, self.batches = key, layers, experts, batches
        self.file: tuple[str, str] | None = None  # the current progress file and its sha256

    def open(self, resume: bool) -> DiffProgress:
        """A new state (nothing done), or what the unfinished run left (with `resume`); without
        `resume` an unfinished run in OUT is refused rather than overwritten."""
        state_file = self.dir / STATE_FILE
        if not state_file.exists():
            if self.dir.exists():  # killed before its first state.json: nothing worth keeping
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self._write_state(0)
            return DiffProgress.start(self.layers, self.experts)
        state = self._read_state(state_file)
        done = state["batches_done"]
        if not resume:
            raise DiffStateError(f"{self.dir.parent}: holds an unfinished diff ({done} of {self.batches} batches "
                                 f"done); pass --resume to finish it, or delete {self.dir} to start over")  # fmt: skip
        self._check_key(state["key"], state_file)
        self.file = (state["file"], state["sha256"]) if done else None
        for p in self.dir.iterdir():  # a kill between two writes leaves a newer or an older progress file
            if p.name not in (STATE_FILE, state["file"]) and p.is_file():
                p.unlink()
        return self._read_progress(done) if done else DiffProgress.start(self.layers, self.experts)

    def _bad(self, path: Path, msg: str) -> DiffStateError:
        return DiffStateError(f"{path}: {msg}; delete {self.dir} to start over")

    def _read_state(self, path: Path) -> dict:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._bad(path, f"unreadable ({e})") from None
        ok = (
            isinstance(state, dict)
            and isinstance(state.get("key"), dict)
            and type(state.get("batches_done")) is int
            and 0 <= state["batches_done"] <= self.batches
            and all(isinstance(state.get(k), str) for k in ("file", "sha256"))
            and (state["file"] == "" or state["file"] == _progress_name(state["batches_done"]))
        )
        if not ok:
            raise self._bad(path, f"not a k2quant diff state of {self.batches} batches")
        return state

    def _check_key(self, saved: dict, path: Path) -> None:
        what = key_difference(saved, self.key, _FIELD_NAMES, ("reference", "candidate", "tokens_digest"))
        if what is not None:
            raise DiffStateError(
                f"{self.dir.parent}: the unfinished diff there ({path}) differs from this run in "
                f"{what}; run again with its inputs and options, or delete {self.dir} to start over"
            )

    def _read_progress(self, done: int) -> DiffProgress:
        name, sha = self.file
        path = self.dir / name
        try:
            got = hash_file(path)
        except OSError as e:
            raise self._bad(path, f"cannot be read ({e.strerror})") from None
        if got != sha:
            raise self._bad(path, "its sha256 is not the one state.json recorded when it was written")
        try:
            f = SafetensorsFile(path)
        except K2QuantError as e:
            raise DiffStateError(f"{e}; delete {self.dir} to start over") from None
        shapes = {f"layer.{k}": (self.layers,) for k in LAYER_SUMS} | {"expert_counts": (self.layers, self.experts)}
        tokens = [f"token.{k}" for k in TOKEN_KEYS]
        ok = set(f.keys()) == set(shapes) | set(tokens) and all(f.tensors[k].dtype == torch.float64 for k in f.keys())
        ok = ok and all(f.tensors[k].shape == s for k, s in shapes.items())
        ok = ok and len({f.tensors[k].shape for k in tokens}) == 1 and len(f.tensors[tokens[0]].shape) == 1
        if not ok:
            raise self._bad(path, f"not the progress of this diff (float64 {', '.join([*shapes, *tokens])}; "
                                  f"[{self.layers}] per layer, [{self.layers}, {self.experts}] expert counts, "
                                  "one length per token)")  # fmt: skip
        try:
            n_vec = int(f.metadata.get("n_vec", ""))
        except ValueError:
            raise self._bad(path, "its n_vec metadata is not a count") from None
        if n_vec < 0:
            raise self._bad(path, "its n_vec metadata is negative")
        layer = {k: f.load(f"layer.{k}").clone() for k in LAYER_SUMS}
        tokens_so_far = {k: f.load(f"token.{k}").clone() for k in TOKEN_KEYS}
        return DiffProgress(done, layer, f.load("expert_counts").clone(), n_vec, tokens_so_far)

    def save(self, p: DiffProgress) -> None:
        """Batch `p.batches` is done: its progress file, then state.json naming it, then the old one goes."""
        tensors = {f"layer.{k}": v for k, v in p.layer.items()} | {"expert_counts": p.expert_counts}
        tensors |= {f"token.{k}": v.contiguous() for k, v in p.per_token.items()}
        name = _progress_name(p.batches)
        old = self.file
        self.file = (name, write_tensors(self.dir / name, tensors, {"n_vec": str(p.n_vec)}))
        self._write_state(p.batches)
        if old is not None and old[0] != name:
            (self.dir / old[0]).unlink(missing_ok=True)

    def _write_state(self, done: int) -> None:
        name, sha = self.file or ("", "")
        state = {"key": self.key, "batches_done": done, "batches": self.batches, "file": name, "sha256": sha}
        atomic_write(self.dir / STATE_FILE, [(json.dumps(state, indent=2) + "\n").encode("utf-8")])

    def finish(self) -> None:
        """The report is written: the state goes, state.json first."""
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _progress_name(batches: int) -> str:
    return f"progress-{batches:06d}.safetensors"
