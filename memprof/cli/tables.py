"""The tables' old import path: the layout lives in :mod:`memprof.display` (below ``memprof.cli``
and ``memprof.measure``, which both print tables)."""

from memprof.display.console import LOG_WIDTH, output_console
from memprof.display.rank_table import print_rank_table, worst_phase
from memprof.display.tables import Column, fitted_tables, print_tables

__all__ = ["LOG_WIDTH", "Column", "fitted_tables", "output_console", "print_rank_table", "print_tables", "worst_phase"]
