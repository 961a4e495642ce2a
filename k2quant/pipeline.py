"""What both converters share: the output directory's lifecycle and the work around the encoders.

`convert` (compressed-tensors safetensors) and `convert_gguf` (llama.cpp GGUF) differ in what
they plan and how they lay out bytes; everything else is here, once: the refusal of an output
directory that is not theirs, the journal of finished files (size and sha256) that `--resume`
trusts, the plan's fingerprint and the settings a refused resume names, the pinned importance
file, the pool of worker processes (stopped at once on an interrupt), and the summary's totals.
The manifest that seals a finished output is manifest.py's.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

from k2quant.formats.hf import write_json
from k2quant.formats.imatrix import read_imatrix

from .errors import K2QuantError
from .manifest import JOURNAL, MANIFEST, SUMMARY, FileEntry, hash_file


class ConvertError(K2QuantError):
    pass


def fingerprint_of(pinned: dict, version: int) -> str:
    """The digest of what an output depends on, with its converter's format version."""
    return hashlib.sha256(json.dumps({"v": version, "plan": pinned}, sort_keys=True).encode()).hexdigest()


def settings_of(pinned: dict) -> dict[str, str]:
    """A plan's pinned fields one by one, kept in the journal so that a refused --resume can name what
    changed: a short field as its JSON, a long one (the recipe, the shards) as a digest."""
    out = {}
    for k, v in sorted(pinned.items()):
        text = json.dumps(v, sort_keys=True)
        out[k] = text if len(text) <= 80 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def _worker_start(initializer, initargs: tuple) -> None:
    """In each worker: SIGINT is the parent's to handle (Ctrl-C reaches the whole process group; the
    parent stops the workers and prints the resume command), then the pool's own initializer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


@contextmanager
def worker_pool(workers: int, initializer=None, initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` spawned processes. When the run is interrupted (SIGINT / SIGTERM reach this
    process as KeyboardInterrupt, k2quant/cli.py) or fails, the pool's workers are terminated at once
    rather than waited for: a shard in flight is only a .tmp file, and --resume does it again."""
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_start,
                               initargs=(initializer, initargs))  # fmt: skip
    try:
        yield pool
    except BaseException:
        procs = list((pool._processes or {}).values())  # the pool's own workers (CPython keeps them there)
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=10)
        raise
    pool.shutdown(wait=True)


def prepare_out(out: Path, fingerprint: str, resume: bool, settings: dict[str, str] | None = None
                 ) -> dict[str, FileEntry]:  # fmt: skip
    """Check the output directory; return the journal's finished shards (file -> size and sha256).

    A shard whose size differs from the journal's is done again; one from a journal written
    before the journal kept hashes (size only) is hashed here, once. `settings` (settings_of)
    go into a new journal; a resume whose fingerprint differs names the settings that changed."""
    journal = out / JOURNAL
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if journal.exists():
        if not resume:
            raise ConvertError(f"{out}: holds an unfinished conversion; pass --resume to finish it")
        data = _read_journal(journal)
        if data.get("fingerprint") != fingerprint:
            named = _changed_settings(data.get("settings") or {}, settings or {})
            raise ConvertError(f"{out}: the unfinished conversion there used other inputs or settings"
                               f"{f' ({named})' if named else ''}; run again with them, or start again in an "
                               "empty directory")  # fmt: skip
        done = {}
        for f, e in data.get("done", {}).items():
            size, sha = (e, None) if isinstance(e, int) else (e["size"], e.get("sha256"))
            try:
                found = (out / f).is_file() and (out / f).stat().st_size == size
            except OSError:  # a name too long for the file system: not a finished shard
                found = False
            if found:
                done[f] = FileEntry(f, size, sha or hash_file(out / f))
        for p in out.glob("*.tmp"):
            p.unlink()
        return done
    if entries:
        if (out / SUMMARY).exists() or (out / MANIFEST).exists():
            raise ConvertError(f"{out}: already holds a finished conversion")
        raise ConvertError(f"{out}: is not empty and was not created by k2quant convert")
    out.mkdir(parents=True, exist_ok=True)
    write_json(journal, {"fingerprint": fingerprint, "settings": settings or {}, "done": {}})
    return {}


def _changed_settings(old: dict[str, str], new: dict[str, str]) -> str:
    """The settings (settings_of) that differ: a short one with both values, a digested one by name."""
    if not old:
        return "its journal, from an older k2quant, does not say which"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    digested = lambda v: v is not None and v.startswith("sha256:")  # noqa: E731
    return "; ".join(k if digested(old.get(k)) or digested(new.get(k)) else f"{k}: {old.get(k)} then, {new.get(k)} now"
                     for k in changed)  # fmt: skip


def _read_journal(journal: Path) -> dict:
    """An unfinished conversion's journal, checked: {"fingerprint": ..., "done": {file name: {"size": int,
    "sha256": str} or a size}}. Anything else (a write cut short, an edit) is a ConvertError naming it."""

    def bad(why: str) -> ConvertError:
        return ConvertError(f"{journal}: not a k2quant convert journal ({why}); start again in an empty directory")

    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an int of 5000 digits
        raise bad(str(e)) from None
    done = data.get("done", {}) if isinstance(data, dict) else None
    if not isinstance(done, dict):
        raise bad("not an object with a 'done' object")
    settings = data.get("settings", {})
    if not (isinstance(settings, dict) and all(isinstance(v, str) for v in settings.values())):
        raise bad("'settings' is not an object of strings")
    for f, e in done.items():
        size = e if isinstance(e, int) else e.get("size") if isinstance(e, dict) else None
        sha = e.get("sha256") if isinstance(e, dict) else None
        if Path(f).name != f or f in (".", ".."):  # a file of the output directory, never a path out of it
            raise bad(f"shard {f!r} is not a file name")
        if type(size) is not int or size < 0 or not isinstance(sha, str | None):
            raise bad(f"shard {f!r}: expected a size and a sha256")
    return data


def record(out: Path, fingerprint: str, done: dict[str, FileEntry], settings: dict[str, str] | None = None) -> None:
    files = {f: {"size": e.size, "sha256": e.sha256} for f, e in sorted(done.items())}
    write_json(out / JOURNAL, {"fingerprint": fingerprint, "settings": settings or {}, "done": files})


def pin_imatrix(plan, imatrix: str | Path | None) -> None:
    """Validate the importance file before any work and fold its content into the plan's fingerprint."""
    if imatrix is None:
        return
    imatrix = Path(imatrix)
    if not imatrix.is_file():
        raise ConvertError(f"{imatrix}: importance file not found")
    read_imatrix(imatrix, set())
    plan.imatrix = str(imatrix.resolve())
    plan.imatrix_sha256 = hash_file(imatrix)


def size_totals(rows: list[tuple[str, str, int, int, int]], seconds: float) -> dict:
    """Summary numbers from (component, scheme or type, params, bytes, source bytes) per output tensor:
    totals, bits per weight overall and by component, throughput. Shared by both output formats."""
    comps: dict[str, dict] = {}
    for comp, scheme, params, nbytes, _ in rows:
        c = comps.setdefault(comp, {"params": 0, "bytes": 0, "schemes": {}})
        c["params"] += params
        c["bytes"] += nbytes
        c["schemes"][scheme] = c["schemes"].get(scheme, 0) + params
    for c in comps.values():
        c["bits_per_weight"] = round(8 * c["bytes"] / c["params"], 3)
    params = sum(r[2] for r in rows)
    size = sum(r[3] for r in rows)
    src = sum(r[4] for r in rows)
    return {
        "params": params,
        "source_bytes": src,
        "bytes": size,
        "bits_per_weight": round(8 * size / params, 3),
        "components": comps,
        "seconds": round(seconds, 2),
        "source_gb_per_s": round(src / max(seconds, 1e-9) / 1e9, 4),
    }
