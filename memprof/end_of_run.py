"""The end of a profiled run, one way for the launcher (:mod:`memprof.train.loop`) and the
integrations (:mod:`memprof.integrations.recorder`): the estimate for the run's own setup, the
gather into ``memprof.json`` (:meth:`memprof.measure.MemoryProfiler.finish`), then on rank 0 the
per-rank table, ``report.html`` and the line naming the run folder.

It sits above ``memprof.measure``, ``memprof.report``, ``memprof.display`` and ``memprof.estimate``
(imported only when used) and below the launcher and the integrations, which import none of those
for the end of a run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from memprof.errors import MemprofError
from memprof.run.files import RANK_FILE_PATTERN, REPORT_FILE_NAME, RUN_FILE_NAME


def estimate_for_run(run: dict[str, Any], rank: int, prog: str) -> dict[str, Any] | None:
    """The estimator's prediction for a run's own setup (``memprof.estimate.inputs_from_run``), as
    memprof.json stores it; None with a one-line warning on rank 0 (``prog`` names the caller) if it
    fails: a missing estimate must not cost the measurement."""
    try:
        from memprof.estimate import estimate, inputs_from_run

        return estimate(inputs_from_run(run)).to_json()
    except Exception as e:  # noqa: BLE001 - any estimator failure degrades to "estimate": null
        if rank == 0:
            print(f"{prog}: warning: no estimate recorded ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return None


def write_report_beside(run_doc: dict[str, Any], path: Path, prog: str) -> None:
    """``report.html`` of one run at ``path``; a failure is one "report.html skipped" line on
    stderr (the run files are already written: the report can be made later with
    ``memprof report``)."""
    try:
        from memprof.report import write_report

        write_report([run_doc], path)
    except ImportError as e:  # jinja2 or plotly missing
        print(f"{prog}: report.html skipped: memprof.report is not available ({e})", file=sys.stderr, flush=True)
        return
    except MemprofError as e:
        print(f"{prog}: report.html skipped: {e}", file=sys.stderr, flush=True)
        return
    print(f"memprof: report {path}", flush=True)


def finish_run(profiler: Any, *, prog: str, owns_process_group: bool, write_report: bool = True,
               print_table: bool = True) -> dict[str, Any] | None:
    """End a run whose ``with profiler:`` block is over: estimate, gather every rank into
    ``memprof.json``, then on rank 0 the per-rank table, ``report.html`` (unless ``write_report``
    is False) and the run folder's path. A collective: every rank calls it. Returns the run
    document on rank 0, None elsewhere. ``prog`` names the caller in warnings (``train.py``,
    ``memprof``). ``owns_process_group``: memprof's launcher, which destroys the process group
    after the run's last collective; an integration leaves the user's alone (memprof.run_teardown:
    why that last collective keeps gloo ranks from aborting at exit)."""
    from memprof.run_teardown import shutdown_distributed

    estimate = estimate_for_run(profiler.run, profiler.rank, prog)
    run_doc = profiler.finish(estimate=estimate)
    shutdown_distributed(destroy=owns_process_group)
    if run_doc is None:
        return None
    out_dir = Path(profiler.out_dir)
    if print_table:
        from memprof.display.console import run_end_console
        from memprof.display.rank_table import print_rank_table

        print_rank_table(run_doc, console=run_end_console())
    if write_report:
        write_report_beside(run_doc, out_dir / REPORT_FILE_NAME, prog)
    print(f"memprof: run files in {out_dir.resolve()} ({RUN_FILE_NAME}, {RANK_FILE_PATTERN})", flush=True)
    return run_doc
