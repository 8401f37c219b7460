"""Memory in the training logs users already watch: the per-category peak bytes of the last optimizer
step, as flat ``name -> number`` pairs a Trainer's ``logs`` dict carries to every ``report_to``
backend (TensorBoard, W&B, MLflow, ...) and to ``state.log_history``.

Keys (every phase the step had, every memprof category, this rank's compute device)::

    memprof/peak_<phase>_<category>_bytes   # the category's bytes at that phase's peak
    memprof/peak_<phase>_total_bytes        # the phase's peak (sum of the categories at it)
    memprof/peak_<phase>_host_bytes         # host-side (offloaded) bytes at that peak, when any
    memprof/optimizer_step                  # which optimizer step (from 0) the values are of

``<phase>`` is ``forward``, ``backward`` or ``step``; ``<category>`` one of memprof.categories'
(``params``, ``master_params``, ``grads``, ``optimizer_state``, ``comm_buffers``, ``activations``,
``other``). With gradient accumulation an optimizer step has several micro-steps; each phase's
values are those of the micro-step whose phase peak was highest.
"""

from __future__ import annotations

from typing import Any

from memprof.categories import Category, Location

PREFIX = "memprof/"


def peak_log_values(step_records: list[dict[str, Any]]) -> dict[str, int]:
    """The log keys (module doc) for one optimizer step's ``step`` records (rank<R>.jsonl's); empty
    when there are none."""
    if not step_records:
        return {}
    out: dict[str, int] = {}
    for phase in ("forward", "backward", "step"):
        recs = [r["phases"][phase] for r in step_records if phase in r.get("phases", {})]
        if not recs:
            continue
        top = max(recs, key=lambda rec: int(rec.get("peak_total", 0)))
        peak = top["peak"]
        device = peak.get(Location.DEVICE.value, {})
        for category in Category:
            out[f"{PREFIX}peak_{phase}_{category.value}_bytes"] = int(device.get(category.value, 0))
        out[f"{PREFIX}peak_{phase}_total_bytes"] = int(top.get("peak_total", sum(device.values())))
        host = sum(int(v) for v in peak.get(Location.HOST.value, {}).values())
        if host:
            out[f"{PREFIX}peak_{phase}_host_bytes"] = host
    step = step_records[-1].get("optimizer_step")
    if isinstance(step, int):
        out[f"{PREFIX}optimizer_step"] = step
    return out
