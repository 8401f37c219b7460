"""Self-contained HTML reports of memprof runs (one run, or a sweep of several).

``write_report(run_docs, path)`` is what the launcher calls at the end of a run and what
``memprof report`` calls; :func:`memprof.report.data.build_report_data` gives the same content as
plain data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memprof.errors import MemprofError
from memprof.report.data import build_report_data
from memprof.report.render import render_html
from memprof.run.files import REPORT_FILE_NAME, collector_paused, write_text_atomic

__all__ = ["build_report_data", "collector_paused", "render_html", "write_report"]


def write_report(
    run_docs: list[dict[str, Any]],
    path: str | os.PathLike,
    *,
    sources: Sequence[str] | None = None,
    title: str | None = None,
    estimate_missing: bool = False,
) -> Path:
    """Write the HTML report of ``run_docs`` (memprof.json dicts, as :func:`memprof.run.files.load_run`
    returns them) to ``path`` atomically and return the path. ``sources`` name the runs in error
    messages and on the page. ``estimate_missing``: show a run that stores no estimate beside the
    estimate of its recorded setup, computed now (``memprof report`` does). Raises MemprofError for
    a malformed run doc or an unwritable path; nothing is written then."""
    if not run_docs:
        raise MemprofError("no run to report: pass at least one memprof.json or run folder")
    with collector_paused():
        html = render_html(build_report_data(run_docs, sources, estimate_missing=estimate_missing), title=title)
    path = Path(path)
    if path.is_dir():
        raise MemprofError(f"{path} is a folder: name the report file, e.g. {path / REPORT_FILE_NAME}")
    try:
        write_text_atomic(path, html)
    except OSError as e:
        raise MemprofError(f"cannot write the report to {path}: {e.strerror or e}: choose a writable path with -o") from None
    return path
