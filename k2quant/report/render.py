"""Rendering a diff: metrics.json, report.md (tables), report.html (one file, plots embedded), terminal summary."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path


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
        rows.append({"component": comp, "params": a["params"], "bits_per_weight": a["bits"] / a["params"],
                     "snr_db": snr})  # fmt: skip
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


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    png = _png(fig)
    plt.close(fig)
    return png


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode()


def plots(m: dict) -> dict[str, str]:
    """Base64 PNGs: KLD distribution, error by layer, expert error vs frequency, bpw vs error by component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    vals = [v for v in m["kld_values"] if v > 0]
    if vals:
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        bins = [10 ** (lo + (hi - lo) * i / 50) for i in range(51)] if hi > lo else 20
        ax.hist(vals, bins=bins)
        ax.set_xscale("log")
    out["kld_distribution"] = _finish(plt, fig, ax, "per-token KLD (nats)", "tokens", "KLD distribution")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = [r["layer"] for r in m["per_layer"]]
    ax.plot(layers, [r["rel_err_teacher"] for r in m["per_layer"]], "o-", label="on reference input")
    ax.plot(layers, [r["rel_err_free"] for r in m["per_layer"]], "s--", label="free-running")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    out["error_by_layer"] = _finish(plt, fig, ax, "layer", "relative error of hidden state", "Error by layer")

    if m["per_expert"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.scatter([e["frequency"] for e in m["per_expert"]], [e["rel_err"] for e in m["per_expert"]], s=8,
                   c=[e["layer"] for e in m["per_expert"]], cmap="viridis")  # fmt: skip
        out["expert_error_vs_frequency"] = _finish(
            plt,
            fig,
            ax,
            "routing frequency (reference)",
            "relative weight error",
            "Routed experts: error against frequency",
        )

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in _component_table(m):
        if math.isfinite(r["snr_db"]):
            ax.scatter(r["bits_per_weight"], r["snr_db"], s=40)
            ax.annotate(r["component"], (r["bits_per_weight"], r["snr_db"]), fontsize=8)
    out["bpw_vs_error"] = _finish(
        plt, fig, ax, "bits per weight", "weight SNR (dB)", "Bits per weight against error, by component"
    )
    return out


def html_report(m: dict, md: str) -> str:
    imgs = plots(m)
    body = [f"<pre>{html.escape(terminal_summary(m))}</pre>"]
    for name, b64 in imgs.items():
        body.append(
            f'<h3>{html.escape(name.replace("_", " "))}</h3><img alt="{name}" src="data:image/png;base64,{b64}">'
        )
    body.append(f"<h2>Tables</h2><pre>{html.escape(md)}</pre>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>k2quant diff</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f6f6f6;padding:1em;"
            "overflow-x:auto}img{max-width:100%}</style></head><body><h1>k2quant diff</h1>" + "".join(body)
            + "</body></html>\n")  # fmt: skip


def write_report(m: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(m)
    paths = {"metrics": out / "metrics.json", "markdown": out / "report.md", "html": out / "report.html"}
    slim = {k: v for k, v in m.items() if k != "kld_values"}
    paths["metrics"].write_text(json.dumps(slim, indent=2) + "\n")
    paths["markdown"].write_text(md)
    paths["html"].write_text(html_report(m, md))
    return paths
