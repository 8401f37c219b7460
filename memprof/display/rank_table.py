"""The end-of-run per-rank table: one row per rank with its highest phase peak split by category,
host bytes, peak RSS and status. Printed by the launcher and the integrations at the end of a run
(:func:`memprof.end_of_run.finish_run`) and by :meth:`memprof.measure.MemoryProfiler.print_table`."""

from __future__ import annotations

from typing import Any

from memprof.categories import CATEGORIES
from memprof.display.console import output_console
from memprof.display.tables import Column, fitted_tables
from memprof.units import format_bytes


def worst_phase(rank_entry: dict[str, Any]) -> tuple[Any, str, dict[str, Any]] | None:
    """(step, phase, record) of the rank's highest phase peak, or None if it recorded no phase."""
    worst = None
    for step in rank_entry.get("steps") or []:
        for phase, rec in (step.get("phases") or {}).items():
            if worst is None or rec.get("peak_total", 0) > worst[2].get("peak_total", 0):
                worst = (step.get("step"), phase, rec)
    return worst


def _title(run_doc: dict[str, Any]) -> str:
    run = run_doc.get("run") or {}
    title = f"memprof: peak memory per rank ({run.get('device_type', '?')} run"
    if run.get("device_type") == "cpu":
        title += "; 'device' is the CPU memory used for compute"
    return title + ")"


def _rank_row(entry: dict[str, Any]) -> list[str]:
    worst = worst_phase(entry)
    status = "OOM" if entry.get("oom") else ("complete" if entry.get("complete") else "incomplete")
    if worst is None:
        row = [str(entry.get("rank")), "-", "-", *("-" for _ in CATEGORIES), "-"]
    else:
        step, phase, rec = worst
        peak = rec.get("peak") or {}
        device = peak.get("device") or {}
        host_total = sum(int(v) for v in (peak.get("host") or {}).values())
        row = [
            str(entry.get("rank")),
            f"step {step} {phase}",
            format_bytes(rec.get("peak_total", 0)),
            *(format_bytes(device.get(cat, 0)) for cat in CATEGORIES),
            format_bytes(host_total),
        ]
    rss = entry.get("peak_host_rss_bytes")
    return row + [format_bytes(rss) if rss is not None else "-", status]


def print_rank_table(run_doc: dict[str, Any], console: Any = None) -> None:
    """Print one row per rank: its highest phase peak split by category, host bytes, peak RSS,
    status. ``console``: where to print (default :func:`memprof.display.console.output_console`)."""
    title = _title(run_doc)
    columns = [Column("rank"), Column("peak at"), Column("device peak", numeric=True),
               *(Column(cat, numeric=True) for cat in CATEGORIES),
               Column("host", numeric=True), Column("peak RSS", numeric=True), Column("status")]
    rows = [_rank_row(entry) for entry in run_doc.get("ranks") or []]
    for missing in run_doc.get("missing_ranks") or []:
        rows.append([str(missing), *(["-"] * (len(CATEGORIES) + 4)), "missing"])
    console = console if console is not None else output_console()
    tables = fitted_tables(columns, rows, console.width, title)
    if len(tables) > 1:
        # too wide for one table of rank rows: one column per rank instead, if that fits whole
        fields = [Column("")] + [Column(f"rank {r[0]}", numeric=True) for r in rows]
        by_field = [[col.header, *(r[i] for r in rows)] for i, col in enumerate(columns) if i > 0]
        transposed = fitted_tables(fields, by_field, console.width, title)
        if len(transposed) == 1:
            tables = transposed
    for t in tables:
        console.print(t)
