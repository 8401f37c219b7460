"""``memprof compare RUN``: a run's measured memory beside the estimate for its own setup."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from memprof.argparsing import MemprofArgumentParser
from memprof.compare import (
    CATEGORY_TOLERANCE,
    CHECK_CATEGORIES_BY_DEFAULT,
    PEAK_TOLERANCE,
    RESIDENT_TOLERANCE,
    Comparison,
    compare_run,
    run_gas,
    steady_cycle_indices,
)
from memprof.display.console import output_console
from memprof.display.tables import Column, print_tables
from memprof.errors import MemprofError
from memprof.report.run_engine import engine_short, model_name, precision_of
from memprof.run.files import load_run
from memprof.run.schema import check_phase_records, check_run_doc
from memprof.units import format_bytes

SUMMARY = "put a run's measured memory beside its estimate, per rank and category"


def build_parser() -> MemprofArgumentParser:
    p = MemprofArgumentParser(
        prog="memprof compare",
        description=(
            f"{SUMMARY} (the last complete step, against the estimate for the run's own "
            f"setup). Checked: resident params/master_params/optimizer_state within "
            f"{RESIDENT_TOLERANCE:.1%}, per-phase peak totals within {PEAK_TOLERANCE:.0%}; each category "
            f"at each phase peak is shown with its error as a share of that peak (within "
            f"{CATEGORY_TOLERANCE:.0%} of it, checked unless --no-check-categories). Where ranks' peaks differ "
            f"by more than 1%, the category that makes the difference is named."
        ),
    )
    p.add_argument("run", help="a memprof.json or a run folder of rank<R>.jsonl files")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument(
        "--fresh-estimate",
        action="store_true",
        help="re-estimate from the run's metadata with this memprof instead of the stored estimate",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when a checked figure is outside its tolerance")
    p.add_argument(
        "--check-categories",
        action=argparse.BooleanOptionalAction,
        default=CHECK_CATEGORIES_BY_DEFAULT,
        help=f"with --check, also exit 1 when a category at a phase peak is off by more than "
             f"{CATEGORY_TOLERANCE * 100:g}%% of that peak (default: {'on' if CHECK_CATEGORIES_BY_DEFAULT else 'off'}; "
             f"--no-check-categories gates the totals only)",
    )
    return p


def run_estimate(run_doc: dict[str, Any], fresh: bool) -> dict[str, Any]:
    if run_doc.get("estimate") and not fresh:
        return run_doc["estimate"]
    from memprof.estimate import estimate, inputs_from_run

    return estimate(inputs_from_run(run_doc["run"])).to_json()


def _fmt_err(err: float | None) -> str:
    if err is None:
        return "-"
    if err == float("inf"):
        return "new"
    return f"{err:+.2%}"


def _title(run_doc: dict[str, Any]) -> str:
    run = run_doc["run"]
    return (f"{model_name(run)} · {engine_short(run)} · {run.get('optimizer')} · "
            f"{precision_of(run)} · world {run.get('world_size')} · {run.get('device_type')}")


def _check_cell(cmp: Comparison, row: Any) -> str:
    """ok / OUT for a gated row; "off" for a category row outside its tolerance that --check does not gate."""
    if row.ok is None:
        return ""
    if row.ok:
        return "ok"
    return "[red]OUT[/red]" if cmp.gates(row) else "[yellow]off[/yellow]"


def print_totals_table(cmp: Comparison, run_doc: dict[str, Any]) -> None:
    columns = [Column("rank"), Column("what"), Column("where"), Column("category / phase"),
               Column("measured", numeric=True), Column("estimated", numeric=True), Column("error", numeric=True),
               Column("check")]
    rows = []
    for r in cmp.rows:
        if r.what == "category" or (r.what == "rest" and r.measured == 0 and r.estimated == 0):
            continue  # nothing held and nothing predicted: keep the table readable
        rows.append([str(r.rank), "at rest" if r.what == "rest" else "peak", r.location, r.name,
                     format_bytes(r.measured), format_bytes(r.estimated), _fmt_err(r.error), _check_cell(cmp, r)])
    print_tables(output_console(), columns, rows, f"measured vs estimated — {_title(run_doc)}", key_columns=4)


def print_category_table(cmp: Comparison) -> None:
    """Each device category at each phase peak; the error is a share of that phase's measured peak."""
    columns = [Column("rank"), Column("phase"), Column("category"), Column("measured", numeric=True),
               Column("estimated", numeric=True), Column("error of peak", numeric=True), Column("check")]
    rows = []
    for r in cmp.rows:
        if r.what != "category" or (r.measured == 0 and r.estimated == 0):
            continue
        phase, category = r.name.split("/", 1)
        rows.append([str(r.rank), phase, category, format_bytes(r.measured), format_bytes(r.estimated),
                     _fmt_err(r.error), _check_cell(cmp, r)])
    if rows:
        print_tables(output_console(), columns, rows,
                     f"each category at each phase peak (device; error = share of the peak, ±{CATEGORY_TOLERANCE:.0%})",
                     key_columns=3)


def print_table(cmp: Comparison, run_doc: dict[str, Any]) -> None:
    print_totals_table(cmp, run_doc)
    print_category_table(cmp)
    console = output_console()
    for d in cmp.rank_differences:
        console.print(f"[bold]ranks differ[/bold]: {d.words()}")
    if cmp.missing_ranks:
        console.print(f"missing ranks (no records): {cmp.missing_ranks}")
    for w in cmp.warnings:
        console.print(f"[bold]note[/bold]: {w}")
    n_bad = len(cmp.failures())
    console.print("all checked figures within tolerance" if n_bad == 0 else f"{n_bad} checked figure(s) outside tolerance")
    misses = len(cmp.category_misses())
    if misses and not cmp.check_categories:
        console.print(f"{misses} category figure(s) off by more than {CATEGORY_TOLERANCE:.0%} of their peak "
                      "(not checked: --no-check-categories was given)")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_doc = load_run(args.run)
    # every field compare reads (phase breakdowns and peaks, the stored estimate, the run's sizes)
    check_run_doc(run_doc, str(args.run))
    for i, entry in enumerate(run_doc["ranks"]):  # the peak snapshots compare reads
        check_phase_records(run_doc, str(args.run), i, steady_cycle_indices(entry, run_gas(run_doc)))
    if not run_doc["ranks"]:
        raise MemprofError(f"{args.run} holds no rank records: nothing to compare")
    cmp = compare_run(run_doc, run_estimate(run_doc, args.fresh_estimate), args.check_categories)
    if args.json:
        json.dump(cmp.to_json(), sys.stdout, indent=1)
        print()
    else:
        print_table(cmp, run_doc)
    return 1 if (args.check and not cmp.ok) else 0
