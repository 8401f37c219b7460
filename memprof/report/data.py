"""Run docs (the memprof.json shape) -> the plain data a report shows: dicts, lists, ints, floats.

Everything the page displays is computed as plain data, so tests check numbers without parsing
HTML, and :mod:`memprof.report.render` only turns this data into charts and tables. One module per
question: :mod:`~memprof.report.run_page` (one run's page), :mod:`~memprof.report.run_summary`
(its label and summary table), :mod:`~memprof.report.rank_figures` (each rank's figures),
:mod:`~memprof.report.series` (chart series), :mod:`~memprof.report.run_engine` (the engine and
its settings), :mod:`~memprof.report.parameters` (trainable / frozen parameters, adapters),
:mod:`~memprof.report.estimates` (a stored or freshly computed estimate),
:mod:`~memprof.report.sweep_page` (across runs);
:func:`build_report_data` here puts them together.

Measured beside estimated is :mod:`memprof.compare`'s, not a copy of it: every at-rest cell and
every phase-peak total takes its measured, estimated, error and check from
:func:`memprof.compare.comparison_of`'s row, so the page cannot disagree with
``memprof compare --check``. Its conventions:

* "at rest" is the ``step`` phase's ``end`` breakdown of a rank's last complete step (step 1 creates
  optimizer state lazily, so the last step is the steady state the estimator models);
* estimate error = (estimated - measured) / measured; rank 0's estimate stands in for a rank the
  estimator does not list;
* per-step series are downsampled for charts only (bucket maxima for memory so no peak is lost,
  bucket means for loss); tables hold exact bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memprof.report.estimates import with_estimate
from memprof.report.run_page import build_run_data
from memprof.report.run_summary import SETTING_FIELDS, run_label
from memprof.report.series import MAX_CHART_STEPS, bucket_ranges
from memprof.report.sweep_page import build_sweep_data, model_state_bytes

__all__ = ["MAX_CHART_STEPS", "SETTING_FIELDS", "build_report_data", "build_run_data", "build_sweep_data",
           "bucket_ranges", "model_state_bytes", "run_label"]


def build_report_data(run_docs: list[dict[str, Any]], sources: Sequence[str] | None = None,
                      max_chart_steps: int = MAX_CHART_STEPS, estimate_missing: bool = False) -> dict[str, Any]:
    """Everything a report shows, for one or several runs (``sources`` name them in messages).
    ``estimate_missing``: a run that stores no estimate is shown beside the estimate of its recorded
    setup, computed now (``memprof report`` does this, as ``memprof compare`` does), and says so."""
    sources = list(sources) if sources is not None else [f"run {i + 1}" for i in range(len(run_docs))]
    runs = []
    for doc, src in zip(run_docs, sources):
        origin = None
        if estimate_missing:
            doc, origin = with_estimate(doc)
        runs.append(build_run_data(doc, src, max_chart_steps, origin))
    # identical labels would make one sweep bar hide another: number the repeats
    seen: dict[str, int] = {}
    for r in runs:
        seen[r["label"]] = seen.get(r["label"], 0) + 1
        if seen[r["label"]] > 1:
            r["label"] += f" #{seen[r['label']]}"
    return {"runs": runs, "sweep": build_sweep_data(runs) if len(runs) > 1 else None}
