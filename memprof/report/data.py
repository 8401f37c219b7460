"""Run docs (the memprof.json shape) -> the plain data a report shows: dicts, lists, ints, floats.

Everything the page displays is computed here, so tests check numbers without parsing HTML, and
:mod:`memprof.report.render` only turns this data into charts and tables.

Measured beside estimated is :mod:`memprof.compare`'s, not a copy of it: every at-rest cell and
every phase-peak total takes its measured, estimated, error and check from
:func:`memprof.compare.comparison_of`'s row, so the page cannot disagree with
``memprof compare --check``. Its conventions:

* "at rest" is the ``step`` phase's ``end`` breakdown of a rank's last complete step (step 1 creates
  optimizer state lazily, so the last step is the steady state the estimator models);
* estimate error = (estimated - measured) / measured; rank 0's estimate stands in for a rank the
  estimator does not list;
* per-step series are downsampled for charts only (bucket maxima for memory so no peak is lost,
  bucket means for loss); tables hold exact bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS, MODEL_STATE_CATEGORIES, PHASES
from memprof.compare import (
    PEAK_TOLERANCE,
    RESIDENT_TOLERANCE,
    Comparison,
    comparison_of,
    estimate_for_rank,
    last_complete_step,
    relative_error,
)
from memprof.estimate.paper import zero_paper_model_states
from memprof.runschema import check_phase_records, check_run_doc
from memprof.units import format_bytes

MAX_CHART_STEPS = 250
"""Per-step series longer than this are bucketed for charts (the page says so)."""


# ---------------------------------------------------------------------------------------------
# small helpers


def bucket_ranges(n: int, max_points: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``max_points`` contiguous [start, stop) buckets."""
    if n <= max_points:
        return [(i, i + 1) for i in range(n)]
    size = math.ceil(n / max_points)
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _full_breakdown(b: dict[str, dict[str, int]] | None) -> dict[str, dict[str, int]]:
    """Every location and category present (``other`` included), ints."""
    b = b or {}
    return {loc: {cat: int((b.get(loc) or {}).get(cat, 0)) for cat in CATEGORIES} for loc in LOCATIONS}


def model_state_bytes(b: dict[str, dict[str, int]]) -> int:
    """params + master_params + grads + optimizer_state, device and host together."""
    return sum(int(b[loc][cat]) for loc in LOCATIONS for cat in MODEL_STATE_CATEGORIES)


# ---------------------------------------------------------------------------------------------
# one run


def run_label(run: dict[str, Any]) -> str:
    stage = run.get("zero_stage")
    parts = [
        str(run.get("model", "?")),
        f"ZeRO-{stage}" if stage is not None else "ZeRO-?",
        str(run.get("optimizer", "?")),
        str(run.get("precision", "?")),
        f"N={run.get('world_size', '?')}",
    ]
    offload = [f"{what} offload {run.get(key)}" for what, key in (("optimizer", "offload_optimizer"), ("param", "offload_params"))
               if run.get(key) not in (None, "none")]
    parts += offload
    return " · ".join(parts)


def _samples_per_update(run: dict[str, Any]) -> str | None:
    """micro-batch x gradient accumulation x world size, when all three are recorded."""
    vals = [run.get(k) for k in ("micro_batch", "gradient_accumulation_steps", "world_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return None
    mb, ga, n = vals
    return f"{mb * ga * n:,} ({mb} x {ga} x {n} ranks)"


SETTING_FIELDS = ("World size", "ZeRO stage", "Precision", "Micro-batch x sequence", "Gradient accumulation",
                  "Samples per optimizer step", "Activation checkpointing", "Offload")
"""The summary's rows that are the launcher's or Trainer's memory-shaping settings (in this order)."""


def _summary(run: dict[str, Any], ranks: list[dict[str, Any]]) -> list[dict[str, str]]:
    n_params = run.get("n_params")
    versions = run.get("versions") or {}
    devices = sorted({str(r.get("device")) for r in ranks if r.get("device")})
    offload = f"optimizer: {run.get('offload_optimizer', 'none')}, params: {run.get('offload_params', 'none')}"
    rows = [
        ("Model", run.get("model")),
        ("Parameters", f"{int(n_params):,}" if isinstance(n_params, (int, float)) else n_params),
        ("World size", run.get("world_size")),
        ("Nodes", run.get("nodes")),
        ("ZeRO stage", run.get("zero_stage")),
        ("Optimizer", run.get("optimizer")),
        ("Precision", run.get("precision")),
        ("Micro-batch x sequence", f"{run.get('micro_batch', '?')} x {run.get('seq_len', '?')}"),
        ("Gradient accumulation", run.get("gradient_accumulation_steps")),
        ("Samples per optimizer step", _samples_per_update(run)),
        ("Activation checkpointing", run.get("activation_checkpointing")),
        ("Offload", offload),
        ("Steps", run.get("steps")),
        ("Device", f"{run.get('device_type', '?')} ({', '.join(devices) or 'no rank reported one'})"),
        ("Backend", run.get("backend")),
        ("Memory budget", None if not run.get("memory_budget_bytes")
         else f"{format_bytes(int(run['memory_budget_bytes']))} ({int(run['memory_budget_bytes']):,} B, simulated)"),
        ("Versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None),
    ]
    return [{"field": k, "value": "—" if v is None else str(v), "setting": k in SETTING_FIELDS}
            for k, v in rows]


def _figure(row: Any, measured: int | None, estimated: int | None) -> dict[str, Any]:
    """measured, estimated, error and check of one figure: ``memprof compare``'s row when it has one
    (so the page shows exactly what ``compare --check`` checks), else measured only."""
    if row is not None:
        return {"measured": row.measured, "estimated": row.estimated, "error_bytes": row.estimated - row.measured,
                "error": row.error, "ok": row.ok, "tolerance": row.tolerance}
    return {"measured": measured, "estimated": estimated, "error_bytes": None, "error": None, "ok": None,
            "tolerance": None}


def _rank_data(entry: dict[str, Any], estimate: dict[str, Any] | None,
               rows: dict[tuple[int, str, str, str], Any]) -> dict[str, Any]:
    rank = int(entry["rank"])
    last = last_complete_step(entry)
    measured = _full_breakdown(last["phases"]["step"]["end"]) if last else None
    est = estimate_for_rank(estimate, rank)
    estimated = _full_breakdown({"device": est.get("device"), "host": est.get("host")}) if est else None

    cells = []
    for loc in LOCATIONS:
        for cat in CATEGORIES:
            fig = _figure(rows.get((rank, "rest", loc, cat)), measured[loc][cat] if measured else None,
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
        fig = _figure(rows.get((rank, "peak", "device", phase)), m_total,
                      int(e_phase["peak_total"]) if e_phase else None)
        phase_peaks.append({"phase": phase, **fig})
        if last is None:
            continue
        m_b = _full_breakdown(last["phases"][phase]["peak"])
        e_b = _full_breakdown(e_phase["peak"]) if e_phase and e_phase.get("peak") is not None else None
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
        "oom_breakdown": _full_breakdown((entry.get("oom") or {}).get("breakdown")) if entry.get("oom") else None,
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


def _timeline(entry: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """Phase peaks through the steps, x = step + phase index / 3; bucket maxima when long."""
    steps = entry["steps"]
    x: list[float] = []
    y: list[int] = []
    labels: list[str] = []
    for start, stop in bucket_ranges(len(steps), max_steps):
        for i, phase in enumerate(PHASES):
            best = None
            for s in steps[start:stop]:
                rec = s["phases"].get(phase)
                if rec is not None and (best is None or int(rec["peak_total"]) > best[1]):
                    best = (int(s["step"]), int(rec["peak_total"]))
            if best is not None:
                x.append(int(steps[start]["step"]) + i / len(PHASES))
                y.append(best[1])
                labels.append(f"step {best[0]} {phase}" if stop - start == 1
                              else f"steps {steps[start]['step']}-{steps[stop - 1]['step']} {phase}, max at {best[0]}")
    return {"rank": int(entry["rank"]), "x": x, "y": y, "labels": labels}


def _stacked_choice(entry: dict[str, Any], max_steps: int) -> list[tuple[int, int, int, int]]:
    """The points of the stacked timeline: (bucket start, bucket stop, phase index, step index),
    the step of the bucket whose phase peak is highest (so the stacked total at a bucket is that of
    one real step, and no peak is lost). Reads only ``peak_total``."""
    steps = entry["steps"]
    out = []
    for start, stop in bucket_ranges(len(steps), max_steps):
        for i, phase in enumerate(PHASES):
            best: tuple[int, int] | None = None
            for j in range(start, stop):
                rec = steps[j]["phases"].get(phase)
                if rec is not None and (best is None or int(rec["peak_total"]) > best[0]):
                    best = (int(rec["peak_total"]), j)
            if best is not None:
                out.append((start, stop, i, best[1]))
    return out


def _stacked_timeline(entry: dict[str, Any], choice: list[tuple[int, int, int, int]],
                      est: dict[str, Any] | None) -> dict[str, Any]:
    """Device bytes by category at each phase's peak (x = step + phase index / 3) and end (+1/6),
    for one rank; beside them the estimate's moments: each phase's peak and, at the optimizer step's
    end, the state at rest (the estimator gives no forward/backward end)."""
    steps = entry["steps"]
    n = len(PHASES)
    x: list[float] = []
    kind: list[str] = []
    phases: list[str] = []
    step_no: list[int] = []
    labels: list[str] = []
    series: dict[str, list[int]] = {cat: [] for cat in CATEGORIES}
    totals: list[int] = []
    est_x: list[float] = []
    est_y: list[int] = []
    est_labels: list[str] = []
    est_breakdowns: list[dict[str, int]] = []
    est_phases = (est or {}).get("phases") or {}
    for start, stop, i, j in choice:
        phase = PHASES[i]
        rec = steps[j]["phases"][phase]
        step = int(steps[j]["step"])
        where = (f"step {step}" if stop - start == 1
                 else f"steps {steps[start]['step']}-{steps[stop - 1]['step']} (step {step}: highest {phase} peak)")
        x0 = int(steps[start]["step"]) + i / n
        for k, xk in (("peak", x0), ("end", x0 + 1 / (2 * n))):
            dev = _full_breakdown(rec[k])["device"]
            x.append(xk)
            kind.append(k)
            phases.append(phase)
            step_no.append(step)
            labels.append(f"{where}, {phase} {k}")
            for cat in CATEGORIES:
                series[cat].append(dev[cat])
            totals.append(sum(dev.values()))
            e_dev = None
            if k == "peak" and est_phases.get(phase) is not None:
                e_dev = _full_breakdown(est_phases[phase].get("peak"))["device"] if est_phases[phase].get("peak") else None
                e_total = int(est_phases[phase]["peak_total"])
                e_label = f"estimate at {phase}'s peak"
            elif k == "end" and phase == PHASES[-1] and est is not None:
                e_dev = _full_breakdown({"device": est.get("device")})["device"]
                e_total = sum(e_dev.values())
                e_label = "estimate at rest (optimizer step's end)"
            else:
                continue
            est_x.append(xk)
            est_y.append(e_total)
            est_labels.append(f"{where}: {e_label}")
            est_breakdowns.append(e_dev or {})
    return {
        "rank": int(entry["rank"]), "x": x, "kind": kind, "phase": phases, "step": step_no, "labels": labels,
        "device": series, "total": totals,
        "estimate": None if not est_x else {"x": est_x, "y": est_y, "labels": est_labels, "device": est_breakdowns},
    }


def _loss(ranks: list[dict[str, Any]], max_steps: int) -> dict[str, Any]:
    """Mean, min and max loss over ranks per step; bucket means when long."""
    per_step: dict[int, list[float]] = {}
    for entry in ranks:
        for s in entry["steps"]:
            if s.get("loss") is not None and math.isfinite(float(s["loss"])):
                per_step.setdefault(int(s["step"]), []).append(float(s["loss"]))
    steps = sorted(per_step)
    x, mean, lo, hi = [], [], [], []
    for start, stop in bucket_ranges(len(steps), max_steps):
        chunk = [per_step[k] for k in steps[start:stop]]
        x.append(steps[start])
        mean.append(sum(sum(v) / len(v) for v in chunk) / len(chunk))
        lo.append(min(min(v) for v in chunk))
        hi.append(max(max(v) for v in chunk))
    final = None
    if steps:
        v = per_step[steps[-1]]
        final = {"step": steps[-1], "mean": sum(v) / len(v), "ranks": len(v)}
    return {"x": x, "mean": mean, "min": lo, "max": hi, "final": final, "n_steps": len(steps)}


def _overhead(run: dict[str, Any], ranks: list[dict[str, Any]], estimate: dict[str, Any] | None,
              n_ranks_expected: int) -> dict[str, Any]:
    """The Adam overhead, measured and estimated, on the first rank at rest (the estimator's
    ``this_setup_*`` figures mean the same): (params + master_params + optimizer_state) / params,
    i.e. 3x for fp32 Adam without ZeRO, and those bytes per parameter; plus optimizer-state bytes
    per parameter summed over all ranks, which does not depend on the ZeRO stage (8 for Adam)."""
    n_params = int(run.get("n_params") or 0)

    def states(b: dict[str, dict[str, int]] | None) -> dict[str, Any]:
        if b is None:
            return {"ratio": None, "bytes_per_param": None}
        params = sum(b[loc]["params"] for loc in LOCATIONS)
        held = params + sum(b[loc][c] for loc in LOCATIONS for c in ("master_params", "optimizer_state"))
        return {"ratio": held / params if params else None, "bytes_per_param": held / n_params if n_params else None}

    def opt_per_param(key: str) -> float | None:
        if not n_params or len(ranks) != n_ranks_expected or any(r[key] is None for r in ranks) or not ranks:
            return None
        return sum(r[key][loc]["optimizer_state"] for r in ranks for loc in LOCATIONS) / n_params

    first = next((r for r in ranks if r["measured"] is not None), None)
    stated = (estimate or {}).get("overhead") or {}
    return {
        "rank": first["rank"] if first else None,
        "measured": {**states(first["measured"] if first else None), "opt_bytes_per_param": opt_per_param("measured")},
        "estimated": {**states(first["estimated"] if first else None), "opt_bytes_per_param": opt_per_param("estimated")},
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
        "checked": sum(1 for r in cmp.rows if r.tolerance is not None),
        "resident_tolerance": RESIDENT_TOLERANCE,
        "peak_tolerance": PEAK_TOLERANCE,
        "failures": [{"rank": r.rank, "what": r.what, "location": r.location, "name": r.name,
                      "measured": r.measured, "estimated": r.estimated, "error": r.error, "tolerance": r.tolerance}
                     for r in bad],
    }


def build_run_data(doc: dict[str, Any], source: str, max_chart_steps: int = MAX_CHART_STEPS) -> dict[str, Any]:
    """The plain data of one run (checks its shape first; MemprofError names ``source``)."""
    check_run_doc(doc, source)
    run = doc["run"]
    estimate = doc.get("estimate")
    order = sorted(range(len(doc["ranks"])), key=lambda i: int(doc["ranks"][i]["rank"]))
    entries = [doc["ranks"][i] for i in order]
    world_size = int(run.get("world_size") or len(entries))
    cmp = comparison_of(doc, estimate) if estimate and estimate.get("ranks") else None
    rows = cmp.rows_by_figure() if cmp else {}
    ranks = [_rank_data(e, estimate, rows) for e in entries]
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
        choice = _stacked_choice(entries[pos], max_chart_steps)
        check_phase_records(doc, source, order[pos], sorted({c[3] for c in choice}))
        stacked = _stacked_timeline(entries[pos], choice, estimate_for_rank(estimate, ranks[pos]["rank"]))
    return {
        "source": source,
        "label": run_label(run),
        "run": run,
        "summary": _summary(run, entries),
        "world_size": world_size,
        "missing_ranks": missing,
        "ranks": ranks,
        "shows_host": bool(shows_host),
        "has_estimate": estimate is not None,
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
        "timeline": [_timeline(e, max_chart_steps) for e in entries],
        "stacked_timeline": stacked,
        "downsampled": longest > max_chart_steps,
        "max_chart_steps": max_chart_steps,
        "n_steps": longest,
        "loss": _loss(entries, max_chart_steps),
        "heatmap": _heatmap(ranks, world_size),
        "overhead": _overhead(run, ranks, estimate, world_size),
        "deepspeed_config": run.get("deepspeed_config"),
    }


# ---------------------------------------------------------------------------------------------
# several runs


def _worst_rank(values: Sequence[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def build_sweep_data(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Comparisons across runs: per-rank model states, ZeRO saving against world size (measured,
    the paper's formula, the estimator), loss against memory per optimizer."""
    model_states = []
    for r in runs:
        model_states.append({
            "label": r["label"],
            "ranks": [{"rank": k["rank"],
                       **{c: (None if k["measured"] is None else sum(k["measured"][loc][c] for loc in LOCATIONS))
                          for c in MODEL_STATE_CATEGORIES}} for k in r["ranks"]],
        })

    # ZeRO saving: runs grouped by what does not change with stage and world size
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        run = r["run"]
        key = (str(run.get("model")), run.get("n_params"), str(run.get("optimizer")), str(run.get("precision")),
               str(run.get("offload_optimizer", "none")), str(run.get("offload_params", "none")))
        measured = _worst_rank([model_state_bytes(k["measured"]) if k["measured"] else None for k in r["ranks"]])
        estimated = _worst_rank([model_state_bytes(k["estimated"]) if k["estimated"] else None for k in r["ranks"]])
        stage, n = run.get("zero_stage"), int(run.get("world_size") or 0)
        formula = None
        if run.get("n_params") and stage is not None:
            formula = zero_paper_model_states(int(run["n_params"]), int(stage), n, str(run.get("optimizer")),
                                              str(run.get("precision")))
        groups.setdefault(key, []).append({
            "label": r["label"], "stage": stage, "world_size": n, "measured": measured,
            "formula": formula, "estimated": estimated,
        })
    zero_groups = []
    for key, points in groups.items():
        points.sort(key=lambda p: (p["stage"] if p["stage"] is not None else -1, p["world_size"]))
        baseline_measured = {p["world_size"]: p["measured"] for p in points if p["stage"] == 0}
        for p in points:
            base_f = None
            if key[1] and p["world_size"]:
                base_f = zero_paper_model_states(int(key[1]), 0, p["world_size"], key[2], key[3])
            p["formula_saving"] = (None if not base_f or p["formula"] is None else 1 - p["formula"] / base_f)
            base_m = baseline_measured.get(p["world_size"])
            p["measured_saving"] = (None if not base_m or p["measured"] is None else 1 - p["measured"] / base_m)
        zero_groups.append({"model": key[0], "n_params": key[1], "optimizer": key[2], "precision": key[3],
                            "offload": f"optimizer {key[4]}, params {key[5]}", "points": points})

    loss_vs_memory: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        peak = _worst_rank([k["peak"]["bytes"] if k["peak"] else None for k in r["ranks"]])
        final = r["loss"]["final"]
        if peak is None or final is None:
            continue
        loss_vs_memory.setdefault(str(r["run"].get("optimizer")), []).append(
            {"label": r["label"], "peak_bytes": peak, "final_loss": final["mean"], "step": final["step"]})
    return {"model_states": model_states, "zero": zero_groups, "loss_vs_memory": loss_vs_memory}


def build_report_data(run_docs: list[dict[str, Any]], sources: Sequence[str] | None = None,
                      max_chart_steps: int = MAX_CHART_STEPS) -> dict[str, Any]:
    """Everything a report shows, for one or several runs (``sources`` name them in messages)."""
    sources = list(sources) if sources is not None else [f"run {i + 1}" for i in range(len(run_docs))]
    runs = [build_run_data(doc, src, max_chart_steps) for doc, src in zip(run_docs, sources)]
    # identical labels would make one sweep bar hide another: number the repeats
    seen: dict[str, int] = {}
    for r in runs:
        seen[r["label"]] = seen.get(r["label"], 0) + 1
        if seen[r["label"]] > 1:
            r["label"] += f" #{seen[r['label']]}"
    return {"runs": runs, "sweep": build_sweep_data(runs) if len(runs) > 1 else None}
