"""End of a run: rank 0 gathers every rank's records over torch.distributed, writes
``<out>/memprof.json`` atomically and prints the per-rank table. No shared filesystem is assumed:
records travel as objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memprof.categories import CATEGORIES
from memprof.runfile import RUN_FILE_NAME, assemble_run, write_json_atomic
from memprof.units import format_bytes


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when it is initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_records(
    records: list[dict[str, Any]], dst: int = 0, device: torch.device | str | None = None
) -> dict[int, list[dict[str, Any]]] | None:
    """Every rank's records on rank ``dst`` as ``{rank: records}``; ``None`` on other ranks.

    A collective: every rank of the default group must call it. Without an initialised process
    group it returns this process's records as rank 0. ``device``: the CUDA device this rank
    computes on (the profiler passes the model's); None keeps the current CUDA device.
    """
    rank, world = rank_and_world()
    if world == 1:
        return {rank: records}
    gathered: list[Any] | None = [None] * world if rank == dst else None
    # gather_object moves the pickled objects through the current CUDA device under NCCL; with one
    # process per GPU that must be this rank's own GPU. The model's device is the right one however
    # GPUs are made visible (LOCAL_RANK need not be a valid ordinal under a per-rank
    # CUDA_VISIBLE_DEVICES), and the context restores the caller's current device afterwards.
    cuda_device = None
    if device is not None and dist.get_backend() == "nccl" and torch.device(device).type == "cuda":
        cuda_device = torch.device(device)
    if cuda_device is not None:
        with torch.cuda.device(cuda_device):
            dist.gather_object(records, gathered, dst=dst)
    else:
        dist.gather_object(records, gathered, dst=dst)
    if gathered is None:
        return None
    out: dict[int, list[dict[str, Any]]] = {}
    for recs in gathered:
        if recs:
            out[int(recs[0]["rank"])] = recs
    return out


def write_run_file(
    out_dir: str | os.PathLike,
    run: dict[str, Any],
    rank_records: dict[int, list[dict[str, Any]]],
    estimate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble memprof.json (schema in :mod:`memprof.runfile`), write it atomically, return it."""
    doc = assemble_run(run, rank_records, estimate)
    write_json_atomic(Path(out_dir) / RUN_FILE_NAME, doc)
    return doc


def worst_phase(rank_entry: dict[str, Any]) -> tuple[int, str, dict[str, Any]] | None:
    """(step, phase, PhaseRecord) of the rank's highest device peak, or None without steps."""
    worst = None
    for step in rank_entry.get("steps") or []:
        for phase, rec in (step.get("phases") or {}).items():
            if worst is None or rec.get("peak_total", 0) > worst[2].get("peak_total", 0):
                worst = (step.get("step"), phase, rec)
    return worst


def render_rank_table(run_doc: dict[str, Any], console: Any = None) -> None:
    """Print one row per rank: its highest phase peak split by category, host bytes, peak RSS."""
    from rich.console import Console
    from rich.table import Table

    run = run_doc.get("run") or {}
    title = f"memprof: peak memory per rank ({run.get('device_type', '?')} run"
    if run.get("device_type") == "cpu":
        title += "; 'device' is the CPU memory used for compute"
    table = Table(title=title + ")")
    for col in ("rank", "peak at", "device peak", *CATEGORIES, "host", "peak RSS", "status"):
        table.add_column(col, justify="left" if col in ("rank", "peak at", "status") else "right")
    for entry in run_doc.get("ranks") or []:
        worst = worst_phase(entry)
        status = "OOM" if entry.get("oom") else ("complete" if entry.get("complete") else "incomplete")
        if worst is None:
            row = [str(entry.get("rank")), "-", "-", *("-" for _ in CATEGORIES), "-"]
        else:
            step, phase, rec = worst
            peak = rec.get("peak") or {}
            device = peak.get("device") or {}
            host_total = sum(int(v) for v in (peak.get("host") or {}).values())
            row = [
                str(entry.get("rank")),
                f"step {step} {phase}",
                format_bytes(rec.get("peak_total", 0)),
                *(format_bytes(device.get(cat, 0)) for cat in CATEGORIES),
                format_bytes(host_total),
            ]
        rss = entry.get("peak_host_rss_bytes")
        row += [format_bytes(rss) if rss is not None else "-", status]
        table.add_row(*row)
    for missing in run_doc.get("missing_ranks") or []:
        table.add_row(str(missing), *(["-"] * (len(CATEGORIES) + 4)), "missing")
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: 80 columns would fold every number
            console = Console(width=160)
    console.print(table)
