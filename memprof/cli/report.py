"""``memprof report RUN [RUN ...] -o reports/NAME.html``: a self-contained HTML report.

RUN is a ``memprof.json`` or a run folder of ``rank<R>.jsonl`` files. One run gives the single-run
report; several give each run plus the comparison across them (a sweep), DeepSpeed and FSDP2 runs
alike. A run that stores no estimate (a MemoryProfiler in your own loop) is shown beside the estimate
of its recorded setup, computed now, as ``memprof compare`` does; the page says so.
"""

from __future__ import annotations

import sys

from memprof.argparsing import MemprofArgumentParser
from memprof.run.files import load_run

SUMMARY = "write a self-contained HTML report of one or more runs"
DEFAULT_OUTPUT = "reports/report.html"


def build_parser() -> MemprofArgumentParser:
    p = MemprofArgumentParser(prog="memprof report", description=f"{SUMMARY}.")
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
    out = write_report(docs, args.output, sources=list(args.runs), title=args.title, estimate_missing=True)
    print(out)
    return 0
