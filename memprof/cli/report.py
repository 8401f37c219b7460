"""``memprof report RUN [RUN ...] -o reports/NAME.html``: a self-contained HTML report.

RUN is a ``memprof.json`` or a run folder of ``rank<R>.jsonl`` files. One run gives the single-run
report; several give each run plus the comparison across them (a sweep).
"""

from __future__ import annotations

import argparse
import sys

from memprof.errors import MemprofError
from memprof.runfile import load_run

DEFAULT_OUTPUT = "reports/report.html"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line and exit 2, like every other memprof error (argparse would print the usage too)
        raise MemprofError(f"{message}: see 'memprof report --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memprof report", description="Write a self-contained HTML report of one or more memprof runs.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a memprof.json or a run folder of rank<R>.jsonl files")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="PATH",
                   help=f"the HTML file to write (default {DEFAULT_OUTPUT})")
    p.add_argument("--title", default=None, help="page title (default: from the runs)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from memprof.report import collector_paused, write_report  # after parsing: --help stays fast

    with collector_paused():
        docs = [load_run(path) for path in args.runs]
    for path, doc in zip(args.runs, docs):
        if doc.get("missing_ranks"):
            print(f"memprof report: warning: {path} lacks ranks {doc['missing_ranks']}: "
                  "the report shows the ranks present and marks the gap", file=sys.stderr)
    out = write_report(docs, args.output, sources=list(args.runs), title=args.title)
    print(out)
    return 0
