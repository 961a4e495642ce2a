"""The manifest of a finished conversion, and checking a directory against it or against published hashes.

Both converters end with `seal`: the summary, then `k2quant_manifest.json` (every output
file's name, size and sha256) as the last file written; only the journal's removal
follows. A directory that holds k2quant's journal or summary but no manifest is an
incomplete conversion: `check_complete` (called by open_checkpoint, which the runner and
diff use) refuses it, while a source checkpoint, which has neither file, opens as before.

No output is read back to hash it. Every file goes through formats/hashed.py's
HashingFile as it is written: the shards (SafetensorsWriter, the GGUF writer), the JSON
files (config.json, the index) and the small files copied from the source (tokenizer
files), which are copied through it too. The summary (k2quant_convert.json) is the one
file not listed: it records times and paths, which differ run to run, and the manifest
must be byte-identical for identical inputs (entries sorted by name, no timestamps).

`verify_dir` re-reads an output and names each file missing, truncated (or grown) or
changed, plus files present but not listed (a note, not a failure); `quick` compares
sizes only, so a same-size change passes it. `verify_hashes` checks a source directory
against published hashes (sha256sum lines or a JSON object of name -> sha256).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from k2quant.formats.hashed import WrittenFile, atomic_write
from k2quant.formats.hf import write_json

from .errors import CheckpointError, K2QuantError

MANIFEST = "k2quant_manifest.json"
JOURNAL = ".k2quant-convert.journal.json"  # the converters' record of finished files (convert.py)
SUMMARY = "k2quant_convert.json"
FORMAT = "k2quant-manifest"
VERSION = 1
UNLISTED = {SUMMARY: "the run's summary: times and paths differ from run to run"}
_HEX = re.compile(r"[0-9a-f]{64}")


class ManifestError(K2QuantError):
    """A manifest or hashes file is missing, malformed or names a file outside its directory."""


@dataclass(frozen=True)
class FileEntry:
    """One output file as written: name relative to the output directory, size, sha256."""

    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, written: WrittenFile, root: Path) -> FileEntry:
        return cls(written.path.relative_to(root).as_posix(), written.size, written.sha256)


@dataclass
class Manifest:
    path: Path
    files: list[FileEntry]
    unlisted: dict[str, str] = field(default_factory=dict)  # files deliberately not listed -> why

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class FileProblem:
    """What is wrong with one file: 'missing', 'truncated', 'grown' (size differs) or 'changed' (sha256 differs)."""

    name: str
    problem: str
    expected_size: int | None = None
    actual_size: int | None = None
    expected_sha256: str | None = None
    actual_sha256: str | None = None

    def describe(self) -> str:
        if self.problem == "missing":
            return f"missing: {self.name}"
        if self.problem in ("truncated", "grown"):
            return f"{self.problem}: {self.name} is {self.actual_size:,} bytes, expected {self.expected_size:,}"
        return f"changed: {self.name} has sha256 {self.actual_sha256}, expected {self.expected_sha256}"


@dataclass
class VerifyResult:
    """The outcome of `k2quant verify`: ok when no listed file is missing, resized or changed."""

    directory: str
    against: str  # the manifest or hashes file
    quick: bool  # sizes only
    files: int  # files listed
    bytes: int  # bytes checked (read and hashed unless quick)
    problems: list[FileProblem]
    unlisted: list[str]  # present in the directory, not listed: a note

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


# ---------------------------------------------------------------------------- writing
def write_manifest(out: Path, entries: list[FileEntry]) -> WrittenFile:
    """Write the manifest of `entries` (sorted by name; deterministic bytes)."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names) or MANIFEST in names:
        raise ManifestError(f"{out / MANIFEST}: duplicate or reserved names in {sorted(names)}")
    body = {
        "format": FORMAT,
        "version": VERSION,
        "total_bytes": sum(e.size for e in entries),
        "files": [asdict(e) for e in sorted(entries, key=lambda e: e.name)],
        "unlisted": UNLISTED,
    }
    return atomic_write(out / MANIFEST, [(json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8")])


def seal(out: Path, entries: list[FileEntry], summary: dict) -> None:
    """End a conversion: the summary, the manifest last, then drop the journal. Should the manifest
    not be written (a full disk), the summary is removed again: nothing is left that looks complete."""
    write_json(out / SUMMARY, summary)
    try:
        write_manifest(out, entries)
    except BaseException:
        (out / SUMMARY).unlink(missing_ok=True)
        raise
    (out / JOURNAL).unlink(missing_ok=True)


def check_complete(path: str | Path) -> None:
    """Refuse a k2quant output whose conversion did not finish (its journal or summary, no manifest)."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    if (d / MANIFEST).is_file():
        return
    if (d / JOURNAL).exists():
        raise CheckpointError(f"an unfinished k2quant conversion: no {MANIFEST}, which a conversion writes last; "
                              "finish it with the same k2quant convert command and --resume", str(d))  # fmt: skip
    if (d / SUMMARY).exists():
        raise CheckpointError(f"an incomplete k2quant conversion: {SUMMARY} but no {MANIFEST}, which a conversion "
                              "writes last (it stopped before the end, or an older k2quant wrote it); convert again "
                              "into an empty directory", str(d))  # fmt: skip


# ---------------------------------------------------------------------------- reading
def _safe_name(name: object, where: str) -> str:
    """A file name relative to the directory checked: no absolute path, no '..', nothing empty."""
    if not isinstance(name, str) or not name.strip():
        raise ManifestError(f"{where}: bad file name {name!r}")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in p.parts:
        raise ManifestError(f"{where}: file name {name!r} points outside the directory (absolute or '..')")
    return p.as_posix()


def _sha(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value.lower()):
        raise ManifestError(f"{where}: {value!r} is not a sha256 (64 hex digits)")
    return value.lower()


def read_manifest(d: str | Path) -> Manifest:
    d = Path(d)
    path = d / MANIFEST
    if not path.is_file():
        why = (f"a k2quant conversion that did not finish ({JOURNAL} is there)" if (d / JOURNAL).exists()
               else "not a finished k2quant output; a source checkpoint is checked with --hashes FILE")  # fmt: skip
        raise ManifestError(f"{path}: not found: {why}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), list):
        raise ManifestError(f"{path}: not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise ManifestError(f"{path}: version {data.get('version')!r}; this k2quant reads version {VERSION}")
    files = []
    for i, e in enumerate(data["files"]):
        where = f"{path}: files[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("size"), int) or e["size"] < 0:
            raise ManifestError(f"{where}: expected name, size and sha256")
        files.append(FileEntry(_safe_name(e.get("name"), where), e["size"], _sha(e.get("sha256"), where)))
    unlisted = data.get("unlisted") if isinstance(data.get("unlisted"), dict) else {}
    return Manifest(path, files, unlisted)


def read_hashes(path: str | Path) -> dict[str, str]:
    """Published hashes, name -> sha256: `sha256sum` output ('<hex>  <name>' or '<hex> *<name>', '#' comments)
    or a JSON object mapping names to sha256. Names must stay inside the directory checked."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the hashes file ({e})") from None
    out: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object of file name -> sha256")
        for name, sha in data.items():
            where = f"{path}: entry {name!r}"
            out[_safe_name(name, where)] = _sha(sha, where)
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}: line {n}"
            escaped = line.startswith("\\")  # sha256sum escapes names holding '\' or a newline
            m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line[escaped:].rstrip("\r"))
            if not m:
                raise ManifestError(f"{where}: expected '<sha256>  <name>' (sha256sum's format)")
            name = m.group(2)
            if escaped:
                name = name.replace("\\n", "\n").replace("\\\\", "\\")
            out[_safe_name(name, where)] = m.group(1).lower()
    if not out:
        raise ManifestError(f"{path}: no hashes in it")
    return out


# ---------------------------------------------------------------------------- verifying
def hash_file(path: Path, bar: tqdm | None = None) -> str:
    """A file's sha256, read in 16 MB pieces (shards and Hessian files run to many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


def _present(d: Path, skip: set[str]) -> list[str]:
    return sorted(n for p in d.rglob("*") if p.is_file() and (n := p.relative_to(d).as_posix()) not in skip)


def _check(d: Path, against: str, expected: list[tuple[str, int | None, str]], skip: set[str], quick: bool,
           progress: bool) -> VerifyResult:  # fmt: skip
    """Each (name, size or None, sha256) against the file in `d`; sizes first, then the data of right-sized files."""
    problems: list[FileProblem] = []
    to_hash: list[tuple[str, int, str]] = []
    for name, size, sha in expected:
        p = d / name
        if not p.is_file():
            problems.append(FileProblem(name, "missing", size, None, sha))
            continue
        actual = p.stat().st_size
        if size is not None and actual != size:
            problems.append(FileProblem(name, "truncated" if actual < size else "grown", size, actual, sha))
        else:
            to_hash.append((name, actual, sha))
    checked = sum(s for _, s, _ in to_hash)
    if quick:
        to_hash = []
    if to_hash:
        bar = tqdm(total=sum(s for _, s, _ in to_hash), unit="B", unit_scale=True, unit_divisor=1024,
                   desc="verifying", disable=not progress)  # fmt: skip
        try:
            for name, size, sha in to_hash:
                got = hash_file(d / name, bar)
                if got != sha:
                    problems.append(FileProblem(name, "changed", size, size, sha, got))
        finally:
            bar.close()
    order = {name: i for i, (name, _, _) in enumerate(expected)}
    problems.sort(key=lambda p: order[p.name])
    listed = {name for name, _, _ in expected}
    unlisted = [n for n in _present(d, skip) if n not in listed]
    return VerifyResult(str(d), against, quick, len(expected), checked, problems, unlisted)


def verify_dir(d: str | Path, quick: bool = False, progress: bool = True) -> VerifyResult:
    """Check a k2quant output against its manifest (quick: sizes only, no data read)."""
    d = Path(d)
    m = read_manifest(d)
    expected = [(f.name, f.size, f.sha256) for f in m.files]
    return _check(d, str(m.path), expected, {MANIFEST, *m.unlisted}, quick, progress)


def verify_hashes(d: str | Path, hashes: str | Path, progress: bool = True) -> VerifyResult:
    """Check the files of a source directory against published hashes (every byte is read)."""
    d, hashes = Path(d), Path(hashes)
    expected = [(name, None, sha) for name, sha in sorted(read_hashes(hashes).items())]
    inside = hashes.resolve().is_relative_to(d.resolve())
    skip = {hashes.resolve().relative_to(d.resolve()).as_posix()} if inside else set()  # the hashes file itself
    return _check(d, str(hashes), expected, skip, False, progress)


def format_verify(r: VerifyResult) -> str:
    lines = [p.describe() for p in r.problems]
    lines += [f"note: not in {Path(r.against).name}: {n}" for n in r.unlisted]
    how = "sizes only (--quick reads no data: a same-size change passes)" if r.quick else "sha256"
    if r.ok:
        lines.append(f"OK: {r.files} file(s), {r.bytes / 1e9:.3f} GB in {r.directory} match {r.against} ({how})")
    else:
        kinds: dict[str, int] = {}
        for p in r.problems:
            kinds[p.problem] = kinds.get(p.problem, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in kinds.items())
        lines.append(f"FAILED: {len(r.problems)} of {r.files} file(s) in {r.directory} do not match {r.against} "
                     f"({what}; checked: {how})")  # fmt: skip
    return "\n".join(lines)
