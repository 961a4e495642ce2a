"""k2quant diff: llama-perplexity's statistics, exact zero on self-diff, a sensible INT4 report, bounded memory."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from k2quant import K2QuantError
from k2quant.cli import main
from k2quant.report.diff import run_diff
from k2quant.report.diff_state import STATE_DIR as DIFF_STATE_DIR
from k2quant.report.metrics import summarize, token_quantities
from k2quant.synthetic import k2_config_dict, write_synthetic_checkpoint

from .conftest import SMALL, assert_peak_rss_independent_of_size, wait_for_state


def _direct(ref: np.ndarray, cand: np.ndarray, tgt: np.ndarray) -> dict:
    """llama-perplexity's definitions (tools/perplexity/perplexity.cpp), written out plainly in numpy."""

    def logsoftmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    lr, lc = logsoftmax(ref.astype(np.float64)), logsoftmax(cand.astype(np.float64))
    n = len(tgt)
    nll_r, nll_c = -lr[np.arange(n), tgt], -lc[np.arange(n), tgt]
    kld = np.array([sum(math.exp(a) * (a - b) for a, b in zip(lr[i], lc[i], strict=True) if a > -16) for i in range(n)])

    def mu(x):
        f = x.mean()
        return f, math.sqrt((np.mean(x * x) - f * f) / (n - 1))

    def pct(x, p):
        s = np.sort(x)
        pos = p * (n - 1)
        lo = int(pos)
        return s[lo] + (s[min(lo + 1, n - 1)] - s[lo]) * (pos - lo)

    same = float(np.mean(ref.argmax(-1) == cand.argmax(-1)))
    dp = np.exp(-nll_c) - np.exp(-nll_r)
    ma, ua = mu(nll_c)
    mb, ub = mu(nll_r)
    cov = (np.mean(nll_c * nll_r) - ma * mb) / (n - 1)
    return {
        "ppl_ref": math.exp(mb), "ppl_cand": math.exp(ma), "ratio": math.exp(ma - mb),
        "ratio_unc": math.exp(ma - mb) * math.sqrt(ua**2 + ub**2 - 2 * cov),
        "kld_mean": mu(kld)[0], "kld_stderr": mu(kld)[1], "median": pct(kld, 0.5), "p90": pct(kld, 0.9),
        "p99": pct(kld, 0.99), "p999": pct(kld, 0.999), "max": kld.max(), "same": same,
        "same_unc": math.sqrt(same * (1 - same) / (n - 1)), "dp_mean": dp.mean(), "dp_rms": math.sqrt(np.mean(dp**2)),
    }  # fmt: skip


def test_statistics_follow_llama_perplexity():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 50, generator=g) * 4
    cand = ref + torch.randn(300, 50, generator=g) * 0.7
    tgt = torch.randint(0, 50, (300,), generator=g)
    m = summarize(token_quantities(ref, cand, tgt))
    d = _direct(ref.numpy(), cand.numpy(), tgt.numpy())
    got = {
        "ppl_ref": m["ppl"]["ref"], "ppl_cand": m["ppl"]["cand"], "ratio": m["ppl"]["ratio"],
        "ratio_unc": m["ppl"]["ratio_unc"], "kld_mean": m["kld"]["mean"], "kld_stderr": m["kld"]["stderr"],
        "median": m["kld"]["median"], "p90": m["kld"]["p90"], "p99": m["kld"]["p99"], "p999": m["kld"]["p999"],
        "max": m["kld"]["max"], "same": m["top1_agreement"], "same_unc": m["top1_agreement_unc"],
        "dp_mean": m["delta_p"]["mean"], "dp_rms": m["delta_p"]["rms"],
    }  # fmt: skip
    for k, v in d.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert m["tokens"] == 300


def test_kld_floor_ignores_tiny_reference_probabilities():
    ref = torch.tensor([[0.0, -40.0]])  # p_ref(1) = e^-40: below the -16 floor, so it does not count
    cand = torch.tensor([[0.0, 0.0]])
    q = token_quantities(ref, cand, torch.tensor([0]))
    assert q["kld"].item() == pytest.approx(math.log(2), rel=1e-9)


def test_self_diff_is_exactly_zero(mini_k2, heldout_file):
    m = run_diff(mini_k2["fp8"], mini_k2["fp8"], [heldout_file], ctx=128, chunks=4, progress=False)
    assert m["kld"]["mean"] == 0.0 and m["kld"]["max"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["ppl"]["ratio"] == 1.0 and m["delta_p"]["rms"] == 0.0
    assert m["router"]["topk_agreement"] == 1.0
    assert all(r["rel_err_teacher"] == 0 and r["rel_err_free"] == 0 for r in m["per_layer"])
    assert all(t["snr_db"] == float("inf") for t in m["per_tensor"])


def test_bf16_against_int4_report(mini_k2, heldout_file, tmp_path):
    from k2quant.convert import convert
    from k2quant.recipe import build_recipe

    cand = tmp_path / "int4"
    convert(mini_k2["bf16"], cand, build_recipe("int4-all"), method="rtn", progress=False)
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["diff", str(mini_k2["bf16"]), str(cand), "--data", str(heldout_file), "--out",
                                  str(out), "--ctx", "128", "--chunks", "8"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "KLD" in r.output and "top-1 agreement" in r.output
    m = json.loads((out / "metrics.json").read_text())
    for key in ("mean", "stderr", "median", "p90", "p99", "p999", "max"):
        assert key in m["kld"]
    assert m["tokens"] == 8 * (128 - 1 - 64)
    assert 0 < m["kld"]["mean"] < 0.5 and m["top1_agreement"] > 0.8
    assert m["kld"]["median"] <= m["kld"]["p90"] <= m["kld"]["p99"] <= m["kld"]["p999"] <= m["kld"]["max"]
    assert abs(m["ppl"]["ratio"] - 1) < 0.2 and m["ppl"]["ratio_unc"] > 0
    cfg = json.loads((mini_k2["bf16"] / "config.json").read_text())
    assert len(m["per_layer"]) == cfg["num_hidden_layers"]
    assert all(0 < r["rel_err_teacher"] <= r["rel_err_free"] * 1.5 + 1e-3 for r in m["per_layer"])
    assert 0.5 < m["router"]["topk_agreement"] < 1.0
    experts = [e for e in m["per_expert"] if e["layer"] == 1]
    assert len(experts) == cfg["n_routed_experts"]
    assert sum(e["frequency"] for e in experts) == pytest.approx(1.0)
    snr = {t["component"]: t["snr_db"] for t in m["per_tensor"]}
    assert 10 < snr["routed_experts"] < 40
    assert all(4.4 < t["bits_per_weight"] < 4.6 for t in m["per_tensor"] if t["component"] != "embeddings")
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "| layer | kind |" in (out / "report.md").read_text()


def test_pre_tokenized_input_and_errors(mini_k2, tmp_path):
    ids = np.arange(1000, dtype=np.int32) % 4000
    np.save(tmp_path / "ids.npy", ids)
    m = run_diff(mini_k2["fp8"], mini_k2["bf16"], [tmp_path / "ids.npy"], ctx=100, chunks=2, progress=False)
    assert m["tokens"] == 2 * (100 - 1 - 50)
    with pytest.raises(K2QuantError, match="fewer than one chunk"):
        run_diff(mini_k2["fp8"], mini_k2["bf16"], [tmp_path / "ids.npy"], ctx=4096, progress=False)
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(K2QuantError, match="flat list of token ids"):
        run_diff(mini_k2["fp8"], mini_k2["bf16"], [tmp_path / "bad.json"], progress=False)
    other = write_synthetic_checkpoint(tmp_path / "other", k2_config_dict(**SMALL), 1)
    with pytest.raises(K2QuantError, match="config field 'vocab_size' differs"):
        run_diff(mini_k2["fp8"], other, [tmp_path / "ids.npy"], progress=False)


RSS_SCRIPT = r"""
import sys
import numpy as np
from k2quant.report.diff import run_diff
np.save(sys.argv[2] + ".npy", np.arange(512) % 2000)
run_diff(sys.argv[1], sys.argv[1], [sys.argv[2] + ".npy"], ctx=128, chunks=2, progress=False)
from k2quant.memory import peak_rss
print(peak_rss())
"""


def test_diff_memory_does_not_grow_with_model_size(two_sizes, tmp_path):
    assert_peak_rss_independent_of_size(two_sizes, RSS_SCRIPT, tmp_path)


DIFF_ARGS = ["--ctx", "64", "--chunks", "6", "--batch", "1"]


def _diff_proc(ref, cand, data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "k2quant", "diff", str(ref), str(cand), "--data", str(data),
                             "--out", str(out), *DIFF_ARGS, "--json", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def _wait_for_batches(proc, out, n: int) -> None:
    wait_for_state(proc, out / DIFF_STATE_DIR / "state.json", "batches_done", n, "the diff's batches")


def test_diff_killed_then_resumed_is_byte_identical(mini_k2, heldout_file, tmp_path):
    """SIGKILL after a batch, SIGTERM after another (which prints the command that resumes): that command
    finishes with a report byte-identical to an uninterrupted run's. A new run over the state, or a resume
    with another option, is refused, naming what differs; a damaged state file is named."""
    ref, cand = mini_k2["bf16"], mini_k2["fp8"]
    clean, out = tmp_path / "clean", tmp_path / "killed"
    r = CliRunner().invoke(main, ["diff", str(ref), str(cand), "--data", str(heldout_file), "--out", str(clean),
                                  *DIFF_ARGS, "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    p = _diff_proc(ref, cand, heldout_file, out)
    _wait_for_batches(p, out, 1)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert not (out / "metrics.json").exists(), "diff finished before the kill"
    base = ["diff", str(ref), str(cand), "--data", str(heldout_file), "--out", str(out)]
    r = CliRunner().invoke(main, [*base, *DIFF_ARGS])
    assert r.exit_code == 1 and re.search(r"unfinished diff \([1-5] of 6 batches done\)", r.output), r.output
    r = CliRunner().invoke(main, [*base, *DIFF_ARGS[:-1], "2", "--resume"])
    assert r.exit_code == 1 and "differs from this run in --batch (1 then, 2 now)" in r.output, r.output
    other = tmp_path / "other.txt"
    other.write_text("Other evaluation text, not the held-out one. " * 300, encoding="utf-8")
    r = CliRunner().invoke(main, ["diff", str(ref), str(cand), "--data", str(other), "--out", str(out), *DIFF_ARGS,
                                  "--resume"])  # fmt: skip
    assert r.exit_code == 1 and "differs from this run in its evaluation tokens" in r.output, r.output

    p = _diff_proc(ref, cand, heldout_file, out, "--resume")
    _wait_for_batches(p, out, 3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in err, err
    again = shlex.split(err.strip().splitlines()[-1])
    assert again[:2] == ["k2quant", "diff"] and "--resume" in again, err
    assert not (out / "metrics.json").exists(), "diff finished before SIGTERM"

    state = json.loads((out / DIFF_STATE_DIR / "state.json").read_text())
    progress = out / DIFF_STATE_DIR / state["file"]
    saved = progress.read_bytes()
    progress.write_bytes(saved[:-8] + b"\0" * 8)
    r = CliRunner().invoke(main, again[1:])
    assert r.exit_code == 1 and f"{progress}: its sha256 is not the one state.json recorded" in r.output, r.output
    progress.write_bytes(saved)

    r = CliRunner().invoke(main, again[1:])
    assert r.exit_code == 0, r.output
    for f in ("metrics.json", "report.md"):
        assert (out / f).read_bytes() == (clean / f).read_bytes(), f
    assert not (out / DIFF_STATE_DIR).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
