"""Benchmark: the HTML report of a 64-rank x 1,000-step run (synthetic numbers, real schema).

Measures
* build: ``write_report([run_doc], path)`` from the doc in memory (shape check, data, charts, HTML,
  atomic write) -- the launcher's path; target < 2 s. First call (reads plotly.js) and best of N.
* load: ``load_run`` of the same run as a memprof.json (JSON parsing; reported, not in the target),
  and ``memprof report memprof.json -o ...`` end to end (in-process).
* browser (headless Chromium, when installed): time until every chart is drawn, the longest
  main-thread task while loading (a long task is when the page cannot answer input), and the time a
  zoom and a legend toggle take on the biggest chart (the per-rank timeline).

    .venv/bin/python benchmarks/bench_report.py [--ranks 64] [--steps 1000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

from browser_setup import chromium_path  # noqa: E402
from make_report_fixtures import synthetic_run  # noqa: E402

from memprof.cli import main as memprof_main  # noqa: E402
from memprof.report import collector_paused, write_report  # noqa: E402
from memprof.report.render import plotly_js  # noqa: E402
from memprof.run.files import load_run, write_json_atomic  # noqa: E402

BUILD_TARGET_S = 2.0

# registered before the page's own scripts so every long task of the load is seen
_LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver(l => l.getEntries().forEach(e => window.__longTasks.push(e.duration)))
  .observe({type: 'longtask', buffered: true});
"""

_INTERACT = """
(async () => {
  const gd = document.querySelector('div.chart[data-chart="run0-timeline"]');
  let t = performance.now();
  await Plotly.relayout(gd, {'xaxis.range': [100, 200]});
  const zoom = performance.now() - t;
  t = performance.now();
  await Plotly.restyle(gd, {visible: 'legendonly'}, [0]);
  const toggle = performance.now() - t;
  return {zoom_ms: zoom, toggle_ms: toggle};
})()
"""


def browser_metrics(path: Path) -> dict[str, float] | None:
    exe = chromium_path()
    if exe is None:
        return None
    from headless import Chromium

    with Chromium(exe, timeout_s=300) as c:
        c.call("Page.addScriptToEvaluateOnNewDocument", {"source": _LONG_TASKS})
        wall = c.open(path)
        errors = c.log.errors()
        drawn_ms = float(c.evaluate("document.body.dataset.chartsDrawnMs"))
        long_tasks = c.evaluate("window.__longTasks") or []
        interact = c.evaluate(_INTERACT, await_promise=True)
    return {
        "open_wall_s": wall,
        "charts_drawn_ms": drawn_ms,
        "longest_task_ms": max(long_tasks, default=0.0),
        "long_tasks": len(long_tasks),
        "zoom_ms": interact["zoom_ms"],
        "legend_toggle_ms": interact["toggle_ms"],
        "console_errors": len(errors),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    doc = synthetic_run(world_size=args.ranks, steps=args.steps, stage=3, seed=1)
    results: dict[str, object] = {"ranks": args.ranks, "steps": args.steps, "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        out = Path(tmp) / "report.html"
        plotly_js.cache_clear()
        t = time.perf_counter()
        write_report([doc], out)
        results["build_first_s"] = time.perf_counter() - t
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            write_report([doc], out)
            times.append(time.perf_counter() - t)
        results["build_best_s"] = min(times)
        results["html_mib"] = out.stat().st_size / 2**20

        run_file = Path(tmp) / "memprof.json"
        write_json_atomic(run_file, doc)
        results["memprof_json_mib"] = run_file.stat().st_size / 2**20
        t = time.perf_counter()
        with collector_paused():  # as `memprof report` reads runs
            load_run(run_file)
        results["load_run_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = memprof_main(["report", str(run_file), "-o", str(out)])
        results["cli_total_s"] = time.perf_counter() - t
        assert rc == 0

        if not args.no_browser:
            results["browser"] = browser_metrics(out)
    results["build_target_s"] = BUILD_TARGET_S
    results["build_ok"] = results["build_first_s"] < BUILD_TARGET_S

    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"report of {args.ranks} ranks x {args.steps} steps (load average {results['load_average']:.1f}):")
        print(f"  write_report first call {results['build_first_s']:.2f} s, best of {args.rounds} "
              f"{results['build_best_s']:.2f} s (target < {BUILD_TARGET_S} s): {'ok' if results['build_ok'] else 'SLOW'}")
        print(f"  html {results['html_mib']:.1f} MiB; memprof.json {results['memprof_json_mib']:.0f} MiB, "
              f"load_run {results['load_run_s']:.2f} s; memprof report end to end {results['cli_total_s']:.2f} s "
              "(reading the file is not in the target)")
        b = results.get("browser")
        if b:
            print(f"  chromium: charts drawn {b['charts_drawn_ms']:.0f} ms after navigation, longest task "
                  f"{b['longest_task_ms']:.0f} ms ({b['long_tasks']} tasks > 50 ms), zoom {b['zoom_ms']:.0f} ms, "
                  f"legend toggle {b['legend_toggle_ms']:.0f} ms, console errors {b['console_errors']}")
        elif not args.no_browser:
            print("  chromium not found: browser metrics skipped (python tests/browser_setup.py --install)")
    return 0 if results["build_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
