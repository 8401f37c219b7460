"""A simulated device capacity: the error raised when tracked device bytes exceed it, and the
``oom`` record written for it (or for a real CUDA out-of-memory error)."""

from __future__ import annotations

from typing import Any

import torch

from memprof.categories import Breakdown
from memprof.units import format_bytes


class SimulatedOutOfMemoryError(torch.OutOfMemoryError):
    """The tracked device bytes went over ``--memory-budget``.

    A subclass of :class:`torch.OutOfMemoryError`, so a loop that handles a real CUDA OOM handles
    this the same way. Raised from inside the allocation that crossed the budget (CPU tracking) or
    at the end of the phase whose allocator peak crossed it (CUDA, see docs/profiler.md).
    """

    def __init__(self, requested_bytes: int | None, total_bytes: int, budget_bytes: int) -> None:
        self.requested_bytes = None if requested_bytes is None else int(requested_bytes)
        self.total_bytes = int(total_bytes)
        self.budget_bytes = int(budget_bytes)
        what = (
            f"an allocation of {format_bytes(requested_bytes)} took tracked device memory to"
            if requested_bytes is not None
            else "the phase's allocator peak reached"
        )
        super().__init__(
            f"memprof simulated out of memory: {what} {format_bytes(total_bytes)} ({total_bytes} bytes), "
            f"over the memory budget of {format_bytes(budget_bytes)} ({budget_bytes} bytes)"
        )


def oom_record(
    *,
    step: int | None,
    phase: str | None,
    breakdown: Breakdown,
    total_bytes: int,
    budget_bytes: int | None,
    message: str,
) -> dict[str, Any]:
    """The ``oom`` line of ``rank<R>.jsonl`` (schema in :mod:`memprof.run.files`)."""
    return {
        "type": "oom",
        "step": step,
        "phase": phase,
        "breakdown": breakdown,
        "total_bytes": int(total_bytes),
        "budget_bytes": None if budget_bytes is None else int(budget_bytes),
        "message": message.splitlines()[0] if message else "",
    }
