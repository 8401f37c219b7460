"""``memprof`` command line: one module per subcommand, each with ``main(argv) -> int``.

A MemprofError anywhere becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from memprof.errors import MemprofError

SUBCOMMANDS = {
    "estimate": "memprof.cli.estimate",
    "plan": "memprof.cli.plan",
    "compare": "memprof.cli.compare",
    "report": "memprof.cli.report",
}

USAGE = """usage: memprof {estimate,plan,compare,report} [options]

  estimate   predict per-rank memory by category for a model and DeepSpeed setup
  plan       find the cheapest configuration that fits a GPU memory size
  compare    put a run's measured memory beside its estimate, per rank and category
  report     write a self-contained HTML report of one or more runs

'memprof COMMAND --help' describes each command."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from memprof import __version__

        print(f"memprof {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"memprof: unknown command {name!r}: choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name])
    try:
        return int(module.main(rest) or 0)
    except MemprofError as e:
        print(f"memprof {name}: error: {e}", file=sys.stderr)
        return e.exit_code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
