"""The one place memprof creates a rich Console.

A pipe or a file has no width, and rich would assume 80 columns there; memprof gives logs a fixed
width instead, wide enough for its tables (each table is laid out to the width it gets,
:mod:`memprof.display.tables`).
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

LOG_WIDTH = 120
"""The width of a command's output when it goes to a pipe or a file and COLUMNS is unset."""

RUN_END_LOG_WIDTH = 180
"""The width of the end-of-run table in a log: under a launcher every rank's stdout is a pipe, and
a log line may be as wide as the table of a few ranks needs."""


def make_console(*, log_width: int, columns_in_logs: bool, highlight: bool) -> Console:
    """A console for stdout: the terminal's width on a terminal, else ``log_width`` (or COLUMNS,
    when ``columns_in_logs`` and it is set). ``highlight``: rich's colouring of numbers and
    strings in printed text."""
    if sys.stdout.isatty() or (columns_in_logs and os.environ.get("COLUMNS", "").isdigit()):
        return Console(highlight=highlight)
    return Console(highlight=highlight, width=log_width)


def output_console() -> Console:
    """The console for a ``memprof`` command's stdout: the terminal's width (or COLUMNS when set);
    when piped to a file, :data:`LOG_WIDTH`."""
    return make_console(log_width=LOG_WIDTH, columns_in_logs=True, highlight=False)


def run_end_console() -> Console:
    """The console for the end-of-run per-rank table (the launcher and the integrations): the
    terminal's width, else :data:`RUN_END_LOG_WIDTH`."""
    return make_console(log_width=RUN_END_LOG_WIDTH, columns_in_logs=False, highlight=True)
