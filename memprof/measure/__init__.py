"""Measuring memory: who owns each storage, allocation tracking for peaks, CUDA counters, psutil,
per-rank records and the gather to ``memprof.json``.

The public entry point is :class:`MemoryProfiler`; see docs/profiler.md.
"""

from memprof.measure.oom import SimulatedOutOfMemoryError
from memprof.measure.profiler import MemoryProfiler, StepContext

__all__ = ["MemoryProfiler", "SimulatedOutOfMemoryError", "StepContext"]
