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
from memprof.run.files import load_run

FIX = Path(__file__).parent / "fixtures" / "report"
MIB = 2**20
P_TINY = 149_248  # gpt2-tiny's parameters (derived in test_report_data.py)
ENGINE_RUNS = ("fsdp2_gpt2_tiny.json", "zero3_gpt2_tiny.json")
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
        # real 2-rank runs (tests/fixtures/make_engine_fixtures.py): FSDP2 beside ZeRO-3, LoRA
        "engines": write_report([load_run(FIX / "engines" / n) for n in ENGINE_RUNS], out / "engines.html",
                                sources=list(ENGINE_RUNS), estimate_missing=True),
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
    assert names == ["run0-bars", "run0-peak-forward", "run0-peak-backward", "run0-peak-step", "run0-timeline",
                     "run0-stacked", "run0-heatmap", "run0-loss"]
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
    run = doc["run"]
    assert summary["Gradient accumulation"] == str(run["gradient_accumulation_steps"]) == "1"
    assert summary["Activation checkpointing"] == "False" and summary["Precision"] == "fp32"
    assert summary["Micro-batch x sequence"] == "1 x 64" and summary["Offload"] == "optimizer: none, params: none"
    assert summary["Samples per optimizer step"] == "2 (1 x 1 x 2 ranks)"
    # the fixture's estimate is within every tolerance (params exact, peaks within 5%)
    assert browser.evaluate("document.querySelector('.verdict').dataset.check") == "pass"


def test_each_peak_is_shown_by_category_measured_beside_estimated(browser, reports):
    open_clean(browser, reports["one"])
    doc = raw("one_run.json")
    cats = ["params", "master_params", "grads", "optimizer_state", "comm_buffers", "activations", "other"]
    for phase in ("forward", "backward", "step"):
        bars = {t["name"]: t for t in chart_data(browser, f"run0-peak-{phase}")}
        assert list(bars) == cats
        for cat, t in bars.items():
            want = []
            for r in (0, 1):
                want += [doc["ranks"][r]["steps"][-1]["phases"][phase]["peak"]["device"][cat] / MIB,
                         doc["estimate"]["ranks"][r]["phases"][phase]["peak"]["device"][cat] / MIB]
            assert t["y"] == pytest.approx(want, rel=1e-12), (phase, cat)
            assert t["x"] == [["rank 0", "rank 0", "rank 1", "rank 1"], ["measured", "estimated"] * 2]
        # drawn: one bar path per rank and kind in every category's trace
        n_bars = browser.evaluate(
            f"document.querySelectorAll('div.chart[data-chart=\"run0-peak-{phase}\"] g.point').length")
        assert n_bars == len(cats) * 4
    # the table holds the same bytes, exact
    cells = browser.evaluate(
        "Array.from(document.querySelectorAll('table.peak-breakdown td[data-category]')).map(td => ({"
        " rank: +td.parentElement.dataset.rank, phase: td.parentElement.dataset.phase, cat: td.dataset.category,"
        " bytes: +td.dataset.bytes, est: td.querySelector('.est') && +td.querySelector('.est').dataset.bytes}))")
    assert len(cells) == 2 * 3 * (len(cats) + 1)
    for c in cells:
        rec = doc["ranks"][c["rank"]]["steps"][-1]["phases"][c["phase"]]
        est = doc["estimate"]["ranks"][c["rank"]]["phases"][c["phase"]]
        if c["cat"] == "total":
            assert (c["bytes"], c["est"]) == (rec["peak_total"], est["peak_total"])
        else:
            assert (c["bytes"], c["est"]) == (rec["peak"]["device"][c["cat"]], est["peak"]["device"][c["cat"]])


def test_stacked_timeline_by_category_with_the_estimate_overlaid(browser, reports):
    open_clean(browser, reports["one"])
    doc = raw("one_run.json")
    peaks = {e["rank"]: max(s["phases"][p]["peak_total"] for s in e["steps"] for p in s["phases"]) for e in doc["ranks"]}
    worst = max(peaks, key=lambda r: (peaks[r], -r))
    assert browser.evaluate("+document.querySelector('.stacked-note').dataset.rank") == worst
    traces = {t["name"]: t for t in chart_data(browser, "run0-stacked")}
    cats = ["params", "master_params", "grads", "optimizer_state", "comm_buffers", "activations", "other"]
    assert list(traces) == [*cats, "estimate (total)"]
    entry = doc["ranks"][worst]
    for cat in cats:
        want = [s["phases"][p][k]["device"][cat] / MIB for s in entry["steps"] for p in ("forward", "backward", "step")
                for k in ("peak", "end")]
        assert traces[cat]["y"] == pytest.approx(want, abs=1e-6), cat
        assert traces[cat]["x"] == pytest.approx([s + i / 3 + d for s in range(1, 6) for i in range(3) for d in (0, 1 / 6)])
    est = doc["estimate"]["ranks"][worst]
    per_step = [est["phases"][p]["peak_total"] / MIB for p in ("forward", "backward", "step")] + [sum(est["device"].values()) / MIB]
    assert traces["estimate (total)"]["y"] == pytest.approx(per_step * 5, abs=1e-6)
    # stacked as plotly drew it: every category filled onto the one below, and the top of the stack at each
    # moment (plotly's computed y of the last category) is that moment's device total in the run file
    drawn = browser.evaluate(
        "(() => { const d = document.querySelector('div.chart[data-chart=\"run0-stacked\"]');"
        " return {fills: d._fullData.filter(t => t.stackgroup).map(t => t.fill),"
        " top: d.calcdata[6].map(p => p.y), areas: Array.from(d.querySelectorAll('path.js-fill'))"
        ".filter(p => (p.getAttribute('d') || '').length > 20).length}; })()")
    assert drawn["fills"] == ["tonexty"] * len(cats) and drawn["areas"] >= len(cats)
    totals = [sum(s["phases"][p][k]["device"].values()) / MIB for s in entry["steps"] for p in ("forward", "backward", "step")
              for k in ("peak", "end")]
    assert drawn["top"] == pytest.approx(totals, abs=1e-5)


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
    assert len([n for n in names if n.startswith("run")]) == 8 * 10  # ten runs, eight charts each
    lvm = chart_data(browser, "sweep-loss-vs-memory")
    assert sorted(t["name"] for t in lvm) == ["adamw", "momentum", "rmsprop", "sgd"]
    # ZeRO formula in the table: AdamW fp32 stage 3 on 4 ranks = 16Ψ/4, stage 0 on 2 ranks = 16Ψ
    formula = browser.evaluate(
        "Array.from(document.querySelectorAll('table.zero-table tr')).filter(tr => tr.querySelector('td'))"
        ".map(tr => [tr.cells[1].textContent,"
        " tr.cells[2].textContent, tr.querySelector('td[data-kind=\"formula\"]').dataset.bytes])")
    table = {(s, n): int(b) for s, n, b in formula if b is not None}
    assert table[("ZeRO-3", "4")] == 4 * P_TINY and table[("ZeRO-0", "2")] == 16 * P_TINY
    zero = {t["name"]: t for t in chart_data(browser, "sweep-zero-0")}
    assert zero["ZeRO-2 paper formula"]["x"] == [1, 2, 4]
    assert zero["ZeRO-2 paper formula"]["y"] == pytest.approx([(4 + 12 / n) * P_TINY / MIB for n in (1, 2, 4)], rel=1e-5)


def test_fsdp2_beside_zero3(browser, reports):
    """The side-by-side table of an FSDP2 and a ZeRO-3 run shows the bytes of the raw run files,
    each run headed by its engine and settings; every chart of both runs is drawn."""
    open_clean(browser, reports["engines"])
    docs = [json.loads((FIX / "engines" / n).read_text()) for n in ENGINE_RUNS]
    cells = browser.evaluate(
        "Array.from(document.querySelectorAll('#sweep-side-by-side tr[data-moment]')).flatMap(tr =>"
        " Array.from(tr.querySelectorAll('td')).map(td => ({moment: tr.dataset.moment, loc: tr.dataset.location,"
        " cat: tr.dataset.category, run: +td.dataset.run, rank: +td.dataset.rank, bytes: td.dataset.bytes,"
        " text: td.firstChild.textContent})))")
    assert len(cells) == 4 * 8 * 4  # 4 moments x (7 categories + total) x (2 runs x 2 ranks)
    for c in cells:
        last = docs[c["run"]]["ranks"][c["rank"]]["steps"][-1]["phases"]
        b = last["step"]["end"] if c["moment"] == "rest" else last[c["moment"]]["peak"]
        if c["cat"] == "total":
            want = sum(b["device"].values()) if c["moment"] == "rest" else last[c["moment"]]["peak_total"]
        else:
            want = b["device"][c["cat"]]
        assert int(c["bytes"]) == want and c["text"] == shown_bytes(want), c
    heads = browser.evaluate("Array.from(document.querySelectorAll('#sweep-side-by-side th.run-head')).map(th =>"
                             " [th.dataset.engine, th.querySelector('.engine-title').textContent,"
                             " Array.from(th.querySelectorAll('li')).map(li => li.dataset.setting)])")
    assert heads[0][:2] == ["fsdp2", "FSDP2 (torch fully_shard)"] and "reshard_after_forward" in heads[0][2]
    assert heads[1][:2] == ["deepspeed", "DeepSpeed ZeRO stage 3"] and "stage3_prefetch_bucket_size" in heads[1][2]
    schemes = browser.evaluate("Array.from(document.querySelectorAll('table.zero-table tr[data-scheme]'))"
                               ".map(tr => tr.cells[1].textContent)")
    assert schemes == ["ZeRO-3", "FSDP2"]
