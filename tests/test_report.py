"""diff's report.html at K2's scale (rendering only, from synthetic metrics): real sortable tables with capped row
counts, four embedded plots, a bounded size and render time, the same bytes twice, and a headless Chromium that
opens it, runs its script and takes a screenshot."""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from k2quant.config import K2Config
from k2quant.minik2 import DIMS as MINI_K2_DIMS
from k2quant.names import expected_shapes, parse_name
from k2quant.report.metrics import summarize
from k2quant.report.page import MAX_ROWS
from k2quant.report.render import write_report
from k2quant.synthetic import k2_config_dict

K2_HTML_BOUND = 1_000_000  # bytes: report.html for K2 (61 layers, 23,040 experts, ~70,000 tensors) is ~490 kB
RENDER_SECONDS = 60  # generous, for a loaded machine: about 4 s on 2 busy cores


def synthetic_metrics(cfg_dict: dict, seed: int = 0, tokens: int = 25_500, exact: bool = False) -> dict:
    """What run_diff returns for a BF16 reference against an FP8-attention, INT4-experts candidate (lm_head kept in
    BF16), made up: real tensor names and sizes from the config, plausible errors. exact: a self-diff."""
    cfg = K2Config.from_dict(cfg_dict)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    nll_ref = torch.rand(tokens, generator=g, dtype=torch.float64) * 4
    if exact:
        zeros = torch.zeros(tokens, dtype=torch.float64)
        q = {"nll_ref": nll_ref, "nll_cand": nll_ref.clone(), "kld": zeros, "same_top": zeros + 1, "delta_p": zeros}
    else:
        kld = torch.exp(torch.randn(tokens, generator=g, dtype=torch.float64) * 1.5 - 5)
        q = {"nll_ref": nll_ref, "nll_cand": nll_ref + kld * 0.5, "kld": kld,
             "same_top": (torch.rand(tokens, generator=g) > 0.05).double(),
             "delta_p": torch.randn(tokens, generator=g, dtype=torch.float64) * 0.02}  # fmt: skip
    m = summarize(q)
    m.update(ctx=512, chunks=tokens // 255, reference="Kimi-K2-Instruct", candidate="K2-int4")
    n_layers, n_experts = cfg.num_hidden_layers, cfg.n_routed_experts
    m["per_layer"] = [
        {"layer": i, "moe": cfg.is_moe(i),
         "rel_err_teacher": 0.0 if exact else 0.02 + 0.01 * rng.random() + 0.0004 * i,
         "rel_err_free": 0.0 if exact else 0.02 + 0.004 * i * (1 + 0.3 * rng.random()),
         "cos_teacher": 1.0 if exact else 1 - 0.0003 * (1 + rng.random()),
         "cos_free": 1.0 if exact else 1 - 0.0003 * (1 + i * rng.random())}
        for i in range(n_layers)
    ]  # fmt: skip
    m["router"] = {
        "topk_agreement": 1.0 if exact else 0.9,
        "per_layer": {str(i): 1.0 if exact else 0.85 + 0.1 * rng.random() for i in range(n_layers) if cfg.is_moe(i)},
    }
    per_tensor = []
    for name, shape in expected_shapes(cfg).items():
        ni = parse_name(name)
        if not ni.is_linear:
            continue
        numel = math.prod(shape)
        if ni.component == "embeddings":
            scheme, bpw, snr = "bfloat16", 16.0, math.inf
        elif ni.component == "routed_experts":
            scheme, bpw, snr = "int4 g32 (bfloat16 scales)", 4.5, 19.5 + rng.gauss(0, 0.3)
        else:  # FP8 block quantization: the same SNR whatever the tensor, so the components coincide
            scheme, bpw, snr = "float8_e4m3fn block 128x128", 8.0, 31.4
        per_tensor.append({"name": name, "component": ni.component, "scheme": scheme,
                           "snr_db": math.inf if exact else snr, "bits_per_weight": bpw, "params": numel})  # fmt: skip
    m["per_tensor"] = per_tensor
    m["per_expert"] = []
    for i in range(n_layers):
        if not cfg.is_moe(i):
            continue
        weights = [rng.lognormvariate(0, 0.8) if rng.random() > 0.01 else 0.0 for _ in range(n_experts)]
        counts = [round(w / sum(weights) * tokens * 2 * cfg.num_experts_per_tok) for w in weights]
        for e in range(n_experts):
            m["per_expert"].append({
                "layer": i, "expert": e, "rel_err": 0.0 if exact else 0.105 + rng.gauss(0, 0.004) + 0.0001 * i,
                "frequency": counts[e] / max(sum(counts), 1), "tokens": counts[e],
            })  # fmt: skip
    m["kld_values"] = q["kld"].float().tolist()
    return m


K2 = k2_config_dict()
MINI_K2 = k2_config_dict(**MINI_K2_DIMS)


class _Tables(HTMLParser):
    """Tables (rows per tbody, headings), headings h2/h3, img sources and every href/src."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.headings: list[str] = []
        self.srcs: list[str] = []
        self._in: str | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"rows": 0, "th": 0, "numeric_td": 0, "class": a.get("class"), "caption": ""})
        elif tag == "tr" and self.tables and self._in == "tbody":
            self.tables[-1]["rows"] += 1
        elif tag == "th" and self.tables:
            self.tables[-1]["th"] += 1
        elif tag == "td" and self.tables and a.get("class") == "n":
            self.tables[-1]["numeric_td"] += 1
        elif tag in ("tbody", "caption", "h2", "h3"):
            self._in, self._text = tag, ""
        for k in ("src", "href"):
            if k in a:
                self.srcs.append(a[k])

    def handle_endtag(self, tag):
        if tag == "caption":
            self.tables[-1]["caption"] = self._text
        elif tag in ("h2", "h3"):
            self.headings.append(self._text)
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._text += data


def _parse(path: Path) -> _Tables:
    p = _Tables()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_k2_scale_report(tmp_path):
    m = synthetic_metrics(K2)
    assert len(m["per_layer"]) == 61 and len(m["per_expert"]) == 60 * 384 and len(m["per_tensor"]) > 60_000
    t0 = time.perf_counter()
    paths = write_report(m, tmp_path)
    seconds = time.perf_counter() - t0
    assert seconds < RENDER_SECONDS, f"rendering took {seconds:.1f} s"
    size = paths["html"].stat().st_size
    assert size < K2_HTML_BOUND, f"report.html is {size:,} bytes"
    text = paths["html"].read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 4
    p = _parse(paths["html"])
    # self-contained: nothing fetched, only embedded images and in-page links
    assert all(s.startswith(("data:image/png;base64,", "#")) for s in p.srcs), [s[:40] for s in p.srcs]
    assert "<link" not in text and "http://" not in text and "https://" not in text
    sortable = [t for t in p.tables if t["class"] == "sortable"]
    assert len(sortable) == 5 and all(t["th"] > 0 and t["numeric_td"] > 0 for t in sortable)
    assert all(t["rows"] <= MAX_ROWS for t in sortable), [t["rows"] for t in sortable]
    layer_table = next(t for t in sortable if t["caption"].startswith("Relative error and cosine"))
    assert layer_table["rows"] == 61
    expert_layers = next(t for t in sortable if t["caption"].startswith("Each MoE layer"))
    assert expert_layers["rows"] == 60
    worst_experts = next(t for t in sortable if "routed experts" in t["caption"] and "worst first" in t["caption"])
    assert worst_experts["rows"] == MAX_ROWS
    assert "routed experts with the largest error (of 23,040)" in worst_experts["caption"]
    assert "metrics.json (per_expert) holds all" in worst_experts["caption"]
    tensors = next(t for t in sortable if "linear tensors" in t["caption"])
    assert tensors["rows"] == MAX_ROWS and f"(of {len(m['per_tensor']):,})" in tensors["caption"]
    assert "<script>" in text and "aria-sort" in text
    # sentence case next to the plots' titles
    assert "KLD distribution" in p.headings and "Error by layer" in p.headings
    assert all(h[0].isupper() for h in p.headings), p.headings
    # report.md keeps its tables (all experts are not listed there)
    md = paths["markdown"].read_text()
    assert "| layer | kind |" in md and md.count("\n| ") < 120


def test_mini_k2_sized_report_shows_every_row(tmp_path):
    m = synthetic_metrics(MINI_K2)
    paths = write_report(m, tmp_path)
    p = _parse(paths["html"])
    sortable = [t for t in p.tables if t["class"] == "sortable"]
    experts = next(t for t in sortable if "routed experts" in t["caption"] and "worst first" in t["caption"])
    assert experts["rows"] == 3 * 32 and experts["caption"].startswith("All 96 routed experts")
    assert next(t for t in sortable if t["caption"].startswith("Relative error and cosine"))["rows"] == 4
    assert paths["html"].read_text(encoding="utf-8").count("data:image/png;base64,") == 4


def test_self_diff_report_renders(tmp_path):
    """All errors 0 and every SNR infinite: nothing to put on a log scale, no component to plot."""
    paths = write_report(synthetic_metrics(MINI_K2, exact=True), tmp_path)
    text = paths["html"].read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 4 and "∞" in text


def test_report_is_deterministic(tmp_path):
    m = synthetic_metrics(MINI_K2, seed=3)
    a = write_report(m, tmp_path / "a")
    b = write_report(m, tmp_path / "b")
    for k in ("html", "markdown", "metrics"):
        assert a[k].read_bytes() == b[k].read_bytes(), k


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_in_headless_chromium(tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium (or chromium-browser) is not on PATH; install it to screenshot report.html")
    paths = write_report(synthetic_metrics(K2), tmp_path / "report")
    url = paths["html"].resolve().as_uri()
    shot = tmp_path / "report.png"
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    r = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,4000", url],
                       capture_output=True, text=True, timeout=180)  # fmt: skip
    assert shot.is_file(), f"no screenshot (exit {r.returncode}): {r.stderr[-2000:]}"
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    assert struct.unpack(">II", png[16:24]) == (1280, 4000)
    # the page's script runs: it titles every sortable heading, and a click on "router agreement" in the layer
    # table sorts by value, lowest first, the dense layer (no router) last
    click = ("<script>var t=document.querySelectorAll('table.sortable')[1];t.tHead.rows[0].cells[6].click();"
             "document.title=Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[0].textContent})"
             ".join(',');</script></body>")  # fmt: skip
    clicked = paths["html"].with_name("clicked.html")
    clicked.write_text(paths["html"].read_text(encoding="utf-8").replace("</body>", click), encoding="utf-8")
    r = subprocess.run(common + ["--dump-dom", clicked.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert r.stdout.count('title="click to sort"') >= 5 * 5, r.stderr[-2000:]
    order = [int(x) for x in r.stdout.split("<title>")[1].split("</title>")[0].split(",")]
    m = json.loads(paths["metrics"].read_text())
    agreement = m["router"]["per_layer"]
    assert order == [int(k) for k in sorted(agreement, key=agreement.get)] + [0]
