"""The plain data of the sweep page: comparisons across runs (per-rank model states, every category
side by side per run and rank with each run's engine and settings named, trainable and frozen
parameters, the sharding saving against world size measured beside the paper's formula and the
estimator, loss against memory).

Runs of different engines sit in one sweep: a DeepSpeed run is named by its ZeRO stage, an FSDP2
run by its fully_shard settings (memprof.report.run_engine), never by a stage it does not have."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS, MODEL_STATE_CATEGORIES, PHASES
from memprof.estimate.paper import zero_paper_model_states
from memprof.report.run_engine import DDP, DEEPSPEED, FSDP2, precision_of
from memprof.run.files import offload_param_of

MOMENTS = ("rest", *PHASES)
"""The rows of the side-by-side table: at rest, then each phase's peak."""


def model_state_bytes(b: dict[str, dict[str, int]]) -> int:
    """params + master_params + grads + optimizer_state, device and host together."""
    return sum(int(b[loc][cat]) for loc in LOCATIONS for cat in MODEL_STATE_CATEGORIES)


def _worst_rank(values: Sequence[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _rel(measured: int | None, estimated: int | None) -> float | None:
    if measured is None or estimated is None:
        return None
    if measured == 0:
        return 0.0 if estimated == 0 else float("inf")
    return (estimated - measured) / measured


def scheme_of(run: dict[str, Any]) -> str:
    """How a run lays its model states out across ranks: ``ZeRO-<stage>``, ``FSDP2`` or ``DDP``."""
    engine = run["engine"]["name"]
    if engine == FSDP2:
        return "FSDP2"
    if engine == DDP:
        return "DDP"
    stage = run["run"].get("zero_stage")
    return f"ZeRO-{stage}" if stage is not None else "ZeRO-?"


def scheme_order(scheme: str) -> tuple[int, str]:
    """DDP (replicated), ZeRO-0 .. ZeRO-3, then FSDP2 (full sharding)."""
    order = {"DDP": -1, "FSDP2": 4}
    if scheme in order:
        return order[scheme], scheme
    tail = scheme.removeprefix("ZeRO-")
    return (int(tail), scheme) if tail.isdigit() else (5, scheme)


def paper_formula(r: dict[str, Any]) -> int | None:
    """The ZeRO paper's per-rank model states for the run's layout (memprof.estimate.paper), or None.

    DeepSpeed: its ZeRO stage at the run's precision. FSDP2 shards every parameter, gradient and
    optimizer state on dim 0 (ZeRO-3's partitioning) and keeps the shards and their gradients in the
    sharded parameters' dtype with no separate master copy (torch ``_fsdp_param.py``
    ``FSDPParam.init_dtype_attrs``: a param_dtype casts only the gathered copies): the paper's stage 3
    in fp32 when the shards are float32; other shard dtypes have no row in the paper. DDP keeps
    whole fp32 states: stage 0 in fp32, when the run is fp32."""
    run, n = r["run"], int(r["run"].get("world_size") or 0)
    n_params = r["parameters"]["n_params"]
    if not n_params or not n:
        return None
    engine, optimizer = r["engine"]["name"], str(run.get("optimizer"))
    if engine == FSDP2:
        if run["fsdp2"].get("sharded_dtype") != "float32":
            return None
        return zero_paper_model_states(int(n_params), 3, n, optimizer, "fp32")
    if engine == DDP:
        return zero_paper_model_states(int(n_params), 0, n, optimizer, "fp32") if precision_of(run) == "fp32" else None
    stage = run.get("zero_stage")
    if stage is None:
        return None
    return zero_paper_model_states(int(n_params), int(stage), n, optimizer, str(precision_of(run)))


def _offload_key(r: dict[str, Any]) -> tuple[str, str]:
    run = r["run"]
    if r["engine"]["name"] == FSDP2:
        return "none", str(run["fsdp2"].get("offload_params") or "none")
    return str(run.get("offload_optimizer", "none")), str(offload_param_of(run))


def _saving_groups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs grouped by what does not change with the sharding scheme and world size; per point the
    worst rank's model states at rest, measured, by the paper's formula and estimated, and the
    saving against stage 0 (the formula's; measured: against a measured ZeRO-0 run of the group at
    the same world size, when the sweep has one)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        run = r["run"]
        key = (r["model_name"], r["parameters"]["n_params"], str(run.get("optimizer")), str(precision_of(r["run"])),
               *_offload_key(r))
        groups.setdefault(key, []).append({
            "label": r["label"], "scheme": scheme_of(r), "engine": r["engine"]["name"],
            "stage": run.get("zero_stage") if r["engine"]["name"] == DEEPSPEED else None,
            "world_size": int(run.get("world_size") or 0),
            "measured": _worst_rank([model_state_bytes(k["measured"]) if k["measured"] else None for k in r["ranks"]]),
            "formula": paper_formula(r),
            "estimated": _worst_rank([model_state_bytes(k["estimated"]) if k["estimated"] else None for k in r["ranks"]]),
        })
    out = []
    for key, points in groups.items():
        points.sort(key=lambda p: (scheme_order(p["scheme"]), p["world_size"]))
        baseline_measured = {p["world_size"]: p["measured"] for p in points if p["scheme"] == "ZeRO-0"}
        for p in points:
            base_f = None
            if key[1] and p["world_size"]:
                base_f = zero_paper_model_states(int(key[1]), 0, p["world_size"], key[2], key[3])
            p["formula_saving"] = None if not base_f or p["formula"] is None else 1 - p["formula"] / base_f
            base_m = baseline_measured.get(p["world_size"])
            p["measured_saving"] = None if not base_m or p["measured"] is None else 1 - p["measured"] / base_m
        out.append({"model": key[0], "n_params": key[1], "optimizer": key[2], "precision": key[3],
                    "offload": f"optimizer {key[4]}, params {key[5]}", "points": points})
    return out


def _rank_cells(k: dict[str, Any], moment: str, loc: str) -> dict[str, dict[str, Any]]:
    """One rank's cells at one moment and location, by category and "total": measured, estimated,
    error (at rest: memprof compare's relative error; at a phase peak, per category: compare's share
    of the measured peak; totals: (estimated - measured) / measured)."""
    none = {"measured": None, "estimated": None, "error": None}
    if moment == "rest":
        if k["measured"] is None:
            return {c: dict(none) for c in (*CATEGORIES, "total")}
        cells = {c["category"]: {"measured": c["measured"], "estimated": c["estimated"], "error": c["error"]}
                 for c in k["cells"] if c["location"] == loc}
        m, e = k[f"measured_{loc}_total"], k[f"estimated_{loc}_total"]
        cells["total"] = {"measured": m, "estimated": e, "error": _rel(m, e)}
        return cells
    b = next((b for b in k["phase_breakdowns"] if b["phase"] == moment), None)
    if b is None:
        return {c: dict(none) for c in (*CATEGORIES, "total")}
    cells = {c["category"]: {"measured": c["measured"], "estimated": c["estimated"], "error": c["error"]}
             for c in b["cells"] if c["location"] == loc}
    if loc == "device":  # the phase's peak total: compare's peak row
        pp = next(p for p in k["phase_peaks"] if p["phase"] == moment)
        cells["total"] = {"measured": pp["measured"], "estimated": pp["estimated"], "error": pp["error"]}
    else:
        m = sum(b["measured"]["host"].values())
        e = None if b["estimated"] is None else sum(b["estimated"]["host"].values())
        cells["total"] = {"measured": m, "estimated": e, "error": None}
    return cells


def side_by_side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every category, measured and estimated, per run and rank, at rest and at each phase's peak:
    one column per (run, rank), each run headed by its label, engine and engine settings."""
    heads = [{"run": i, "label": r["label"], "engine": r["engine"], "scheme": scheme_of(r),
              "estimate_origin": r["estimate_origin"]["kind"], "ranks": [k["rank"] for k in r["ranks"]]}
             for i, r in enumerate(runs)]
    columns = [{"run": i, "label": r["label"], "engine": r["engine"]["name"], "rank": k["rank"]}
               for i, r in enumerate(runs) for k in r["ranks"]]
    locations = [loc for loc in LOCATIONS if loc == "device" or any(r["shows_host"] for r in runs)]
    rows = []
    for moment in MOMENTS:
        for loc in locations:
            per_column = [_rank_cells(k, moment, loc) for r in runs for k in r["ranks"]]
            for cat in (*CATEGORIES, "total"):
                rows.append({"moment": moment, "location": loc, "category": cat,
                             "cells": [cells[cat] for cells in per_column]})
    models = sorted({(r["model_name"], r["parameters"]["n_params"] or 0) for r in runs})
    return {"runs": heads, "columns": columns, "rows": rows, "locations": locations,
            "engines": sorted({r["engine"]["name"] for r in runs}),
            "same_model": len(models) == 1, "models": [{"model": m, "n_params": n or None} for m, n in models]}


def _parameters_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: trainable and frozen parameter counts (recorded, estimated) and the adapter config."""
    return [{"label": r["label"], "n_params": r["parameters"]["n_params"], "recorded": r["parameters"]["recorded"],
             "estimated": r["parameters"]["estimated"],
             "adapter": None if r["parameters"]["adapter"] is None else r["parameters"]["adapter"]["words"],
             "opt_bytes_per_trainable_param": r["overhead"]["measured"]["opt_bytes_per_trainable_param"]}
            for r in runs]


def build_sweep_data(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Comparisons across runs: per-rank model states, every category side by side, trainable and
    frozen parameters, the sharding saving against world size, loss against memory per optimizer."""
    model_states = [{
        "label": r["label"], "engine": r["engine"]["name"],
        "ranks": [{"rank": k["rank"],
                   **{c: (None if k["measured"] is None else sum(k["measured"][loc][c] for loc in LOCATIONS))
                      for c in MODEL_STATE_CATEGORIES}} for k in r["ranks"]],
    } for r in runs]

    loss_vs_memory: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        peak = _worst_rank([k["peak"]["bytes"] if k["peak"] else None for k in r["ranks"]])
        final = r["loss"]["final"]
        if peak is None or final is None:
            continue
        loss_vs_memory.setdefault(str(r["run"].get("optimizer")), []).append(
            {"label": r["label"], "peak_bytes": peak, "final_loss": final["mean"], "step": final["step"]})
    params = _parameters_table(runs)
    return {"model_states": model_states, "side_by_side": side_by_side(runs), "zero": _saving_groups(runs),
            "parameters": params if any(p["recorded"] or p["estimated"] or p["adapter"] for p in params) else None,
            "loss_vs_memory": loss_vs_memory}
