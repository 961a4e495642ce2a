"""The command line: inspect output (text and JSON), clean errors, help with examples."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys

from click.testing import CliRunner

from k2quant.cli import main


def test_inspect_json_counts(tiny_fp8_dir, tiny_hf):
    model, state, _ = tiny_hf
    r = CliRunner().invoke(main, ["inspect", str(tiny_fp8_dir), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["params"] == sum(t.numel() for t in state.values())
    assert info["shards"] == 12 and info["quantization"] == "fp8"
    comps = info["components"]
    routed = sum(t.numel() for n, t in state.items() if ".experts." in n)
    assert comps["routed_experts"]["params"] == routed
    # FP8: 8 bits plus one float32 scale per (at most) 128x128 block
    assert 8.0 < comps["routed_experts"]["bits_per_weight"] < 8.1
    assert comps["embeddings"]["bits_per_weight"] == 16.0
    assert set(comps["router"]["storage"]) == {"bfloat16", "float32"}


def test_inspect_text(tiny_fp8_dir):
    r = CliRunner().invoke(main, ["inspect", str(tiny_fp8_dir)])
    assert r.exit_code == 0
    assert "routed_experts" in r.output and "float8_e4m3fn block 128x128" in r.output


def test_bad_checkpoint_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"error: {tmp_path / 'config.json'}: config field 'model_type': "
        "unknown architecture 'llama'; k2quant reads kimi_k2, deepseek_v3"
    ]


def test_help_has_examples():
    r = CliRunner().invoke(main, ["--help"])
    assert "Examples" in r.output and "inspect" in r.output and "demo" in r.output


def test_demo_interrupted_prints_the_command_that_goes_on(tmp_path):
    """SIGTERM while the demo builds mini-K2: exit 143, and the last line is the command that resumes (the demo
    itself: each step keeps what it finished and is resumed where it stopped)."""
    out = tmp_path / "demo dir"
    p = subprocess.Popen([sys.executable, "-m", "k2quant", "demo", "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert p.stdout.readline().startswith("== 1. mini-K2"), p.communicate()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in err, err
    assert shlex.split(err.strip().splitlines()[-1]) == ["k2quant", "demo", "--out", str(out)], err
