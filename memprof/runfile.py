"""The run files' old import path: they live in :mod:`memprof.run.files` (the home of every run
file, with :mod:`memprof.run.schema`). Kept for importers not yet moved (memprof.measure.profiler)."""

from memprof.run.files import (
    RANK_FILE_PATTERN,
    REPORT_FILE_NAME,
    RUN_FILE_NAME,
    SCHEMA_VERSION,
    RankWriter,
    assemble_run,
    collector_paused,
    load_run,
    rank_entry_from_records,
    rank_file_name,
    read_rank_lines,
    step_is_boundary,
    step_micro_index,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "RANK_FILE_PATTERN", "REPORT_FILE_NAME", "RUN_FILE_NAME", "SCHEMA_VERSION", "RankWriter", "assemble_run",
    "collector_paused", "load_run", "rank_entry_from_records", "rank_file_name", "read_rank_lines",
    "step_is_boundary", "step_micro_index", "write_json_atomic", "write_text_atomic",
]
