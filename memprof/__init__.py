"""memprof: a memory profiler and capacity planner for DeepSpeed training."""

__version__ = "0.1.0"
