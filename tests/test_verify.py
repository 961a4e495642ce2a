"""Outputs can be trusted later: the manifest, `k2quant verify`, incomplete outputs refused, a full disk.

Conversions here are mini-K2's FP8 release to the fp8 preset (safetensors: four shards,
every tensor repacked bit-exactly, under a second) and to a q8_0 GGUF split in four
files (rtn, about a second), so a shard-by-shard failure and resume can be shown.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import k2quant.formats.hashed as hashed
from k2quant import CheckpointError, open_checkpoint
from k2quant.cli import main
from k2quant.convert import convert
from k2quant.convert_gguf import convert_gguf
from k2quant.errors import DiskFullError
from k2quant.manifest import JOURNAL, MANIFEST, SUMMARY, ManifestError, read_hashes, verify_dir, verify_hashes
from k2quant.recipe import build_recipe

SPLIT = "15M"  # the q8_0 GGUF of mini-K2 (52 MB) in four files


def _st(src, out, **kw):
    return convert(src, out, build_recipe("fp8"), method="rtn", progress=False, **kw)


def _gguf(src, out, **kw):
    return convert_gguf(src, out, build_recipe("q8_0", target="gguf"), method="rtn", split_max_size=SPLIT,
                        progress=False, **kw)  # fmt: skip


CONVERTERS = {"safetensors": _st, "gguf": _gguf}


@pytest.fixture(scope="module")
def outputs(mini_k2, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted conversion of mini-K2's FP8 release with each converter (the references)."""
    root = tmp_path_factory.mktemp("verify")
    return {kind: (run(mini_k2["fp8"], root / kind), root / kind)[1] for kind, run in CONVERTERS.items()}


def _files(d: Path) -> dict[str, bytes]:
    """Every file's bytes but the summary's (it records times and paths)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != SUMMARY}


def _manifest(d: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((d / MANIFEST).read_text())["files"]}


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy made of hard links: cheap, and safe as long as files are only removed or added, never modified."""
    return Path(shutil.copytree(src, dst, copy_function=os.link))


# ---------------------------------------------------------------------------- the manifest
@pytest.mark.parametrize("kind", CONVERTERS)
def test_manifest_lists_every_file_with_its_real_sha256(outputs, kind):
    """Hashed while written (never read back), yet equal to hashlib over each final file; all files but the summary."""
    d = outputs[kind]
    m = _manifest(d)
    assert set(m) == {p.name for p in d.iterdir()} - {MANIFEST, SUMMARY}
    assert any(n.endswith(".gguf" if kind == "gguf" else ".safetensors") for n in m) and len(m) >= 4
    for name, e in m.items():
        data = (d / name).read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest(), name
    raw = json.loads((d / MANIFEST).read_text())
    assert [e["name"] for e in raw["files"]] == sorted(m) and raw["total_bytes"] == sum(e["size"] for e in m.values())
    assert not (d / JOURNAL).exists() and not list(d.glob("*.tmp"))


def test_same_inputs_give_a_byte_identical_manifest(mini_k2, outputs, tmp_path):
    _st(mini_k2["fp8"], tmp_path / "again")
    assert (tmp_path / "again" / MANIFEST).read_bytes() == (outputs["safetensors"] / MANIFEST).read_bytes()


# ---------------------------------------------------------------------------- verify
@pytest.mark.parametrize("kind", CONVERTERS)
def test_cli_verify_passes_on_a_fresh_output(outputs, kind):
    r = CliRunner().invoke(main, ["verify", str(outputs[kind])])
    assert r.exit_code == 0, r.output
    assert "OK: " in r.output and "(sha256)" in r.output and "note:" not in r.output


@pytest.fixture
def damaged(outputs, tmp_path) -> Path:
    """A real copy of the safetensors output with shard 2 truncated, one byte of shard 3 changed (same size),
    tokenizer_config.json deleted and a file the conversion did not write added."""
    d = Path(shutil.copytree(outputs["safetensors"], tmp_path / "damaged"))
    with open(d / "model-00002-of-00004.safetensors", "r+b") as f:
        f.truncate(1000)
    with open(d / "model-00003-of-00004.safetensors", "r+b") as f:
        f.seek(5_000_000)
        b = f.read(1)
        f.seek(5_000_000)
        f.write(bytes([b[0] ^ 1]))
    (d / "tokenizer_config.json").unlink()
    (d / "notes.txt").write_text("mine")
    return d


def test_verify_names_each_truncated_changed_and_missing_file(damaged):
    r = verify_dir(damaged, progress=False)
    assert not r.ok
    assert [(p.name, p.problem) for p in r.problems] == [
        ("model-00002-of-00004.safetensors", "truncated"),
        ("model-00003-of-00004.safetensors", "changed"),
        ("tokenizer_config.json", "missing"),
    ]
    assert r.unlisted == ["notes.txt"]
    out = CliRunner().invoke(main, ["verify", str(damaged)])
    assert out.exit_code == 1
    for line in ("truncated: model-00002-of-00004.safetensors is 1,000 bytes", "changed: model-00003-of-00004",
                 "missing: tokenizer_config.json", "note: not in k2quant_manifest.json: notes.txt",
                 "FAILED: 3 of 8 file(s)"):  # fmt: skip
        assert line in out.output, out.output
    js = CliRunner().invoke(main, ["verify", str(damaged), "--json"])
    assert js.exit_code == 1
    data = json.loads(js.output)
    assert data["ok"] is False and [p["problem"] for p in data["problems"]] == ["truncated", "changed", "missing"]


def test_quick_finds_truncation_but_not_a_same_size_change(damaged):
    """--quick compares sizes only: it reads no data, so the changed byte in shard 3 passes it (documented)."""
    r = verify_dir(damaged, quick=True, progress=False)
    assert [(p.name, p.problem) for p in r.problems] == [
        ("model-00002-of-00004.safetensors", "truncated"),
        ("tokenizer_config.json", "missing"),
    ]
    out = CliRunner().invoke(main, ["verify", str(damaged), "--quick"])
    assert out.exit_code == 1 and "sizes only" in out.output and "changed" not in out.output


def test_verify_without_a_manifest_says_why(outputs, tmp_path):
    d = _linked_copy(outputs["gguf"], tmp_path / "g")
    (d / MANIFEST).unlink()
    r = CliRunner().invoke(main, ["verify", str(d)])
    assert r.exit_code == 1 and f"{MANIFEST}: not found" in r.output and "--hashes" in r.output


# ---------------------------------------------------------------------------- published hashes
def test_hashes_in_sha256sum_and_json_form(mini_k2, tmp_path):
    src = mini_k2["fp8"]
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    sums = subprocess.run(["sha256sum", *names], cwd=src, capture_output=True, text=True, check=True).stdout
    star = "".join(f"{line[:64]} *{line[66:]}\n" for line in sums.splitlines())  # sha256sum --binary's form
    digests = {line[66:]: line[:64] for line in sums.splitlines()}
    (tmp_path / "SHA256SUMS").write_text("# published with the release\n" + sums)
    (tmp_path / "binary.sums").write_text(star)
    (tmp_path / "hashes.json").write_text(json.dumps(digests))
    for f in ("SHA256SUMS", "binary.sums", "hashes.json"):
        r = verify_hashes(src, tmp_path / f, progress=False)
        assert r.ok and r.files == len(names) and r.unlisted == [], f
    assert read_hashes(tmp_path / "SHA256SUMS") == read_hashes(tmp_path / "hashes.json") == digests
    wrong = dict(digests, **{names[0]: "0" * 64, "model-5-of-4.safetensors": "1" * 64})
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    r = CliRunner().invoke(main, ["verify", str(src), "--hashes", str(tmp_path / "wrong.json")])
    assert r.exit_code == 1
    assert f"changed: {names[0]}" in r.output and "missing: model-5-of-4.safetensors" in r.output
    r = CliRunner().invoke(main, ["verify", str(src), "--hashes", str(tmp_path / "SHA256SUMS"), "--quick"])
    assert r.exit_code == 2 and "--quick" in r.output


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "a/../../b"])
def test_hash_names_must_stay_inside_the_directory(mini_k2, tmp_path, name):
    (tmp_path / "sums").write_text(f"{'a' * 64}  config.json\n{'b' * 64}  {name}\n")
    with pytest.raises(ManifestError, match=r"sums: line 2: file name .* points outside the directory"):
        read_hashes(tmp_path / "sums")
    r = CliRunner().invoke(main, ["verify", str(mini_k2["fp8"]), "--hashes", str(tmp_path / "sums")])
    assert r.exit_code == 1 and "error:" in r.output and "line 2" in r.output
    (tmp_path / "h.json").write_text(json.dumps({name: "c" * 64}))
    with pytest.raises(ManifestError, match=r"h.json: entry .* points outside the directory"):
        read_hashes(tmp_path / "h.json")


# ---------------------------------------------------------------------------- incomplete outputs
def test_open_checkpoint_refuses_an_output_without_its_manifest(mini_k2, outputs, tmp_path):
    assert open_checkpoint(mini_k2["fp8"]).config  # a source checkpoint has neither journal nor summary
    for kind in CONVERTERS:
        assert open_checkpoint(outputs[kind]).config
        d = _linked_copy(outputs[kind], tmp_path / kind)
        (d / MANIFEST).unlink()
        with pytest.raises(CheckpointError, match=f"{d}: an incomplete k2quant conversion.*no {MANIFEST}"):
            open_checkpoint(d)
        if kind == "gguf":  # a file of it, as `k2quant run` takes one
            with pytest.raises(CheckpointError, match="incomplete k2quant conversion"):
                open_checkpoint(next(d.glob("*-00001-of-*.gguf")))


# ---------------------------------------------------------------------------- a full disk
class FullDisk:
    """Stands in for a disk with `free` bytes left: a write past them stores what fits, then fails with ENOSPC.
    `only`: count (and fail) writes to files of this name alone."""

    def __init__(self, free: int, only: str | None = None):
        self.free, self.only = free, only

    def open(self, path: Path):
        return _FullFile(open(path, "wb"), self, self.only is None or path.name == self.only)


class _FullFile:
    def __init__(self, f, disk: FullDisk, counted: bool):
        self._f, self._disk, self._counted = f, disk, counted

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self._counted:
            if len(data) > self._disk.free:
                self._f.write(data[: self._disk.free])
                self._disk.free = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._disk.free -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):  # flush, close, closed, fileno
        return getattr(self._f, name)


def _assert_nothing_looks_complete(out: Path, kind: str, finished: list[str], reference: Path) -> None:
    assert not (out / MANIFEST).exists() and not (out / SUMMARY).exists()
    assert not list(out.glob("*.tmp"))
    ext = ".gguf" if kind == "gguf" else ".safetensors"
    present = sorted(p.name for p in out.glob(f"*{ext}"))
    assert present == finished  # final names hold complete files only ...
    for name in present:  # ... the same bytes as the uninterrupted run's
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    journal = json.loads((out / JOURNAL).read_text())["done"]
    ref = _manifest(reference)
    assert journal == {n: {"size": ref[n]["size"], "sha256": ref[n]["sha256"]} for n in finished}
    with pytest.raises(CheckpointError, match="an unfinished k2quant conversion"):
        open_checkpoint(out)


@pytest.mark.parametrize("kind", CONVERTERS)
def test_disk_full_stops_with_one_error_and_resume_is_byte_identical(mini_k2, outputs, tmp_path, monkeypatch, kind):
    """ENOSPC injected at the file write, 30 MB in: during the third of four shards (13 to 15 MB each)."""
    ref = outputs[kind]
    shards = sorted(n for n in _manifest(ref) if n.endswith((".gguf", ".safetensors")))
    out = tmp_path / "out"
    monkeypatch.setattr(hashed, "_open_raw", FullDisk(30_000_000).open)
    with pytest.raises(DiskFullError, match=rf"{out / shards[2]}: disk full: no space left") as e:
        CONVERTERS[kind](mini_k2["fp8"], out)
    assert "--resume" in str(e.value)
    assert str(pickle.loads(pickle.dumps(e.value))) == str(e.value)  # as a worker process hands it back
    _assert_nothing_looks_complete(out, kind, shards[:2], ref)
    monkeypatch.undo()  # space freed
    CONVERTERS[kind](mini_k2["fp8"], out, resume=True)
    assert _files(out) == _files(ref)  # shards, small files and the manifest: hashes of the earlier shards kept
    assert verify_dir(out, progress=False).ok


@pytest.mark.parametrize("kind", CONVERTERS)
def test_disk_full_at_the_manifest_leaves_no_summary(mini_k2, outputs, tmp_path, monkeypatch, kind):
    """The last write fails: every shard is done, yet neither summary nor manifest is left to look complete."""
    out = tmp_path / "out"
    monkeypatch.setattr(hashed, "_open_raw", FullDisk(100, only=MANIFEST + ".tmp").open)
    with pytest.raises(DiskFullError, match=f"{out / MANIFEST}: disk full"):
        CONVERTERS[kind](mini_k2["fp8"], out)
    shards = sorted(n for n in _manifest(outputs[kind]) if n.endswith((".gguf", ".safetensors")))
    _assert_nothing_looks_complete(out, kind, shards, outputs[kind])
    monkeypatch.undo()
    CONVERTERS[kind](mini_k2["fp8"], out, resume=True)
    assert _files(out) == _files(outputs[kind])


def test_resume_from_a_journal_without_hashes(mini_k2, outputs, tmp_path, monkeypatch):
    """A journal of an older k2quant (sizes only): the finished shards are hashed once and kept, not redone."""
    out = tmp_path / "out"
    monkeypatch.setattr(hashed, "_open_raw", FullDisk(30_000_000).open)
    with pytest.raises(DiskFullError):
        _st(mini_k2["fp8"], out)
    monkeypatch.undo()
    j = json.loads((out / JOURNAL).read_text())
    j["done"] = {n: e["size"] for n, e in j["done"].items()}
    (out / JOURNAL).write_text(json.dumps(j))
    first = (out / "model-00001-of-00004.safetensors").stat().st_mtime_ns
    _st(mini_k2["fp8"], out, resume=True)
    assert (out / "model-00001-of-00004.safetensors").stat().st_mtime_ns == first
    assert _files(out) == _files(outputs["safetensors"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="mounting a small tmpfs needs root")  # fmt: skip
@pytest.mark.parametrize("kind", CONVERTERS)
def test_real_full_filesystem_then_resume(mini_k2, outputs, tmp_path, kind):
    """A 30 MiB tmpfs fills during the third shard (13 to 15 MB each); grown to 96 MiB (space freed), --resume
    finishes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        out = disk / "out"
        ref = outputs[kind]
        shards = sorted(n for n in _manifest(ref) if n.endswith((".gguf", ".safetensors")))
        with pytest.raises(DiskFullError, match=rf"{out / shards[2]}: disk full"):
            CONVERTERS[kind](mini_k2["fp8"], out)
        _assert_nothing_looks_complete(out, kind, shards[:2], ref)
        subprocess.run(["mount", "-o", "remount,size=96m", str(disk)], check=True)
        CONVERTERS[kind](mini_k2["fp8"], out, resume=True)
        assert _files(out) == _files(ref)
        assert verify_dir(out, progress=False).ok
    finally:
        if subprocess.run(["umount", str(disk)]).returncode:
            subprocess.run(["umount", "-l", str(disk)])
