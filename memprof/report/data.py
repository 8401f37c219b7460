"""Run docs (the memprof.json shape) -> the plain data a report shows: dicts, lists, ints, floats.

Everything the page displays is computed here, so tests check numbers without parsing HTML, and
:mod:`memprof.report.render` only turns this data into charts and tables.

Conventions (the same as ``memprof compare``, see :mod:`memprof.compare`):

* "at rest" is the ``step`` phase's ``end`` breakdown of a rank's last complete step (step 1 creates
  optimizer state lazily, so the last step is the steady state the estimator models);
* estimate error = (estimated - measured) / measured;
* per-step series are downsampled for charts only (bucket maxima for memory so no peak is lost,
  bucket means for loss); tables hold exact bytes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from memprof.categories import CATEGORIES, LOCATIONS, MODEL_STATE_CATEGORIES, PHASES
from memprof.compare import last_complete_step
from memprof.report.schema import check_run_doc
from memprof.units import format_bytes

MAX_CHART_STEPS = 250
"""Per-step series longer than this are bucketed for charts (the page says so)."""

OPTIMIZER_STATE_BYTES = {
    "sgd": 0, "momentum": 4, "nesterov": 4, "rmsprop": 4, "adagrad": 4, "adam": 8, "adamw": 8, "amsgrad": 12,
}
"""fp32 optimizer-state bytes per parameter of each optimizer of the zoo (state tensors x 4 bytes):
momentum_buffer; square_avg; sum; exp_avg + exp_avg_sq; + max_exp_avg_sq for AMSGrad."""

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------------------------------------
# small helpers


def relative_error(measured: int, estimated: int) -> float | None:
    """(estimated - measured) / measured; None when both are 0, inf when only the measurement is."""
    if measured == 0:
        return None if estimated == 0 else math.inf
    return (estimated - measured) / measured


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


def _estimate_rank(estimate: dict[str, Any] | None, rank: int) -> dict[str, Any] | None:
    """The estimator's entry for ``rank``; like ``memprof compare``, rank 0's figures stand in for a
    rank the estimator did not list (it may give one entry per distinct layout)."""
    if not estimate or not estimate.get("ranks"):
        return None
    by_rank = {int(r["rank"]): r for r in estimate["ranks"]}
    return by_rank.get(rank, by_rank[min(by_rank)])


def model_state_bytes(b: dict[str, dict[str, int]]) -> int:
    """params + master_params + grads + optimizer_state, device and host together."""
    return sum(int(b[loc][cat]) for loc in LOCATIONS for cat in MODEL_STATE_CATEGORIES)


def zero_paper_model_states(n_params: int, stage: int, world_size: int, optimizer: str, precision: str) -> int | None:
    """Per-rank model-state bytes by the ZeRO paper's expressions (Rajbhandari et al., SC'20):
    stage 0 (A+B+K)Ψ, stage 1 (A+B)Ψ + KΨ/N, stage 2 AΨ + (B+K)Ψ/N, stage 3 (A+B+K)Ψ/N, with A and B
    the parameter and gradient bytes (2 in bf16/fp16, 4 in fp32) and K the optimizer's bytes: its
    fp32 state plus, in mixed precision, the fp32 master copy (K = 12 for mixed-precision Adam).
    None when the optimizer or precision is not one the formula knows."""
    if optimizer not in OPTIMIZER_STATE_BYTES or precision not in PRECISION_BYTES or world_size < 1:
        return None
    a = b = PRECISION_BYTES[precision]
    k = OPTIMIZER_STATE_BYTES[optimizer] + (4 if precision != "fp32" else 0)
    psi, n = n_params, world_size
    per_param = {0: a + b + k, 1: a + b + k / n, 2: a + (b + k) / n, 3: (a + b + k) / n}.get(stage)
    return None if per_param is None else round(per_param * psi)


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
        ("Steps", run.get("steps")),
        ("Device", f"{run.get('device_type', '?')} ({', '.join(devices) or 'no rank reported one'})"),
        ("Backend", run.get("backend")),
        ("Offload", offload),
        ("Activation checkpointing", run.get("activation_checkpointing")),
        ("Memory budget", None if not run.get("memory_budget_bytes")
         else f"{format_bytes(int(run['memory_budget_bytes']))} ({int(run['memory_budget_bytes']):,} B, simulated)"),
        ("Versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None),
    ]
    return [{"field": k, "value": "—" if v is None else str(v)} for k, v in rows]


def _rank_data(entry: dict[str, Any], estimate: dict[str, Any] | None) -> dict[str, Any]:
    rank = int(entry["rank"])
    last = last_complete_step(entry)
    measured = _full_breakdown(last["phases"]["step"]["end"]) if last else None
    est = _estimate_rank(estimate, rank)
    estimated = _full_breakdown({"device": est.get("device"), "host": est.get("host")}) if est else None

    cells = []
    for loc in LOCATIONS:
        for cat in CATEGORIES:
            m = measured[loc][cat] if measured else None
            e = estimated[loc][cat] if estimated else None
            err = relative_error(m, e) if m is not None and e is not None else None
            cells.append({"location": loc, "category": cat, "measured": m, "estimated": e,
                          "error_bytes": None if m is None or e is None else e - m, "error": err})

    # the highest peak of the rank over every step and phase, exact (the chart is downsampled)
    peak = None
    for s in entry["steps"]:
        for phase in PHASES:
            rec = s["phases"].get(phase)
            if rec is not None and (peak is None or int(rec["peak_total"]) > peak["bytes"]):
                peak = {"bytes": int(rec["peak_total"]), "step": int(s["step"]), "phase": phase}

    phase_peaks = []
    for phase in PHASES:
        m = int(last["phases"][phase]["peak_total"]) if last else None
        e_phase = ((est or {}).get("phases") or {}).get(phase)
        e = int(e_phase["peak_total"]) if e_phase else None
        phase_peaks.append({"phase": phase, "measured": m, "estimated": e,
                            "error": relative_error(m, e) if m is not None and e is not None else None})

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


def build_run_data(doc: dict[str, Any], source: str, max_chart_steps: int = MAX_CHART_STEPS) -> dict[str, Any]:
    """The plain data of one run (checks its shape first; MemprofError names ``source``)."""
    check_run_doc(doc, source)
    run = doc["run"]
    estimate = doc.get("estimate")
    entries = sorted(doc["ranks"], key=lambda e: int(e["rank"]))
    world_size = int(run.get("world_size") or len(entries))
    ranks = [_rank_data(e, estimate) for e in entries]
    missing = sorted(set(int(r) for r in doc.get("missing_ranks") or [])
                     | (set(range(world_size)) - {r["rank"] for r in ranks}))
    longest = max((len(e["steps"]) for e in entries), default=0)
    shows_host = any(r[k] and sum(r[k]["host"].values()) for r in ranks for k in ("measured", "estimated"))
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
            "assumptions": [str(a) for a in estimate.get("assumptions") or []],
            "inputs": estimate.get("inputs"),
        },
        "timeline": [_timeline(e, max_chart_steps) for e in entries],
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
