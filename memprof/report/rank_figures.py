"""Each rank's figures, measured beside estimated: at rest per location and category, its highest
peak, and each phase's peak of the steady cycle (the last complete step; with gradient
accumulation, the micro-step of the last complete cycle with that phase's highest peak) with what
it is made of.

Every figure with an estimate takes its measured, estimated, error and check from
:func:`memprof.compare.comparison_of`'s row, so the page cannot disagree with ``memprof compare --check``.
"""

from __future__ import annotations

from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS, PHASES
from memprof.compare import category_row_name, estimate_for_rank, last_complete_step, peak_snapshots, steady_cycle


def full_breakdown(b: dict[str, dict[str, int]] | None) -> dict[str, dict[str, int]]:
    """Every location and category present (``other`` included), ints."""
    b = b or {}
    return {loc: {cat: int((b.get(loc) or {}).get(cat, 0)) for cat in CATEGORIES} for loc in LOCATIONS}


def figure(row: Any, measured: int | None, estimated: int | None) -> dict[str, Any]:
    """measured, estimated, error and check of one figure: ``memprof compare``'s row when it has one
    (so the page shows exactly what ``compare --check`` checks), else measured only."""
    if row is not None:
        return {"measured": row.measured, "estimated": row.estimated, "error_bytes": row.estimated - row.measured,
                "error": row.error, "ok": row.ok, "tolerance": row.tolerance}
    return {"measured": measured, "estimated": estimated, "error_bytes": None, "error": None, "ok": None,
            "tolerance": None}


def _phase_figures(rank: int, cycle: list[dict[str, Any]], est: dict[str, Any] | None,
                   rows: dict[tuple[int, str, str, str], Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each phase's peak (total, measured beside estimated) and what it is made of: the device
    bytes of every category at the peak snapshot compare reads (:func:`memprof.compare.peak_snapshots`
    of the steady cycle), beside the estimate's breakdown of that phase's peak moment
    (``phases[phase]["peak"]``); each device category's error is compare's category row's, a share
    of the phase's measured peak."""
    snapshots = peak_snapshots(cycle)
    phase_peaks, phase_breakdowns = [], []
    for phase in PHASES:
        e_phase = ((est or {}).get("phases") or {}).get(phase)
        snap = snapshots.get(phase)
        m_total = int(snap["phases"][phase]["peak_total"]) if snap else None
        fig = figure(rows.get((rank, "peak", "device", phase)), m_total,
                     int(e_phase["peak_total"]) if e_phase else None)
        phase_peaks.append({"phase": phase, **fig})
        if snap is None:
            continue
        m_b = full_breakdown(snap["phases"][phase]["peak"])
        e_b = full_breakdown(e_phase["peak"]) if e_phase and e_phase.get("peak") is not None else None
        cells = []
        for loc in LOCATIONS:
            for cat in CATEGORIES:
                row = rows.get((rank, "category", loc, category_row_name(phase, cat)))
                cell = figure(row, m_b[loc][cat], None if e_b is None else e_b[loc][cat])
                cells.append({"location": loc, "category": cat, **cell})
        phase_breakdowns.append({
            "phase": phase, "step": int(snap["step"]),
            "measured": m_b, "estimated": e_b,
            "measured_total": fig["measured"], "estimated_total": fig["estimated"], "total_error": fig["error"],
            "cells": cells,
        })
    return phase_peaks, phase_breakdowns


def rank_data(entry: dict[str, Any], estimate: dict[str, Any] | None,
              rows: dict[tuple[int, str, str, str], Any], gas: int = 1) -> dict[str, Any]:
    rank = int(entry["rank"])
    last = last_complete_step(entry)
    measured = full_breakdown(last["phases"]["step"]["end"]) if last else None
    est = estimate_for_rank(estimate, rank)
    estimated = full_breakdown({"device": est.get("device"), "host": est.get("host")}) if est else None

    cells = []
    for loc in LOCATIONS:
        for cat in CATEGORIES:
            fig = figure(rows.get((rank, "rest", loc, cat)), measured[loc][cat] if measured else None,
                          estimated[loc][cat] if estimated else None)
            cells.append({"location": loc, "category": cat, **fig})

    # the highest peak of the rank over every step and phase, exact (the chart is downsampled)
    peak = None
    for s in entry["steps"]:
        for phase in PHASES:
            rec = s["phases"].get(phase)
            if rec is not None and (peak is None or int(rec["peak_total"]) > peak["bytes"]):
                peak = {"bytes": int(rec["peak_total"]), "step": int(s["step"]), "phase": phase}

    phase_peaks, phase_breakdowns = _phase_figures(rank, steady_cycle(entry, gas), est, rows)

    def total(b: dict[str, dict[str, int]] | None, loc: str) -> int | None:
        return None if b is None else sum(b[loc].values())

    return {
        "rank": rank,
        "host": entry.get("host"),
        "device": entry.get("device"),
        "complete": bool(entry.get("complete")),
        "oom": entry.get("oom"),
        "oom_breakdown": full_breakdown((entry.get("oom") or {}).get("breakdown")) if entry.get("oom") else None,
        "n_steps": len(entry["steps"]),
        "at_rest_step": int(last["step"]) if last else None,
        "measured": measured,
        "estimated": estimated,
        "cells": cells,
        "measured_device_total": total(measured, "device"),
        "estimated_device_total": total(estimated, "device"),
        "measured_host_total": total(measured, "host"),
        "estimated_host_total": total(estimated, "host"),
        "peak": peak,
        "phase_peaks": phase_peaks,
        "phase_breakdowns": phase_breakdowns,
        "peak_host_rss_bytes": entry.get("peak_host_rss_bytes"),
    }
