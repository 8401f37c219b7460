"""The plain data of the sweep page: comparisons across runs (per-rank model states, ZeRO's saving
against world size measured beside the paper's formula and the estimator, loss against memory)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memprof.categories import LOCATIONS, MODEL_STATE_CATEGORIES
from memprof.estimate.paper import zero_paper_model_states
from memprof.run.files import offload_param_of


def model_state_bytes(b: dict[str, dict[str, int]]) -> int:
    """params + master_params + grads + optimizer_state, device and host together."""
    return sum(int(b[loc][cat]) for loc in LOCATIONS for cat in MODEL_STATE_CATEGORIES)


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
               str(run.get("offload_optimizer", "none")), str(offload_param_of(run)))
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
