"""Reports opened in headless Chromium (Debian's chromium, driven over CDP): the page loads with no
console error and no network request, every chart is drawn with the numbers of the run file, and
``<script>`` markup in a run file shows as text and runs nothing.

One Chromium serves the whole module. Expected numbers come from the raw fixture JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from browser_setup import chromium_path
from memprof.report import write_report
from memprof.runfile import load_run

FIX = Path(__file__).parent / "fixtures" / "report"
MIB = 2**20
P_TINY = 149_248  # gpt2-tiny's parameters (derived in test_report_data.py)
PAYLOAD = '</script><script>window.pwned=1;console.error("pwned")</script><img src=x onerror="window.pwned=2">'


def raw(name: str) -> dict:
    return json.loads((FIX / name).read_text())


def shown_bytes(n: int) -> str:
    """How a byte count should read on the page: 1 decimal in the largest binary unit."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.fail("chromium is missing: `python tests/browser_setup.py --install` (run by make install) installs it")
    try:
        import websocket  # noqa: F401  (websocket-client, in the test extra)
    except ImportError:
        pytest.fail("websocket-client is missing: pip install -e '.[test]' (make install does)")
    from headless import Chromium

    with Chromium(path, timeout_s=120) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reports")
    sweep = sorted((FIX / "sweep").glob("*.json"))
    return {
        "one": write_report([load_run(FIX / "one_run.json")], out / "one.html"),
        "xss": write_report([load_run(FIX / "xss.json")], out / "xss.html"),
        "xss_sweep": write_report([load_run(FIX / "xss.json"), load_run(FIX / "one_run.json")], out / "xss_sweep.html"),
        "gap": write_report([load_run(FIX / "missing_rank")], out / "gap.html"),
        "sweep": write_report([load_run(p) for p in sweep], out / "sweep.html", sources=[p.name for p in sweep]),
    }


def open_clean(browser, path: Path) -> None:
    """Open ``path``, wait for every chart, and check nothing went wrong or over the network."""
    browser.open(path)
    assert browser.log.errors() == []
    page = path.resolve().as_uri()
    assert [u for u in browser.log.requests if u != page and not u.startswith("data:")] == []
    charts = browser.evaluate(
        "Array.from(document.querySelectorAll('div.chart')).map(d => ({name: d.dataset.chart, drawn: d.dataset.drawn,"
        " svgs: d.querySelectorAll('.main-svg').length, traces: (d.data || []).length, want: +d.dataset.traces}))")
    assert charts, "no chart on the page"
    for c in charts:
        assert c["drawn"] == "1" and c["svgs"] >= 1 and c["traces"] == c["want"] > 0, c
    assert browser.evaluate("+document.body.dataset.chartsDrawn") == len(charts)


def chart_data(browser, name: str) -> list[dict]:
    return browser.evaluate(
        f"document.querySelector('div.chart[data-chart=\"{name}\"]').data.map(t => ({{name: t.name, x: t.x, y: t.y}}))")


def test_one_run_page_numbers_match_the_json(browser, reports):
    open_clean(browser, reports["one"])
    names = browser.evaluate("Array.from(document.querySelectorAll('div.chart')).map(d => d.dataset.chart)")
    assert names == ["run0-bars", "run0-timeline", "run0-heatmap", "run0-loss"]
    doc = raw("one_run.json")

    cells = browser.evaluate(
        "Array.from(document.querySelectorAll('table.rest td[data-category]')).map(td => ({rank: +td.dataset.rank,"
        " loc: td.dataset.location, cat: td.dataset.category, bytes: td.dataset.bytes, text: td.firstChild.textContent,"
        " est: td.querySelector('.est') && td.querySelector('.est').dataset.bytes}))")
    assert len(cells) == 2 * 8  # device table only (no host bytes): 7 categories + total per rank
    for c in cells:
        entry = doc["ranks"][c["rank"]]
        rest = entry["steps"][-1]["phases"]["step"]["end"]["device"]
        want = sum(rest.values()) if c["cat"] == "total" else rest[c["cat"]]
        assert int(c["bytes"]) == want and c["text"] == shown_bytes(want), c
        est = doc["estimate"]["ranks"][c["rank"]]["device"]
        assert int(c["est"]) == (sum(est.values()) if c["cat"] == "total" else est[c["cat"]])
    assert {c["cat"] for c in cells} >= {"other", "activations", "comm_buffers"}

    # the bars chart plots the same at-rest bytes, in MiB: rank 0 measured then estimated, rank 1 ...
    bars = {t["name"]: t for t in chart_data(browser, "run0-bars")}
    assert list(bars) == ["params", "master_params", "grads", "optimizer_state", "comm_buffers", "activations", "other"]
    for cat, t in bars.items():
        want = []
        for r in (0, 1):
            want += [doc["ranks"][r]["steps"][-1]["phases"]["step"]["end"]["device"][cat] / MIB,
                     doc["estimate"]["ranks"][r]["device"][cat] / MIB]
        assert t["y"] == pytest.approx(want, rel=1e-12)
    # the timeline marks each rank's highest phase peak
    peaks = chart_data(browser, "run0-timeline")[-1]
    assert peaks["y"] == pytest.approx(
        [max(s["phases"][p]["peak_total"] for s in r["steps"] for p in s["phases"]) / MIB for r in doc["ranks"]])
    # the loss chart's mean line
    loss = chart_data(browser, "run0-loss")[-1]
    assert loss["y"] == pytest.approx([sum(r["steps"][i]["loss"] for r in doc["ranks"]) / 2 for i in range(5)])
    summary = browser.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('table.summary td'))"
                               ".map(td => [td.dataset.field, td.textContent]))")
    assert summary["Parameters"] == f"{P_TINY:,}" and summary["ZeRO stage"] == "2" and summary["World size"] == "2"


def test_script_markup_in_a_run_is_text_and_runs_nothing(browser, reports):
    open_clean(browser, reports["xss"])
    assert browser.evaluate("typeof window.pwned") == "undefined"
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    # only the two scripts the report itself writes execute (plotly.js and the chart drawer)
    assert browser.evaluate("document.querySelectorAll('script:not([type=\"application/json\"])').length") == 2
    assert browser.evaluate("document.querySelector('td[data-field=\"Model\"]').textContent") == PAYLOAD
    assert browser.evaluate("document.querySelector('h2').textContent").startswith(PAYLOAD)
    assert PAYLOAD in browser.evaluate("document.title")
    config = browser.evaluate("document.querySelector('pre.ds-config').textContent")
    assert json.loads(config)["comment"] == PAYLOAD and PAYLOAD in json.loads(config)
    assert PAYLOAD in browser.evaluate("Array.from(document.querySelectorAll('ul.assumptions li')).map(li => li.textContent)")
    assert browser.evaluate("document.querySelector('tr[data-rank=\"0\"] td.host').textContent") == PAYLOAD


def test_script_markup_in_chart_labels_is_text(browser, reports):
    open_clean(browser, reports["xss_sweep"])
    assert browser.evaluate("typeof window.pwned") == "undefined"
    texts = browser.evaluate(
        "Array.from(document.querySelectorAll('div.chart[data-chart=\"sweep-model-states\"] text')).map(t => t.textContent)")
    assert any(PAYLOAD in t for t in texts), texts[:20]
    assert browser.evaluate("document.querySelectorAll('img').length") == 0


def test_missing_rank_gap_is_marked(browser, reports):
    open_clean(browser, reports["gap"])
    assert browser.evaluate("document.querySelector('.missing-ranks').dataset.missing") == "1"
    assert browser.evaluate("document.querySelectorAll('table.rest tr.missing[data-rank=\"1\"]').length") == 1
    assert browser.evaluate("document.querySelectorAll('table.rest tr[data-rank]:not(.missing)').length") == 2
    heat = chart_data(browser, "run0-heatmap")[0]
    assert heat["y"] == ["rank 0", "rank 1 (missing)", "rank 2"]


def test_sweep_page(browser, reports):
    open_clean(browser, reports["sweep"])
    names = browser.evaluate("Array.from(document.querySelectorAll('div.chart')).map(d => d.dataset.chart)")
    assert {"sweep-model-states", "sweep-zero-0", "sweep-loss-vs-memory"} <= set(names)
    assert len([n for n in names if n.startswith("run")]) == 4 * 10  # ten runs, four charts each
    lvm = chart_data(browser, "sweep-loss-vs-memory")
    assert sorted(t["name"] for t in lvm) == ["adamw", "momentum", "rmsprop", "sgd"]
    # ZeRO formula in the table: AdamW fp32 stage 3 on 4 ranks = 16Ψ/4, stage 0 on 2 ranks = 16Ψ
    formula = browser.evaluate(
        "Array.from(document.querySelectorAll('table.zero-table tr')).filter(tr => tr.querySelector('td')).map(tr => [tr.cells[1].textContent,"
        " tr.cells[2].textContent, tr.querySelector('td[data-kind=\"formula\"]').dataset.bytes])")
    table = {(s, n): int(b) for s, n, b in formula if b is not None}
    assert table[("3", "4")] == 4 * P_TINY and table[("0", "2")] == 16 * P_TINY
    zero = {t["name"]: t for t in chart_data(browser, "sweep-zero-0")}
    assert zero["ZeRO-2 paper formula"]["x"] == [1, 2, 4]
    assert zero["ZeRO-2 paper formula"]["y"] == pytest.approx([(4 + 12 / n) * P_TINY / MIB for n in (1, 2, 4)], rel=1e-5)
