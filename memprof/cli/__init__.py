"""``memprof`` command line: one module per subcommand, each with ``SUMMARY`` (its line in the
top-level usage and the start of its ``--help``) and ``main(argv) -> int``.

A MemprofError anywhere, a bad flag included (:mod:`memprof.argparsing`), becomes one line on
stderr and exit code 2, never a traceback or a usage dump.
"""

from __future__ import annotations

import importlib
import sys

from memprof.errors import MemprofError

SUBCOMMANDS = {
    "estimate": "memprof.cli.estimate",
    "plan": "memprof.cli.plan",
    "advise": "memprof.cli.advise",
    "compare": "memprof.cli.compare",
    "report": "memprof.cli.report",
}


def usage() -> str:
    """The top-level usage: each subcommand with its module's SUMMARY."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"usage: memprof {{{','.join(SUBCOMMANDS)}}} [options]", ""]
    lines += [f"  {name:<{width}}   {importlib.import_module(module).SUMMARY}" for name, module in SUBCOMMANDS.items()]
    lines += ["", "'memprof COMMAND --help' describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        from memprof import __version__

        print(f"memprof {__version__}")
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        problem = "no command" if not argv else f"unknown command {argv[0]!r}"
        print(f"memprof: error: {problem}: choose one of {', '.join(SUBCOMMANDS)} (see 'memprof --help')", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name])
    try:
        return int(module.main(rest) or 0)
    except MemprofError as e:
        print(f"memprof {name}: error: {e}", file=sys.stderr)
        return e.exit_code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
