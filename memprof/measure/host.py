"""Host memory of this process: resident set size via psutil, and its high-water mark."""

from __future__ import annotations

import sys

import psutil


class HostMemory:
    """Samples this process's RSS and remembers the largest value seen."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak_sampled = 0

    def rss(self) -> int:
        """Current resident set size in bytes (also folded into the sampled peak)."""
        value = int(self._process.memory_info().rss)
        if value > self.peak_sampled:
            self.peak_sampled = value
        return value

    def peak_rss(self) -> int:
        """Peak RSS in bytes: the kernel's high-water mark where it keeps one (it sees peaks
        between samples, but also those before profiling began), else the largest sample."""
        peak = self.peak_sampled
        if sys.platform.startswith("linux"):
            try:
                import resource

                # ru_maxrss is in KiB on Linux (bytes on macOS, which we do not read here)
                peak = max(peak, int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024)
            except (ImportError, OSError):
                pass
        return peak
