"""The plain data of one run's page: its summary, each rank's figures, the chart series, the
heatmap of ranks, the Adam overhead and ``memprof compare --check``'s verdict."""

from __future__ import annotations

from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS
from memprof.compare import (
    CATEGORY_TOLERANCE,
    PEAK_TOLERANCE,
    RESIDENT_TOLERANCE,
    Comparison,
    comparison_of,
    estimate_for_rank,
    rank_differences,
    run_gas,
    steady_cycle_indices,
)
from memprof.report.parameters import parameters_data
from memprof.report.peak_words import highest_peak_story
from memprof.report.rank_figures import rank_data
from memprof.report.run_engine import engine_data, model_name
from memprof.report.run_summary import run_label, run_summary
from memprof.report.series import MAX_CHART_STEPS, loss_series, stacked_choice, stacked_timeline, timeline
from memprof.run.schema import check_phase_records, check_run_doc


def _overhead(run: dict[str, Any], ranks: list[dict[str, Any]], estimate: dict[str, Any] | None,
              n_ranks_expected: int) -> dict[str, Any]:
    """The Adam overhead, measured and estimated, on the first rank at rest (the estimator's
    ``this_setup_*`` figures mean the same): (params + master_params + optimizer_state) / params,
    i.e. 3x for fp32 Adam without ZeRO, and those bytes per parameter; plus optimizer-state bytes
    per parameter summed over all ranks, which does not depend on the ZeRO stage (8 for Adam), and,
    when the run records its trainable parameters (adapters), the same per trainable parameter:
    frozen parameters have no optimizer state, so that is the one that reads 8 for Adam."""
    n_params = int(run.get("n_params") or (estimate or {}).get("n_params") or 0)
    n_trainable = run.get("n_trainable_params")
    n_trainable = n_trainable if isinstance(n_trainable, int) and not isinstance(n_trainable, bool) and n_trainable > 0 else 0

    def states(b: dict[str, dict[str, int]] | None) -> dict[str, Any]:
        if b is None:
            return {"ratio": None, "bytes_per_param": None}
        params = sum(b[loc]["params"] for loc in LOCATIONS)
        held = params + sum(b[loc][c] for loc in LOCATIONS for c in ("master_params", "optimizer_state"))
        return {"ratio": held / params if params else None, "bytes_per_param": held / n_params if n_params else None}

    def opt_per_param(key: str, n: int = n_params) -> float | None:
        if not n or len(ranks) != n_ranks_expected or any(r[key] is None for r in ranks) or not ranks:
            return None
        return sum(r[key][loc]["optimizer_state"] for r in ranks for loc in LOCATIONS) / n

    first = next((r for r in ranks if r["measured"] is not None), None)
    stated = (estimate or {}).get("overhead") or {}
    return {
        "rank": first["rank"] if first else None,
        "measured": {**states(first["measured"] if first else None), "opt_bytes_per_param": opt_per_param("measured"),
                     "opt_bytes_per_trainable_param": opt_per_param("measured", n_trainable)},
        "estimated": {**states(first["estimated"] if first else None), "opt_bytes_per_param": opt_per_param("estimated"),
                      "opt_bytes_per_trainable_param": opt_per_param("estimated", n_trainable)},
        "n_trainable_params": n_trainable or None,
        "estimator_stated": stated,
    }


def _heatmap(ranks: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """Rows = every rank 0..N-1 (a missing one is an empty row), columns = location/category at
    rest; colour = % above or below the mean of that column over the ranks present."""
    present = {r["rank"]: r for r in ranks}
    all_ranks = sorted(set(range(world_size)) | set(present))
    columns = [(loc, cat) for loc in LOCATIONS for cat in CATEGORIES
               if loc == "device" or any(r["measured"] and r["measured"][loc][cat] for r in ranks)]
    bytes_rows: list[list[int | None]] = []
    for rank in all_ranks:
        r = present.get(rank)
        m = r["measured"] if r else None
        bytes_rows.append([m[loc][cat] if m else None for loc, cat in columns])
    dev_rows: list[list[float | None]] = []
    means = []
    for j in range(len(columns)):
        vals = [row[j] for row in bytes_rows if row[j] is not None]
        means.append(sum(vals) / len(vals) if vals else 0)
    for row in bytes_rows:
        dev_rows.append([None if v is None else (0.0 if means[j] == 0 else 100.0 * (v / means[j] - 1))
                         for j, v in enumerate(row)])
    return {
        "ranks": all_ranks,
        "missing": [rk for rk in all_ranks if rk not in present or present[rk]["measured"] is None],
        "columns": [f"{loc}/{cat}" for loc, cat in columns],
        "bytes": bytes_rows,
        "deviation_pct": dev_rows,
    }


def _check_verdict(cmp: Comparison) -> dict[str, Any]:
    """What ``memprof compare --check`` says of this run's stored estimate."""
    bad = cmp.failures()
    return {
        "ok": cmp.ok,
        "checked": sum(1 for r in cmp.rows if cmp.gates(r)),
        "resident_tolerance": RESIDENT_TOLERANCE,
        "peak_tolerance": PEAK_TOLERANCE,
        "category_tolerance": CATEGORY_TOLERANCE,
        "categories_checked": cmp.check_categories,
        # category rows outside their tolerance that this comparison does not gate (--no-check-categories)
        "category_misses": 0 if cmp.check_categories else len(cmp.category_misses()),
        "failures": [{"rank": r.rank, "what": r.what, "location": r.location, "name": r.name,
                      "measured": r.measured, "estimated": r.estimated, "error": r.error, "tolerance": r.tolerance}
                     for r in bad],
    }


def build_run_data(doc: dict[str, Any], source: str, max_chart_steps: int = MAX_CHART_STEPS,
                   estimate_origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain data of one run (checks its shape first; MemprofError names ``source``).
    ``estimate_origin``: where ``doc["estimate"]`` came from (memprof.report.estimates.with_estimate);
    default: stored in the run file when it has one."""
    check_run_doc(doc, source)
    gas = run_gas(doc)
    for i, entry in enumerate(doc["ranks"]):  # the peak snapshots compare and the composition view read
        check_phase_records(doc, source, i, steady_cycle_indices(entry, gas))
    run = doc["run"]
    estimate = doc.get("estimate")
    order = sorted(range(len(doc["ranks"])), key=lambda i: int(doc["ranks"][i]["rank"]))
    entries = [doc["ranks"][i] for i in order]
    world_size = int(run.get("world_size") or len(entries))
    cmp = comparison_of(doc, estimate) if estimate and estimate.get("ranks") else None
    rows = cmp.rows_by_figure() if cmp else {}
    ranks = [rank_data(e, estimate, rows, gas) for e in entries]
    missing = sorted(set(int(r) for r in doc.get("missing_ranks") or [])
                     | (set(range(world_size)) - {r["rank"] for r in ranks}))
    longest = max((len(e["steps"]) for e in entries), default=0)
    shows_host = any(r[k] and sum(r[k]["host"].values()) for r in ranks for k in ("measured", "estimated")) or any(
        b[k] and sum(b[k]["host"].values()) for r in ranks for b in r["phase_breakdowns"] for k in ("measured", "estimated"))

    # the stacked timeline follows the rank with the highest peak (the one that runs out first)
    stacked = None
    with_peak = [(r["peak"]["bytes"], -r["rank"], pos) for pos, r in enumerate(ranks) if r["peak"] is not None]
    if with_peak:
        pos = max(with_peak)[2]
        choice = stacked_choice(entries[pos], max_chart_steps)
        check_phase_records(doc, source, order[pos], sorted({c[3] for c in choice}))
        stacked = stacked_timeline(entries[pos], choice, estimate_for_rank(estimate, ranks[pos]["rank"]))
    return {
        "source": source,
        "label": run_label(run),
        "model_name": model_name(run),
        "run": run,
        "summary": run_summary(run, entries, estimate),
        "engine": engine_data(run),
        "parameters": parameters_data(run, estimate),
        "world_size": world_size,
        "missing_ranks": missing,
        "ranks": ranks,
        "shows_host": bool(shows_host),
        "has_estimate": estimate is not None,
        "estimate_origin": estimate_origin or {"kind": "stored" if estimate else None, "why": None},
        "estimate": None if estimate is None else {
            "device_total_bytes": estimate.get("device_total_bytes"),
            "peak_device_bytes": estimate.get("peak_device_bytes"),
            "fits": estimate.get("fits"),
            # why fits is unknown (no activation model for this model): said instead of a verdict
            "activations_not_estimated": estimate.get("activations_not_estimated"),
            "assumptions": [str(a) for a in estimate.get("assumptions") or []],
            "inputs": estimate.get("inputs"),
        },
        "check": None if not cmp or not cmp.rows else _check_verdict(cmp),
        "highest_peak": highest_peak_story(ranks),
        "rank_differences": [d.to_json() for d in (cmp.rank_differences if cmp else rank_differences(doc))],
        "timeline": [timeline(e, max_chart_steps) for e in entries],
        "stacked_timeline": stacked,
        "downsampled": longest > max_chart_steps,
        "max_chart_steps": max_chart_steps,
        "n_steps": longest,
        "loss": loss_series(entries, max_chart_steps),
        "heatmap": _heatmap(ranks, world_size),
        "overhead": _overhead(run, ranks, estimate, world_size),
        "deepspeed_config": run.get("deepspeed_config"),
    }
