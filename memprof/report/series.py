"""The chart series of one run: phase peaks through the steps, the stacked timeline of the rank that
peaks highest, and the loss. Long runs are bucketed for charts only (bucket maxima for memory, so no
peak is lost; bucket means for loss); tables hold exact bytes."""

from __future__ import annotations

import math
from typing import Any

from memprof.categories import CATEGORIES, PHASES
from memprof.report.rank_figures import full_breakdown

MAX_CHART_STEPS = 250
"""Per-step series longer than this are bucketed for charts (the page says so)."""


def bucket_ranges(n: int, max_points: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``max_points`` contiguous [start, stop) buckets."""
    if n <= max_points:
        return [(i, i + 1) for i in range(n)]
    size = math.ceil(n / max_points)
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def timeline(entry: dict[str, Any], max_steps: int) -> dict[str, Any]:
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


def stacked_choice(entry: dict[str, Any], max_steps: int) -> list[tuple[int, int, int, int]]:
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


def stacked_timeline(entry: dict[str, Any], choice: list[tuple[int, int, int, int]],
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
            dev = full_breakdown(rec[k])["device"]
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
                e_dev = full_breakdown(est_phases[phase].get("peak"))["device"] if est_phases[phase].get("peak") else None
                e_total = int(est_phases[phase]["peak_total"])
                e_label = f"estimate at {phase}'s peak"
            elif k == "end" and phase == PHASES[-1] and est is not None:
                e_dev = full_breakdown({"device": est.get("device")})["device"]
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


def loss_series(ranks: list[dict[str, Any]], max_steps: int) -> dict[str, Any]:
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
