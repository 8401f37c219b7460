"""Run every benchmark in one go (`make bench`); each prints its own measurements.

The figures in BENCHMARKS.md come from these scripts; each benchmark compares its cases side by side
in one process run, so ratios are not skewed by machine load between runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ["bench_estimate.py"],
    ["bench_report.py"],
    ["bench_profiler.py", "--rounds", "10", "--steps", "2"],
    ["sweep_configs.py"],
]


def main() -> int:
    failed = []
    for script, *args in BENCHMARKS:
        print(f"== {script} {' '.join(args)}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *args])
        if rc != 0:
            failed.append(script)
    if failed:
        print(f"benchmarks that missed their target or failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
