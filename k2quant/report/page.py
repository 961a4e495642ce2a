"""report.html: one self-contained file (no external script, style, font or image): the summary, the plots
as base64 PNGs, and the tables as real HTML tables.

Every table sorts on a click on its heading (a small inline script; numbers sort by value, missing values
last); numbers are right-aligned, and error columns are tinted by rank among the rows shown, so the worst
rows stand out in any order. Tables that grow with the model (routed experts: 23,040 rows for K2; tensors:
about 70,000) show their MAX_ROWS worst rows, worst first, with the total and a pointer to metrics.json,
which holds every row; a per-layer table summarises the experts. Output is deterministic: no dates, and
the same metrics give the same bytes.
"""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .plots import PLOT_TITLES, component_label, plots

MAX_ROWS = 200  # rows shown of a table that grows with the model; metrics.json holds all
SCROLL_ABOVE = 30  # rows; longer tables scroll in a box with the heading kept in view


@dataclass(frozen=True)
class Col:
    """A table column: heading, cell text, numeric sort value (None: sort by text), and how the cell is tinted:
    +1 higher is worse, -1 lower is worse, 0 not tinted."""

    head: str
    text: Callable[[dict], str]
    value: Callable[[dict], float | None] | None = None
    worse: int = 0


def _num(v: float | None) -> str:
    if v is None:
        return ""
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(float(v))


def _tints(rows: list[dict], col: Col) -> list[float]:
    """Per row, 0..1: the rank of the cell's badness among the finite values of the column (1 = worst)."""
    # ranked at 6 significant digits, so that values printed alike (31.4 and 31.400000000000002) tint alike
    vals = [col.value(r) if col.value else None for r in rows]
    vals = [float(f"{v:.6g}") if v is not None else None for v in vals]
    finite = sorted({v * col.worse for v in vals if v is not None and math.isfinite(v)})
    if len(finite) < 2:
        return [0.0] * len(rows)
    rank = {v: i / (len(finite) - 1) for i, v in enumerate(finite)}
    return [rank.get(v * col.worse, 0.0) if v is not None and math.isfinite(v) else 0.0 for v in vals]


def table(rows: list[dict], cols: list[Col], caption: str, sorted_by: tuple[int, str] | None = None) -> str:
    """A sortable <table>; `sorted_by` (column index, 'ascending' or 'descending') marks the rows' given order."""
    heads = []
    for i, c in enumerate(cols):
        cls = ' class="n"' if c.value else ""
        sort = f' aria-sort="{sorted_by[1]}"' if sorted_by and sorted_by[0] == i else ""
        heads.append(f"<th{cls}{sort}>{html.escape(c.head)}</th>")
    tints = [_tints(rows, c) if c.worse else None for c in cols]
    body = []
    for j, r in enumerate(rows):
        cells = []
        for c, t in zip(cols, tints, strict=True):
            text = html.escape(c.text(r))
            if c.value is None:
                cells.append(f"<td>{text}</td>")
                continue
            style = ""
            if t is not None and t[j] > 0.02:
                style = f' style="background:rgba(214,39,40,{0.6 * t[j] ** 2:.2f})"'
            cells.append(f'<td class="n" data-v="{_num(c.value(r))}"{style}>{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    wrap = ' class="scroll"' if len(rows) > SCROLL_ABOVE else ""
    return (f'<div{wrap}><table class="sortable"><caption>{html.escape(caption)}</caption><thead><tr>'
            + "".join(heads) + "</tr></thead><tbody>" + "\n".join(body) + "</tbody></table></div>")  # fmt: skip


def _capped(total: int, shown: int, what: str, order: str, key: str) -> str:
    if total > shown:
        return (f"The {shown:,} {what} {order} (of {total:,}), worst first; metrics.json ({key}) holds all. "
                "Click a heading to sort.")  # fmt: skip
    return f"All {total:,} {what}, worst first. Click a heading to sort."


def _f(fmt: str, key: str) -> Callable[[dict], str]:
    return lambda r: format(r[key], fmt) if r.get(key) is not None else "–"


def _v(key: str) -> Callable[[dict], float | None]:
    return lambda r: r.get(key)


def _pct(key: str, digits: int) -> Callable[[dict], str]:
    return lambda r: f"{100 * r[key]:.{digits}f}%" if r.get(key) is not None else "–"


def _snr(key: str) -> Callable[[dict], str]:
    return lambda r: ("∞" if r[key] == math.inf else f"{r[key]:.2f}") if r.get(key) is not None else "–"


def summary_rows(m: dict) -> list[tuple[str, str]]:
    p, k, d = m["ppl"], m["kld"], m["delta_p"]
    rows = [
        ("tokens scored", f"{m['tokens']:,} ({m['chunks']} chunks of {m['ctx']}, second half of each)"),
        ("PPL(ref)", f"{p['ref']:.4f} ± {p['ref_unc']:.4f}"),
        ("PPL(cand)", f"{p['cand']:.4f} ± {p['cand_unc']:.4f}"),
        ("PPL(cand)/PPL(ref)", f"{p['ratio']:.5f} ± {p['ratio_unc']:.5f}"),
        ("mean KLD", f"{k['mean']:.6f} ± {k['stderr']:.6f}"),
        ("KLD median / p90 / p99 / p99.9 / max",
         f"{k['median']:.6f} / {k['p90']:.6f} / {k['p99']:.6f} / {k['p999']:.6f} / {k['max']:.6f}"),
        ("top-1 agreement", f"{100 * m['top1_agreement']:.3f}% ± {100 * m['top1_agreement_unc']:.3f}%"),
        ("mean Δp", f"{100 * d['mean']:.4f}% ± {100 * d['mean_unc']:.4f}%"),
        ("RMS Δp", f"{100 * d['rms']:.4f}% ± {100 * d['rms_unc']:.4f}%"),
        ("router top-k agreement", f"{100 * m['router']['topk_agreement']:.3f}%"),
    ]  # fmt: skip
    if m["per_layer"]:
        w = max(m["per_layer"], key=lambda r: r["rel_err_teacher"])
        rows.append(("worst layer (on the reference's input)", f"{w['layer']}: rel. error {w['rel_err_teacher']:.5f}"))
    return rows


def _layer_rows(m: dict) -> list[dict]:
    ra = m["router"]["per_layer"]
    return [dict(r, kind="MoE" if r["moe"] else "dense", router=ra.get(str(r["layer"]))) for r in m["per_layer"]]


def expert_layer_rows(m: dict) -> list[dict]:
    """Per MoE layer: expert count, median and worst relative weight error (and which expert), routing spread."""
    by: dict[int, list[dict]] = {}
    for e in m["per_expert"]:
        by.setdefault(e["layer"], []).append(e)
    rows = []
    for layer in sorted(by):
        es = by[layer]
        worst = max(es, key=lambda e: e["rel_err"])
        rows.append({
            "layer": layer, "experts": len(es), "median": statistics.median(e["rel_err"] for e in es),
            "worst": worst["rel_err"], "worst_expert": worst["expert"],
            "max_freq": max(e["frequency"] for e in es), "unrouted": sum(1 for e in es if e["tokens"] == 0),
        })  # fmt: skip
    return rows


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:72em;margin:2em auto;padding:0 1em;"
    "color:#222;line-height:1.4}h1{font-size:1.6em}h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #ddd}"
    "h3{font-size:1.05em;margin-top:1.6em}img{max-width:100%;height:auto}code{background:#f4f4f4;padding:0 .2em}"
    "nav a{margin-right:1em}table{border-collapse:collapse;font-size:.85em}caption{caption-side:top;"
    "text-align:left;color:#555;padding:.3em 0;font-size:1.05em}th,td{padding:.2em .6em;border-bottom:1px solid "
    "#e4e4e4;text-align:left;white-space:nowrap}th{background:#eef1f5;position:sticky;top:0;cursor:pointer;"
    "user-select:none}th:hover{background:#dde3ea}.n{text-align:right;font-variant-numeric:tabular-nums}"
    "th[aria-sort=ascending]::after{content:' \\25B2'}th[aria-sort=descending]::after{content:' \\25BC'}"
    ".scroll{max-height:32em;overflow:auto;border:1px solid #ddd;display:inline-block;max-width:100%}"
    "table.plain th{cursor:default;position:static}.note{color:#555;font-size:.9em}"
)

_SCRIPT = """(function(){
function key(c){var v=c.getAttribute('data-v');return v===null?c.textContent:(v===''?null:parseFloat(v));}
document.querySelectorAll('table.sortable').forEach(function(t){
 var hs=t.tHead.rows[0].cells;
 Array.prototype.forEach.call(hs,function(th,i){
  th.title='click to sort';
  th.addEventListener('click',function(){
   var asc=th.getAttribute('aria-sort')!=='ascending',b=t.tBodies[0],rows=Array.prototype.slice.call(b.rows);
   Array.prototype.forEach.call(hs,function(h){h.removeAttribute('aria-sort');});
   th.setAttribute('aria-sort',asc?'ascending':'descending');
   rows.sort(function(r,s){var x=key(r.cells[i]),y=key(s.cells[i]);
    if(x===null||y===null)return (x===null)-(y===null);return (x<y?-1:x>y?1:0)*(asc?1:-1);});
   var f=document.createDocumentFragment();rows.forEach(function(r){f.appendChild(r);});b.appendChild(f);
  });
 });
});
})();"""


def html_report(m: dict, components: list[dict]) -> str:
    """The whole report.html; `components` are render's by-component rows."""
    imgs = plots(m, components)
    esc = html.escape
    parts = [
        f"<h1>k2quant diff</h1><p>Reference <code>{esc(m['reference'])}</code>, candidate "
        f"<code>{esc(m['candidate'])}</code>.</p>",
        '<nav><a href="#summary">Summary</a><a href="#plots">Plots</a><a href="#tables">Tables</a></nav>',
        '<h2 id="summary">Summary</h2><table class="plain"><tbody>'
        + "".join(f'<tr><th>{esc(a)}</th><td class="n">{esc(b)}</td></tr>' for a, b in summary_rows(m))
        + "</tbody></table>",
        '<h2 id="plots">Plots</h2>',
    ]
    for name, b64 in imgs.items():
        parts.append(f'<h3>{esc(PLOT_TITLES[name])}</h3><img alt="{esc(PLOT_TITLES[name])}" '
                     f'src="data:image/png;base64,{b64}">')  # fmt: skip
    parts.append('<h2 id="tables">Tables</h2>')

    parts.append("<h3>By component</h3>" + table(components, [
        Col("component", lambda r: component_label(r["component"])),
        Col("tensors", _f(",", "tensors"), _v("tensors")),
        Col("params", _f(",", "params"), _v("params")),
        Col("bits/weight", _f(".3f", "bits_per_weight"), _v("bits_per_weight")),
        Col("weight SNR (dB)", _snr("snr_db"), _v("snr_db"), -1),
        Col("worst tensor's SNR (dB)", _snr("worst_snr_db"), _v("worst_snr_db"), -1),
    ], "Weight SNR weighted by parameters; higher is better. Click a heading to sort."))  # fmt: skip

    parts.append("<h3>By layer</h3>" + table(_layer_rows(m), [
        Col("layer", _f("d", "layer"), _v("layer")),
        Col("kind", lambda r: r["kind"]),
        Col("rel. err (teacher)", _f(".5f", "rel_err_teacher"), _v("rel_err_teacher"), 1),
        Col("rel. err (free)", _f(".5f", "rel_err_free"), _v("rel_err_free"), 1),
        Col("cos (teacher)", _f(".6f", "cos_teacher"), _v("cos_teacher"), -1),
        Col("cos (free)", _f(".6f", "cos_free"), _v("cos_free"), -1),
        Col("router agreement", _pct("router", 2), _v("router"), -1),
    ], "Relative error and cosine of each layer's output hidden state; teacher: the candidate's layer on the "
       "reference's input, free: the candidate running on its own. Click a heading to sort.",
       (0, "ascending")))  # fmt: skip

    experts = m["per_expert"]
    if experts:
        parts.append("<h3>Routed experts by layer</h3>" + table(expert_layer_rows(m), [
            Col("layer", _f("d", "layer"), _v("layer")),
            Col("experts", _f(",", "experts"), _v("experts")),
            Col("median rel. weight error", _f(".5f", "median"), _v("median"), 1),
            Col("worst rel. weight error", _f(".5f", "worst"), _v("worst"), 1),
            Col("worst expert", _f("d", "worst_expert"), _v("worst_expert")),
            Col("busiest expert's frequency", _pct("max_freq", 2), _v("max_freq")),
            Col("never routed", _f(",", "unrouted"), _v("unrouted"), 1),
        ], "Each MoE layer's routed experts: relative weight error over gate, up and down; routing frequency in "
           "the reference. Click a heading to sort.", (0, "ascending")))  # fmt: skip
        worst = sorted(experts, key=lambda e: (-e["rel_err"], e["layer"], e["expert"]))[:MAX_ROWS]
        parts.append("<h3>Routed experts with the largest weight error</h3>" + table(worst, [
            Col("layer", _f("d", "layer"), _v("layer")),
            Col("expert", _f("d", "expert"), _v("expert")),
            Col("relative weight error", _f(".5f", "rel_err"), _v("rel_err"), 1),
            Col("routing frequency", _pct("frequency", 2), _v("frequency")),
            Col("tokens", _f(",", "tokens"), _v("tokens")),
        ], _capped(len(experts), len(worst), "routed experts", "with the largest error", "per_expert"),
           (2, "descending")))  # fmt: skip

    tensors = m["per_tensor"]
    if tensors:
        lowest = sorted(tensors, key=lambda t: (t["snr_db"], t["name"]))[:MAX_ROWS]
        parts.append("<h3>Tensors with the lowest weight SNR</h3>" + table(lowest, [
            Col("tensor", lambda r: r["name"]),
            Col("component", lambda r: component_label(r["component"])),
            Col("stored as", lambda r: r["scheme"]),
            Col("params", _f(",", "params"), _v("params")),
            Col("bits/weight", _f(".3f", "bits_per_weight"), _v("bits_per_weight")),
            Col("weight SNR (dB)", _snr("snr_db"), _v("snr_db"), -1),
        ], _capped(len(tensors), len(lowest), "linear tensors", "with the lowest SNR", "per_tensor"),
           (5, "ascending")))  # fmt: skip

    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'><title>k2quant diff</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")  # fmt: skip
