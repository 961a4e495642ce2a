"""Rendering a diff: metrics.json, report.md (tables), report.html (page.py: one file, plots embedded, sortable
HTML tables), terminal summary."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .page import html_report


def terminal_summary(m: dict) -> str:
    p, k, d = m["ppl"], m["kld"], m["delta_p"]
    worst = max(m["per_layer"], key=lambda r: r["rel_err_teacher"])
    return "\n".join([
        f"{m['tokens']} tokens scored ({m['chunks']} chunks of {m['ctx']})",
        f"PPL  ref {p['ref']:.4f} ± {p['ref_unc']:.4f}   cand {p['cand']:.4f} ± {p['cand_unc']:.4f}   "
        f"ratio {p['ratio']:.5f} ± {p['ratio_unc']:.5f}",
        f"KLD  mean {k['mean']:.6f} ± {k['stderr']:.6f}   median {k['median']:.6f}   p99 {k['p99']:.6f}   "
        f"max {k['max']:.6f}",
        f"top-1 agreement {100 * m['top1_agreement']:.2f}% ± {100 * m['top1_agreement_unc']:.2f}%   "
        f"Δp mean {100 * d['mean']:.3f}%   RMS Δp {100 * d['rms']:.3f}%",
        f"router top-k agreement {100 * m['router']['topk_agreement']:.2f}%   worst layer {worst['layer']} "
        f"(relative error {worst['rel_err_teacher']:.4f} on the reference's input)",
    ])  # fmt: skip


def _component_table(m: dict) -> list[dict]:
    """Per component: tensors, params, params-weighted bits per weight and weight SNR (dB, over the tensors that
    differ; inf when none does), and the worst tensor's SNR."""
    acc: dict[str, dict] = defaultdict(lambda: {"params": 0, "bits": 0.0, "sig_noise": []})
    for t in m["per_tensor"]:
        a = acc[t["component"]]
        a["params"] += t["params"]
        a["bits"] += t["bits_per_weight"] * t["params"]
        a["sig_noise"].append((t["snr_db"], t["params"]))
    rows = []
    for comp, a in acc.items():
        finite = [(s, n) for s, n in a["sig_noise"] if math.isfinite(s)]
        snr = sum(s * n for s, n in finite) / sum(n for _, n in finite) if finite else float("inf")
        rows.append({"component": comp, "tensors": len(a["sig_noise"]), "params": a["params"],
                     "bits_per_weight": a["bits"] / a["params"], "snr_db": snr,
                     "worst_snr_db": min(s for s, _ in a["sig_noise"])})  # fmt: skip
    return rows


def markdown(m: dict) -> str:
    p, k, d = m["ppl"], m["kld"], m["delta_p"]
    out = [
        "# k2quant diff",
        "",
        f"- reference: `{m['reference']}`",
        f"- candidate: `{m['candidate']}`",
        f"- {m['tokens']} tokens scored: {m['chunks']} chunks of {m['ctx']}, second half of each chunk",
        "",
        "## Summary",
        "",
        "| statistic | value |",
        "|---|---|",
        f"| PPL(ref) | {p['ref']:.4f} ± {p['ref_unc']:.4f} |",
        f"| PPL(cand) | {p['cand']:.4f} ± {p['cand_unc']:.4f} |",
        f"| PPL(cand)/PPL(ref) | {p['ratio']:.5f} ± {p['ratio_unc']:.5f} |",
        f"| mean KLD | {k['mean']:.6f} ± {k['stderr']:.6f} |",
        f"| KLD median / p90 / p99 / p99.9 / max | {k['median']:.6f} / {k['p90']:.6f} / {k['p99']:.6f} / "
        f"{k['p999']:.6f} / {k['max']:.6f} |",
        f"| top-1 agreement | {100 * m['top1_agreement']:.3f}% ± {100 * m['top1_agreement_unc']:.3f}% |",
        f"| mean Δp | {100 * d['mean']:.4f}% ± {100 * d['mean_unc']:.4f}% |",
        f"| RMS Δp | {100 * d['rms']:.4f}% ± {100 * d['rms_unc']:.4f}% |",
        f"| router top-k agreement | {100 * m['router']['topk_agreement']:.3f}% |",
        "",
        "## By component",
        "",
        "| component | params | bits/weight | weight SNR (dB) |",
        "|---|---|---|---|",
    ]
    for r in _component_table(m):
        out.append(f"| {r['component']} | {r['params']:,} | {r['bits_per_weight']:.3f} | {r['snr_db']:.2f} |")
    out += ["", "## By layer", "",
            "relative error and cosine of each layer's output hidden state; *teacher*: the candidate's layer on the "
            "reference's input, *free*: the candidate running on its own",
            "",
            "| layer | kind | rel. err (teacher) | rel. err (free) | cos (teacher) | cos (free) | router agreement |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in m["per_layer"]:
        ra = m["router"]["per_layer"].get(str(r["layer"]))
        ra_s = f"{100 * ra:.2f}%" if ra is not None else "–"
        out.append(f"| {r['layer']} | {'MoE' if r['moe'] else 'dense'} | {r['rel_err_teacher']:.5f} | "
                   f"{r['rel_err_free']:.5f} | {r['cos_teacher']:.6f} | {r['cos_free']:.6f} | {ra_s} |")  # fmt: skip
    worst = sorted(m["per_expert"], key=lambda e: -e["rel_err"])[:10]
    if worst:
        out += [
            "",
            "## Routed experts with the largest weight error",
            "",
            "| layer | expert | relative weight error | routing frequency | tokens |",
            "|---|---|---|---|---|",
        ]
        for e in worst:
            out.append(f"| {e['layer']} | {e['expert']} | {e['rel_err']:.5f} | {100 * e['frequency']:.2f}% | "
                       f"{e['tokens']} |")  # fmt: skip
    return "\n".join(out) + "\n"


def report_paths(out: str | Path) -> dict[str, Path]:
    """Where write_report puts metrics.json, report.md and report.html."""
    out = Path(out)
    return {"metrics": out / "metrics.json", "markdown": out / "report.md", "html": out / "report.html"}


def write_report(m: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(m)
    paths = report_paths(out)
    slim = {k: v for k, v in m.items() if k != "kld_values"}
    paths["metrics"].write_text(json.dumps(slim, indent=2) + "\n")
    paths["markdown"].write_text(md, encoding="utf-8")
    paths["html"].write_text(html_report(m, _component_table(m)), encoding="utf-8")
    return paths
