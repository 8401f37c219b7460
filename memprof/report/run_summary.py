"""The run's summary on the page: its one-line label and the table of what was trained, how and where."""

from __future__ import annotations

from typing import Any

from memprof.report.parameters import adapter_short, parameters_data, parameters_words
from memprof.report.run_engine import (
    DEEPSPEED,
    FSDP2,
    engine_of,
    engine_settings,
    engine_short,
    engine_title,
    model_name,
    precision_of,
)
from memprof.run.files import offload_param_of
from memprof.units import format_bytes


def run_label(run: dict[str, Any]) -> str:
    """model · engine (ZeRO stage, or FSDP2 and its knobs) · optimizer · precision · N · offload · adapters."""
    parts = [model_name(run), engine_short(run), str(run.get("optimizer", "?")), str(precision_of(run) or "?"),
             f"N={run.get('world_size', '?')}"]
    if engine_of(run) == FSDP2:
        devices: tuple[tuple[str, Any], ...] = (("param", run["fsdp2"].get("offload_params")),)
    else:
        devices = (("optimizer", run.get("offload_optimizer")), ("param", offload_param_of(run)))
    parts += [f"{what} offload {device}" for what, device in devices if device not in (None, "none")]
    adapters = adapter_short(run)
    if adapters:
        parts.append(adapters)
    return " · ".join(parts)


def _samples_per_update(run: dict[str, Any]) -> str | None:
    """micro-batch x gradient accumulation x world size, when all three are recorded."""
    vals = [run.get(k) for k in ("micro_batch", "gradient_accumulation_steps", "world_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return None
    mb, ga, n = vals
    return f"{mb * ga * n:,} ({mb} x {ga} x {n} ranks)"


SETTING_FIELDS = ("World size", "Engine", "ZeRO stage", "Precision", "Micro-batch x sequence", "Gradient accumulation",
                  "Samples per optimizer step", "Activation checkpointing", "Offload", "Adapters")
"""The summary's rows that are the launcher's or Trainer's memory-shaping settings (in this order)."""


_OWN_ROWS = ("ZeRO stage", "precision", "offload")  # engine settings the summary gives rows of their own


def _zero_stage_words(run: dict[str, Any]) -> Any:
    engine = engine_of(run)
    if engine == DEEPSPEED:
        return run.get("zero_stage")
    return f"none: {engine_title(run)} has no ZeRO stage" + (" (it shards like ZeRO-3 on its own)" if engine == FSDP2 else "")


def _offload_words(run: dict[str, Any]) -> str:
    if engine_of(run) == FSDP2:
        return ("params: cpu (CPUOffloadPolicy: shards, their gradients and the optimizer step on the host)"
                if run["fsdp2"].get("offload_params") == "cpu" else "none")
    return f"optimizer: {run.get('offload_optimizer', 'none')}, params: {offload_param_of(run)}"


def run_summary(run: dict[str, Any], ranks: list[dict[str, Any]],
                estimate: dict[str, Any] | None = None) -> list[dict[str, str]]:
    versions = run.get("versions") or {}
    devices = sorted({str(r.get("device")) for r in ranks if r.get("device")})
    params = parameters_data(run, estimate)
    rows = [
        ("Model", model_name(run)),
        ("Parameters", parameters_words(params)),
        ("World size", run.get("world_size")),
        ("Nodes", run.get("nodes")),
        ("Engine", f"{engine_title(run)}: " + "; ".join(f"{e['name']} {e['value']}" for e in engine_settings(run)
                                                         if e["name"] not in _OWN_ROWS)),
        ("ZeRO stage", _zero_stage_words(run)),
        ("Optimizer", run.get("optimizer")),
        ("Precision", precision_of(run)),
        ("Micro-batch x sequence", f"{run.get('micro_batch', '?')} x {run.get('seq_len', '?')}"),
        ("Gradient accumulation", run.get("gradient_accumulation_steps")),
        ("Samples per optimizer step", _samples_per_update(run)),
        ("Activation checkpointing", run.get("activation_checkpointing")),
        ("Offload", _offload_words(run)),
        ("Adapters", params["adapter"]["words"] if params["adapter"] else "none recorded"),
        ("Steps", run.get("steps")),
        ("Device", f"{run.get('device_type', '?')} ({', '.join(devices) or 'no rank reported one'})"),
        ("Backend", run.get("backend")),
        ("Memory budget", None if not run.get("memory_budget_bytes")
         else f"{format_bytes(int(run['memory_budget_bytes']))} ({int(run['memory_budget_bytes']):,} B, simulated)"),
        ("Versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None),
    ]
    return [{"field": k, "value": "—" if v is None else str(v), "setting": k in SETTING_FIELDS}
            for k, v in rows]
