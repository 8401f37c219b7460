"""The CUDA caching allocator's counters for one phase: allocated, reserved, peak, retries.

On CUDA the peak comes from the allocator (``reset_peak_memory_stats`` at the phase start, the
``allocated_bytes.all.peak`` counter at its end), so no dispatch mode is needed and the cost stays
at a dictionary read per phase. Never called on a CPU run.
"""

from __future__ import annotations

from typing import Any

import torch


def start_phase(device: torch.device) -> None:
    """Open a peak window: the allocator's peak restarts from what is allocated now."""
    torch.cuda.reset_peak_memory_stats(device)


def read(device: torch.device) -> dict[str, int]:
    """The PhaseRecord ``cuda`` block: ``allocated_bytes``, ``reserved_bytes``,
    ``peak_allocated_bytes`` (since :func:`start_phase`), ``alloc_retries`` (cumulative)."""
    stats: dict[str, Any] = torch.cuda.memory_stats(device)
    return {
        "allocated_bytes": int(stats.get("allocated_bytes.all.current", 0)),
        "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
        "peak_allocated_bytes": int(stats.get("allocated_bytes.all.peak", 0)),
        "alloc_retries": int(stats.get("num_alloc_retries", 0)),
    }


def device_capacity(device: torch.device) -> int:
    """Total memory of the GPU in bytes (the budget of a real OOM)."""
    return int(torch.cuda.get_device_properties(device).total_memory)


def allocated_and_peak(device: torch.device) -> tuple[int, int]:
    """(allocated bytes now, the peak since :func:`start_phase`): one read of the allocator's stats,
    at a labelled region's start and end (memprof.measure.regions.PeakRegions)."""
    stats: dict[str, Any] = torch.cuda.memory_stats(device)
    return int(stats.get("allocated_bytes.all.current", 0)), int(stats.get("allocated_bytes.all.peak", 0))
