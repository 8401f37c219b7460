"""Report data -> one self-contained HTML file (jinja2 with autoescaping, plotly.js embedded once).

No network: plotly.js is read from the installed plotly package at render time and inlined; each
figure is JSON inside ``<script type="application/json">`` with ``<``, ``>`` and ``&`` escaped as
``\\u003c`` etc., so no run-file text can close the script element or become markup.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from functools import lru_cache
from typing import Any

import jinja2
import plotly.io as pio
from markupsafe import Markup
from plotly.offline import get_plotlyjs_version

from memprof import __version__
from memprof.categories import CATEGORIES, LOCATIONS, MODEL_STATE_CATEGORIES, PHASES
from memprof.report import figures
from memprof.units import format_bytes

_SCRIPT_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_JSON_RE = re.compile("[<>&\u2028\u2029]")


def json_for_script(obj: Any) -> Markup:
    """JSON safe to place inside a <script> element: nothing in it can end the element."""
    text = pio.to_json(obj, validate=False, engine="json")
    return Markup(_SCRIPT_JSON_RE.sub(lambda m: _SCRIPT_JSON_ESCAPES[m.group(0)], text))


@lru_cache(maxsize=1)
def plotly_js() -> Markup:
    """plotly.js as bundled with the installed plotly package (read once per process)."""
    from plotly.offline import get_plotlyjs

    # the bundle holds no "</script" today; guard anyway, since it is inlined verbatim
    return Markup(re.sub(r"</(script)", r"<\\/\1", get_plotlyjs(), flags=re.IGNORECASE))


def _fmt_bytes(n: Any) -> str:
    return "n/a" if n is None else format_bytes(int(n))


def _fmt_pct(x: Any) -> str:
    return figures.fmt_error(x)


def _fmt_ratio(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("memprof.report", "templates"),
        autoescape=True,  # every run-file string is untrusted text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["bytes"] = _fmt_bytes
    env.filters["pct"] = _fmt_pct
    env.filters["ratio"] = _fmt_ratio
    return env


class _Charts:
    """Collects figures in page order; each gets an id the template places."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, fig: dict[str, Any]) -> dict[str, Any]:
        chart = {"id": f"chart-{len(self.items)}", "name": name, "traces": len(fig["data"]),
                 "json": json_for_script(fig)}
        self.items.append(chart)
        return chart


def render_html(data: dict[str, Any], title: str | None = None) -> str:
    """The whole page for :func:`memprof.report.data.build_report_data`'s output."""
    charts = _Charts()
    runs = []
    for i, run in enumerate(data["runs"]):
        c: dict[str, Any] = {"bars": None, "peaks": [], "timeline": None, "stacked": None, "heatmap": None,
                             "loss": None}
        has_rest = any(r["measured"] is not None for r in run["ranks"])
        # added in page order, so chart ids follow the page
        if has_rest:
            c["bars"] = charts.add(f"run{i}-bars", figures.rest_bars(run))
            c["peaks"] = [charts.add(f"run{i}-peak-{phase}", figures.peak_bars(run, phase)) for phase in PHASES]
        if any(t["x"] for t in run["timeline"]):
            c["timeline"] = charts.add(f"run{i}-timeline", figures.timeline(run))
        if run["stacked_timeline"] is not None and run["stacked_timeline"]["x"]:
            c["stacked"] = charts.add(f"run{i}-stacked", figures.stacked_timeline(run))
        if has_rest:
            c["heatmap"] = charts.add(f"run{i}-heatmap", figures.heatmap(run))
        if run["loss"]["x"]:
            c["loss"] = charts.add(f"run{i}-loss", figures.loss(run))
        config = run["engine"]["record"]  # the DeepSpeed config, or the fsdp2 / ddp record
        runs.append({"i": i, "d": run, "charts": c,
                     "config_text": None if config is None else json.dumps(config, indent=2, sort_keys=True, default=str)})
    sweep = None
    if data["sweep"] is not None:
        s = data["sweep"]
        sweep = {"d": s, "model_states": charts.add("sweep-model-states", figures.model_state_bars(s)),
                 "zero": [], "loss_vs_memory": None}
        for g in s["zero"]:
            sizes = {p["world_size"] for p in g["points"]}
            sweep["zero"].append({"g": g, "chart": charts.add(f"sweep-zero-{len(sweep['zero'])}", figures.zero_saving(g))
                                  if len(sizes) > 1 else None})
        if s["loss_vs_memory"]:
            sweep["loss_vs_memory"] = charts.add("sweep-loss-vs-memory", figures.loss_vs_memory(s))
    if title is None:
        title = "memprof report: " + (data["runs"][0]["label"] if len(data["runs"]) == 1 else f"{len(data['runs'])} runs")
    return _environment().get_template("report.html.j2").render(
        title=title,
        runs=runs,
        sweep=sweep,
        charts=charts.items,
        plotly_js=plotly_js(),
        plotly_version=get_plotlyjs_version(),
        memprof_version=__version__,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # the template's tables take their columns from memprof.categories, never from literals
        locations=LOCATIONS,
        categories=CATEGORIES,
        model_state_categories=MODEL_STATE_CATEGORIES,
        phases=PHASES,
    )
