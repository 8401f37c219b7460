"""End of a run: rank 0 gathers every rank's records over torch.distributed, writes
``<out>/memprof.json`` atomically and prints the per-rank table (:mod:`memprof.display.rank_table`).
No shared filesystem is assumed: records travel as objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memprof.run.files import RUN_FILE_NAME, assemble_run, write_json_atomic


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
    """Assemble memprof.json (schema in :mod:`memprof.run.files`), write it atomically, return it."""
    doc = assemble_run(run, rank_records, estimate)
    write_json_atomic(Path(out_dir) / RUN_FILE_NAME, doc)
    return doc


def render_rank_table(run_doc: dict[str, Any], console: Any = None) -> None:
    """Print the per-rank table (:mod:`memprof.display.rank_table`; rich is imported only now)."""
    from memprof.display.rank_table import print_rank_table

    print_rank_table(run_doc, console=console)
