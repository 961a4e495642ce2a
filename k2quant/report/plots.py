"""The diff report's plots: matplotlib (Agg) figures, returned as base64 PNGs in a fixed order.

Four plots: the per-token KLD distribution, the error of each layer's output, routed experts'
weight error (against routing frequency, and by layer), and bits per weight against weight SNR
by component. They stay readable at K2's scale (61 layers, 60 x 384 routed experts): above
DENSITY_ABOVE experts the error-frequency panel is a hexbin density with a colour bar instead
of a scatter cloud (below, a scatter coloured by layer, with a legend or a colour bar), and
components that coincide share one marker, named in a legend beside the axes. The same metrics
give the same bytes (Agg, no PNG software/date metadata).
"""

from __future__ import annotations

import base64
import io
import math

DENSITY_ABOVE = 2000  # experts; above this the error-frequency panel is a density (hexbin)
FEW_LAYERS = 10  # MoE layers; up to this many, each has its own colour in a legend, else a colour bar

# sentence-case names, shared with the HTML tables
COMPONENT_LABELS = {
    "embeddings": "embeddings",
    "attention": "attention",
    "dense_mlp": "dense MLP",
    "shared_experts": "shared experts",
    "routed_experts": "routed experts",
    "router": "router",
    "norms": "norms",
    "other": "other",
}

# heading of each plot in the report, in the order the plots come
PLOT_TITLES = {
    "kld_distribution": "KLD distribution",
    "error_by_layer": "Error by layer",
    "expert_error_vs_frequency": "Routed experts: error against frequency",
    "bpw_vs_error": "Bits per weight against error, by component",
}

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode()


def component_label(component: str) -> str:
    return COMPONENT_LABELS.get(component, component.replace("_", " "))


def plots(m: dict, components: list[dict]) -> dict[str, str]:
    """Base64 PNGs keyed as PLOT_TITLES; `components` are render's by-component rows
    (component, params, bits_per_weight, snr_db). The expert plot is left out when there are no routed experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    with plt.rc_context({"svg.hashsalt": "k2quant", "axes.grid": True, "grid.alpha": 0.3, "font.size": 9}):
        for key, draw in (("kld_distribution", _kld), ("error_by_layer", _layers),
                          ("expert_error_vs_frequency", _experts), ("bpw_vs_error", _bpw)):  # fmt: skip
            fig = draw(plt, m, components)
            if fig is not None:
                out[key] = _png(fig)
                plt.close(fig)
    return out


def _kld(plt, m: dict, components: list[dict]):
    fig, ax = plt.subplots(figsize=(8, 3.6))
    vals = [v for v in m.get("kld_values", []) if v > 0]
    if vals:
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        bins = [10 ** (lo + (hi - lo) * i / 60) for i in range(61)] if hi > lo else 20
        ax.hist(vals, bins=bins, color="#4c72b0")
        ax.set_xscale("log")
        k = m["kld"]
        for stat, name, style in (("mean", "mean", "-"), ("median", "median", "--"), ("p99", "p99", ":")):
            if k[stat] > 0:
                ax.axvline(k[stat], color="#c44e52", ls=style, lw=1.2, label=f"{name} {k[stat]:.4g}")
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "every token's KLD is 0", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("per-token KLD (nats, log scale)")
    ax.set_ylabel("tokens")
    ax.set_title(f"KLD distribution ({m['tokens']:,} tokens)")
    return fig


def _layers(plt, m: dict, components: list[dict]):
    from matplotlib.ticker import MaxNLocator

    rows = m["per_layer"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    n = len(rows)
    ms = 4 if n <= 16 else 2.5
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["rel_err_teacher"] for r in rows], "o-", ms=ms, lw=1.2, label="on the reference's input")
    ax.plot(layers, [r["rel_err_free"] for r in rows], "s--", ms=ms, lw=1.2, label="free-running")
    dense = [r["layer"] for r in rows if not r["moe"]]
    for i, layer in enumerate(dense):
        ax.axvspan(layer - 0.5, layer + 0.5, color="0.85", zorder=0, label="dense layer" if i == 0 else None)
    if any(v > 0 for r in rows for v in (r["rel_err_teacher"], r["rel_err_free"])):
        _log_y(ax)
    ax.set_xlim(min(layers, default=0) - 0.8, max(layers, default=0) + 0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # below the axes: 61 layers of data leave no empty corner
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error of hidden state")
    ax.set_title("Error by layer")
    return fig


def _log_y(ax) -> None:
    """Log y axis labelled in plain numbers (0.02, 0.03, 0.05, 0.1, ...) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))


def _experts(plt, m: dict, components: list[dict]):
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    experts = m["per_expert"]
    if not experts:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.15, 1]})
    freq = [e["frequency"] for e in experts]
    err = [e["rel_err"] for e in experts]
    if len(experts) > DENSITY_ABOVE:
        hb = ax.hexbin(freq, err, gridsize=(60, 40), bins="log", mincnt=1, cmap="viridis", linewidths=0)
        fig.colorbar(hb, ax=ax, pad=0.02).set_label("experts per cell (log scale)")
    elif len({e["layer"] for e in experts}) <= FEW_LAYERS:  # one colour per layer, named in the legend
        for i, layer in enumerate(sorted({e["layer"] for e in experts})):
            es = [e for e in experts if e["layer"] == layer]
            ax.scatter([e["frequency"] for e in es], [e["rel_err"] for e in es], s=14, color=plt.get_cmap("tab10")(i),
                       alpha=0.85, linewidths=0, label=f"layer {layer}")  # fmt: skip
    else:
        sc = ax.scatter(freq, err, s=12, c=[e["layer"] for e in experts], cmap="viridis", alpha=0.85, linewidths=0)
        cb = fig.colorbar(sc, ax=ax, pad=0.02)
        cb.set_label("layer")
        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
    per_layer_count: dict[int, int] = {}
    for e in experts:
        per_layer_count[e["layer"]] = max(per_layer_count.get(e["layer"], 0), e["expert"] + 1)
    n_experts = max(per_layer_count.values())
    ax.axvline(1 / n_experts, color="#c44e52", ls="--", lw=1, label=f"uniform routing (1/{n_experts})")
    ax.legend(loc="upper right", fontsize=8)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_xlabel("routing frequency in the reference (share of the layer's routed tokens)")
    ax.set_ylabel("relative weight error")
    ax.set_title(f"Error against frequency ({len(experts):,} experts)")

    by_layer: dict[int, list[float]] = {}
    for e in experts:
        by_layer.setdefault(e["layer"], []).append(e["rel_err"])
    layers = sorted(by_layer)
    q = {p: [_quantile(sorted(by_layer[layer]), p) for layer in layers] for p in (0.0, 0.1, 0.5, 0.9, 1.0)}
    bx.fill_between(layers, q[0.1], q[0.9], color="#4c72b0", alpha=0.25, label="10th to 90th percentile")
    bx.plot(layers, q[0.5], "o-", color="#4c72b0", ms=2.5 if len(layers) > 16 else 4, lw=1.2, label="median")
    bx.plot(layers, q[1.0], "v", color="#c44e52", ms=3 if len(layers) > 16 else 5, label="worst expert")
    bx.plot(layers, q[0.0], "^", color="0.5", ms=3 if len(layers) > 16 else 5, label="best expert")
    bx.set_xlim(layers[0] - 0.8, layers[-1] + 0.8)
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    bx.set_xlabel("layer")
    bx.set_ylabel("relative weight error")
    bx.set_title("Error by layer, over each layer's experts")
    fig.suptitle("Routed experts: error against frequency", fontsize=11)
    fig.tight_layout()
    return fig


def _quantile(s: list[float], p: float) -> float:
    pos = p * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _bpw(plt, m: dict, components: list[dict]):
    """One marker per group of components that coincide (same bpw to 0.01, SNR to 0.05 dB); the names go in a
    legend beside the axes, so no label overlaps another or is cut at the edge."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    groups: dict[tuple[float, float], list[dict]] = {}
    identical = []
    for r in components:
        if math.isfinite(r["snr_db"]):
            groups.setdefault((round(r["bits_per_weight"], 2), round(r["snr_db"] * 20) / 20), []).append(r)
        else:
            identical.append(component_label(r["component"]))
    cmap = plt.get_cmap("tab10")
    for i, ((bpw, snr), rs) in enumerate(sorted(groups.items())):
        names = ", ".join(component_label(r["component"]) for r in rs)
        ax.scatter(bpw, snr, s=60, marker=_MARKERS[i % len(_MARKERS)], color=cmap(i % 10), edgecolors="black",
                   linewidths=0.6, zorder=3, label=f"{names}: {bpw:.2f} bpw, {snr:.1f} dB")  # fmt: skip
    if identical:
        ax.plot([], [], " ", label=f"identical to the reference (not plotted): {', '.join(identical)}")
    if groups:
        xs = [k[0] for k in groups]
        ys = [k[1] for k in groups]
        xpad = max(0.5, 0.08 * (max(xs) - min(xs)))
        ypad = max(1.0, 0.12 * (max(ys) - min(ys)))
        ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
        ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
    else:
        note = "every component is identical to the reference:\n" + ", ".join(identical) if identical else "no tensors"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    if groups:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, borderaxespad=0)
    ax.set_xlabel("bits per weight (candidate, as stored)")
    ax.set_ylabel("weight SNR (dB, higher is better)")
    ax.set_title("Bits per weight against error, by component")
    return fig
