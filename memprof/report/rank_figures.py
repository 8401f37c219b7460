"""Each rank's figures, measured beside estimated: at rest per location and category, its highest
peak, and each phase's peak of the last complete step with what it is made of.

Every figure with an estimate takes its measured, estimated, error and check from
:func:`memprof.compare.comparison_of`'s row, so the page cannot disagree with ``memprof compare --check``.
"""

from __future__ import annotations

from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS, PHASES
from memprof.compare import estimate_for_rank, last_complete_step, relative_error


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


def rank_data(entry: dict[str, Any], estimate: dict[str, Any] | None,
               rows: dict[tuple[int, str, str, str], Any]) -> dict[str, Any]:
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

    phase_peaks = []
    # what each phase's peak of the last complete step is made of, beside the estimate's breakdown
    # of that phase's peak moment (memprof.estimate's ``phases[phase]["peak"]``)
    phase_breakdowns = []
    for phase in PHASES:
        e_phase = ((est or {}).get("phases") or {}).get(phase)
        m_total = int(last["phases"][phase]["peak_total"]) if last else None
        fig = figure(rows.get((rank, "peak", "device", phase)), m_total,
                      int(e_phase["peak_total"]) if e_phase else None)
        phase_peaks.append({"phase": phase, **fig})
        if last is None:
            continue
        m_b = full_breakdown(last["phases"][phase]["peak"])
        e_b = full_breakdown(e_phase["peak"]) if e_phase and e_phase.get("peak") is not None else None
        phase_breakdowns.append({
            "phase": phase, "step": int(last["step"]),
            "measured": m_b, "estimated": e_b,
            "measured_total": fig["measured"], "estimated_total": fig["estimated"], "total_error": fig["error"],
            "cells": [{"location": loc, "category": cat, "measured": m_b[loc][cat],
                       "estimated": None if e_b is None else e_b[loc][cat],
                       "error": None if e_b is None else relative_error(m_b[loc][cat], e_b[loc][cat])}
                      for loc in LOCATIONS for cat in CATEGORIES],
        })

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
