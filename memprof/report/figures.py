"""Plotly figures (plain dicts, plotly.js JSON schema) built from the report's data.

Text that comes from a run file (model names, hosts, labels) goes into plotly as HTML-escaped
text: plotly.js renders a small HTML subset in labels and decodes entities, so escaping makes
``<script>`` display as those characters and never become markup.
"""

from __future__ import annotations

import html
import math
from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS, MODEL_STATE_CATEGORIES, PHASES
from memprof.report.sweep_page import scheme_order
from memprof.units import format_bytes

MIB = 2**20

# one colour per category on every chart of the page (plotly's default qualitative palette)
CATEGORY_COLOURS = {
    "params": "#636EFA", "master_params": "#00CC96", "grads": "#EF553B", "optimizer_state": "#AB63FA",
    "comm_buffers": "#FFA15A", "activations": "#19D3F3", "other": "#7F7F7F",
}


def esc(text: Any) -> str:
    return html.escape(str(text), quote=False)  # plotly decodes &lt; &gt; &amp; but shows &quot; as is


def mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def fmt_error(err: float | None) -> str:
    if err is None:
        return "n/a"
    if math.isinf(err):
        return "estimate > 0, measured 0"
    return f"{err * 100:+.1f}%"


def _layout(title: str, ytitle: str, **extra: Any) -> dict[str, Any]:
    layout = {
        "title": {"text": esc(title)},
        "yaxis": {"title": {"text": ytitle}},
        "margin": {"l": 70, "r": 20, "t": 50, "b": 60},
        "legend": {"orientation": "v"},
        "hovermode": "closest",
    }
    layout.update(extra)
    return layout


def _category_bars(run: dict[str, Any], loc: str, cat: str, x: list[list[str]], y: list, hover: list[str]) -> dict[str, Any]:
    """One category's bars (rank x measured/estimated on the x axis), in the category's colour;
    host bytes hatched."""
    trace = {
        "type": "bar", "name": f"{loc}/{cat}" if run["shows_host"] else cat,
        "x": x, "y": y, "text": hover, "hoverinfo": "text", "textposition": "none",
        "marker": {"color": CATEGORY_COLOURS[cat]},
    }
    if loc == "host":
        trace["marker"]["pattern"] = {"shape": "/"}
    return trace


def rest_bars(run: dict[str, Any]) -> dict[str, Any]:
    """Per rank, at rest, every category stacked: measured beside estimated (multicategory x)."""
    ranks = [r for r in run["ranks"] if r["measured"] is not None]
    kinds = ["measured", "estimated"] if run["has_estimate"] else ["measured"]
    locations = LOCATIONS if run["shows_host"] else ("device",)
    traces = []
    for loc in locations:
        for cat in CATEGORIES:
            outer, inner, y, hover = [], [], [], []
            for r in ranks:
                cell = next(c for c in r["cells"] if c["location"] == loc and c["category"] == cat)
                for kind in kinds:
                    v = cell[kind]
                    outer.append(f"rank {r['rank']}")
                    inner.append(kind)
                    y.append(mib(v))
                    hover.append(f"{loc}/{cat} {kind}: {format_bytes(v) if v is not None else 'n/a'} "
                                 f"({v} B)<br>estimate error: {fmt_error(cell['error'])}")
            traces.append(_category_bars(run, loc, cat, [outer, inner], y, hover))
    return {"data": traces, "layout": _layout("At rest per rank: every category, measured beside estimated",
                                              "MiB", barmode="stack")}


def timeline(run: dict[str, Any]) -> dict[str, Any]:
    traces = []
    for t in run["timeline"]:
        traces.append({
            "type": "scatter", "mode": "lines+markers" if len(t["x"]) <= 60 else "lines",
            # 6 decimals of MiB is byte resolution; keeps the 64-rank x 1,000-step page small
            "name": f"rank {t['rank']}", "x": t["x"], "y": [round(v / MIB, 6) for v in t["y"]],
            "text": t["labels"], "hovertemplate": f"rank {t['rank']}, %{{text}}: %{{y:.2f}} MiB<extra></extra>",
        })
    peaks = [r for r in run["ranks"] if r["peak"] is not None]
    traces.append({
        "type": "scatter", "mode": "markers", "name": "peak of each rank",
        "x": [r["peak"]["step"] + PHASES.index(r["peak"]["phase"]) / len(PHASES) for r in peaks],
        "y": [mib(r["peak"]["bytes"]) for r in peaks],
        "text": [f"rank {r['rank']} peak: {format_bytes(r['peak']['bytes'])} ({r['peak']['bytes']} B), "
                 f"step {r['peak']['step']} {r['peak']['phase']}" for r in peaks],
        "hoverinfo": "text", "marker": {"symbol": "star", "size": 14, "color": "#d62728"},
    })
    sub = " (bucket maxima)" if run["downsampled"] else ""
    return {"data": traces, "layout": _layout(
        f"Device memory at each phase's peak, per rank{sub}", "MiB",
        xaxis={"title": {"text": "step (+1/3 backward, +2/3 optimizer step)"}})}


def peak_bars(run: dict[str, Any], phase: str) -> dict[str, Any]:
    """Per rank, at ``phase``'s peak of the last complete step, every category stacked: measured
    beside estimated (the estimator's breakdown of that phase's peak moment)."""
    ranks = [r for r in run["ranks"] if r["phase_breakdowns"]]
    has_est = any(next(b for b in r["phase_breakdowns"] if b["phase"] == phase)["estimated"] is not None
                  for r in ranks)
    kinds = ["measured", "estimated"] if has_est else ["measured"]
    locations = LOCATIONS if run["shows_host"] else ("device",)
    traces = []
    for loc in locations:
        for cat in CATEGORIES:
            outer, inner, y, hover = [], [], [], []
            for r in ranks:
                b = next(b for b in r["phase_breakdowns"] if b["phase"] == phase)
                cell = next(c for c in b["cells"] if c["location"] == loc and c["category"] == cat)
                for kind in kinds:
                    v = cell[kind]
                    total = b[f"{kind}_total"]
                    outer.append(f"rank {r['rank']}")
                    inner.append(kind)
                    y.append(mib(v))
                    shown = format_bytes(total) if total is not None else "n/a"
                    hover.append(f"rank {r['rank']} {kind}, step {b['step']} {phase} peak ({shown})<br>"
                                 f"{loc}/{cat}: {format_bytes(v) if v is not None else 'n/a'} ({v} B), "
                                 f"error {fmt_error(cell['error'])}{' of the peak' if cell['tolerance'] is not None else ''}")
            traces.append(_category_bars(run, loc, cat, [outer, inner], y, hover))
    layout = _layout(f"{phase} peak", "MiB", barmode="stack", showlegend=False,  # colours: the at-rest chart's legend
                     margin={"l": 60, "r": 10, "t": 40, "b": 60})
    layout["title"].update(x=0.01, xanchor="left")  # clear of the mode bar on a narrow chart
    return {"data": traces, "layout": layout}


def stacked_timeline(run: dict[str, Any]) -> dict[str, Any]:
    """One rank's device bytes by category at each phase's peak and end through the steps,
    stacked, with the estimate's total at the moments it models overlaid."""
    t = run["stacked_timeline"]
    traces = []
    x = [round(v, 6) for v in t["x"]]
    for j, cat in enumerate(CATEGORIES):
        trace = {
            "type": "scatter", "mode": "lines", "name": cat, "stackgroup": "measured",
            # 6 decimals of MiB is byte resolution
            "x": x, "y": [round(v / MIB, 6) for v in t["device"][cat]],
            "line": {"width": 0.5, "color": CATEGORY_COLOURS[cat]}, "fillcolor": CATEGORY_COLOURS[cat],
            "hovertemplate": f"{cat}: %{{y:.3f}} MiB<extra></extra>",
        }
        if j == 0:  # one hover box lists every category at the moment (hovermode "x unified"); it opens with the moment
            trace["text"] = [f"{label} (device total {format_bytes(tot)})" for label, tot in zip(t["labels"], t["total"])]
            trace["hovertemplate"] = f"%{{text}}<br>{cat}: %{{y:.3f}} MiB<extra></extra>"
        traces.append(trace)
    e = t["estimate"]
    if e is not None:
        traces.append({
            "type": "scatter", "mode": "lines+markers", "name": "estimate (total)", "x": [round(v, 6) for v in e["x"]],
            "y": [round(v / MIB, 6) for v in e["y"]], "line": {"color": "#111", "dash": "dash", "width": 1.5},
            "marker": {"symbol": "diamond-open", "size": 7, "color": "#111"},
            "text": [f"{label}: {v / MIB:.3f} MiB ({v:,} B)<br>"
                     + "<br>".join(f"  estimated {cat}: {n / MIB:.3f} MiB" for cat, n in b.items() if n)
                     for label, v, b in zip(e["labels"], e["y"], e["device"])],
            "hovertemplate": "%{text}<extra></extra>",
        })
    sub = " (per bucket of steps, the step with the highest peak)" if run["downsampled"] else ""
    return {"data": traces, "layout": _layout(
        f"Rank {t['rank']} (highest peak): device memory by category at each phase's peak and end{sub}", "MiB",
        hovermode="x unified",
        xaxis={"title": {"text": "step (+0 forward, +1/3 backward, +2/3 optimizer step; peak, then end +1/6)"},
               "hoverformat": ".3f"})}


def heatmap(run: dict[str, Any]) -> dict[str, Any]:
    h = run["heatmap"]
    missing = set(h["missing"])
    ylabels = [f"rank {rk} (missing)" if rk in missing else f"rank {rk}" for rk in h["ranks"]]
    text = [[("no record" if v is None else f"{format_bytes(v)} ({v} B)") for v in row] for row in h["bytes"]]
    # at least +-1% of colour range: a few bytes of difference should look like balance, not alarm
    spread = max([abs(v) for row in h["deviation_pct"] for v in row if v is not None] + [1.0])
    return {"data": [{
        "type": "heatmap", "z": h["deviation_pct"], "x": h["columns"], "y": ylabels, "text": text,
        "hovertemplate": "%{y}, %{x}<br>%{text}<br>%{z:+.2f}% vs the mean of ranks<extra></extra>",
        # white at the mean (plotly's "RdBu" is grey there), blue below, red above
        "colorscale": [[0, "#2166ac"], [0.5, "#f7f7f7"], [1, "#b2182b"]], "zmin": -spread, "zmax": spread, "hoverongaps": True,
        "colorbar": {"title": {"text": "% vs mean"}},
    }], "layout": _layout("Imbalance at rest: each rank's bytes vs the mean of the ranks, per category", "",
                          yaxis={"autorange": "reversed", "type": "category"},
                          height=max(300, min(1400, 40 + 18 * len(ylabels))))}


def loss(run: dict[str, Any]) -> dict[str, Any]:
    lo = run["loss"]
    return {"data": [
        {"type": "scatter", "mode": "lines", "name": "min over ranks", "x": lo["x"], "y": lo["min"],
         "line": {"width": 0}, "showlegend": False, "hoverinfo": "skip"},
        {"type": "scatter", "mode": "lines", "name": "min-max over ranks", "x": lo["x"], "y": lo["max"],
         "fill": "tonexty", "line": {"width": 0}, "fillcolor": "rgba(99,110,250,0.2)"},
        {"type": "scatter", "mode": "lines+markers" if len(lo["x"]) <= 60 else "lines", "name": "mean over ranks",
         "x": lo["x"], "y": lo["mean"], "line": {"color": "#636EFA"}},
    ], "layout": _layout("Loss" + (" (bucket means)" if run["downsampled"] else ""), "loss",
                         xaxis={"title": {"text": "step"}})}


def model_state_bars(sweep: dict[str, Any]) -> dict[str, Any]:
    traces = []
    for cat in MODEL_STATE_CATEGORIES:
        outer, inner, y, text = [], [], [], []
        for run in sweep["model_states"]:
            for r in run["ranks"]:
                outer.append(esc(run["label"]))
                inner.append(f"r{r['rank']}")
                y.append(mib(r[cat]))
                text.append(f"{esc(run['label'])} rank {r['rank']} {cat}: "
                            f"{'n/a' if r[cat] is None else format_bytes(r[cat])}")
        traces.append({"type": "bar", "name": cat, "x": [outer, inner], "y": y, "text": text,
                       "hoverinfo": "text", "textposition": "none", "marker": {"color": CATEGORY_COLOURS[cat]}})
    return {"data": traces, "layout": _layout("Model states per rank at rest, per run (device + host)", "MiB",
                                              barmode="stack", margin={"l": 70, "r": 20, "t": 50, "b": 160})}


def zero_saving(group: dict[str, Any]) -> dict[str, Any]:
    """Model states per rank against world size: one line per sharding scheme (ZeRO stage, FSDP2)."""
    traces = []
    schemes = sorted({p["scheme"] for p in group["points"]}, key=scheme_order)
    for scheme in schemes:
        pts = [p for p in group["points"] if p["scheme"] == scheme]
        x = [p["world_size"] for p in pts]
        for kind, style in (("measured", {"mode": "lines+markers"}),
                            ("formula", {"mode": "lines", "line": {"dash": "dash"}}),
                            ("estimated", {"mode": "markers", "marker": {"symbol": "circle-open", "size": 11}})):
            y = [mib(p[kind]) for p in pts]
            if all(v is None for v in y):
                continue
            name = {"measured": "measured", "formula": "paper formula", "estimated": "memprof estimate"}[kind]
            traces.append({"type": "scatter", "name": f"{esc(scheme)} {name}", "x": x, "y": y,
                           "legendgroup": esc(scheme), **style,
                           "text": [f"{esc(p['label'])}: {kind} {format_bytes(p[kind]) if p[kind] is not None else 'n/a'}"
                                    for p in pts], "hoverinfo": "text"})
    title = ("Sharding saving: model states per rank vs world size "
             f"({esc(group['model'])}, {esc(group['optimizer'])}, {esc(group['precision'])})")
    return {"data": traces, "layout": {**_layout("", "MiB per rank (worst rank)",
                                                 xaxis={"title": {"text": "world size N"},
                                                        "tickvals": sorted({p["world_size"] for p in group["points"]})}),
                                       "title": {"text": title}}}


def loss_vs_memory(sweep: dict[str, Any]) -> dict[str, Any]:
    traces = []
    for opt, pts in sorted(sweep["loss_vs_memory"].items()):
        traces.append({"type": "scatter", "mode": "markers", "name": esc(opt), "marker": {"size": 12},
                       "x": [mib(p["peak_bytes"]) for p in pts], "y": [p["final_loss"] for p in pts],
                       "text": [f"{esc(p['label'])}<br>peak {format_bytes(p['peak_bytes'])}, "
                                f"loss {p['final_loss']:.4f} at step {p['step']}" for p in pts],
                       "hoverinfo": "text"})
    return {"data": traces, "layout": _layout("Loss against memory per optimizer (final loss vs worst rank's peak)",
                                              "final loss (mean over ranks)",
                                              xaxis={"title": {"text": "peak device memory, MiB"}})}
