"""The run's summary on the page: its one-line label and the table of what was trained, how and where."""

from __future__ import annotations

from typing import Any

from memprof.run.files import offload_param_of
from memprof.units import format_bytes


def run_label(run: dict[str, Any]) -> str:
    stage = run.get("zero_stage")
    parts = [
        str(run.get("model", "?")),
        f"ZeRO-{stage}" if stage is not None else "ZeRO-?",
        str(run.get("optimizer", "?")),
        str(run.get("precision", "?")),
        f"N={run.get('world_size', '?')}",
    ]
    devices = (("optimizer", run.get("offload_optimizer")), ("param", offload_param_of(run)))
    offload = [f"{what} offload {device}" for what, device in devices if device not in (None, "none")]
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


def run_summary(run: dict[str, Any], ranks: list[dict[str, Any]]) -> list[dict[str, str]]:
    n_params = run.get("n_params")
    versions = run.get("versions") or {}
    devices = sorted({str(r.get("device")) for r in ranks if r.get("device")})
    offload = f"optimizer: {run.get('offload_optimizer', 'none')}, params: {offload_param_of(run)}"
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
