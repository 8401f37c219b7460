"""The project error type: anything the user can fix (bad flags, bad files) raises MemprofError.

Command-line entry points catch it and print its message as one line on stderr, exit code 2, no
traceback (see :func:`memprof.cli.main`).
"""

from __future__ import annotations


class MemprofError(Exception):
    """A problem with the user's input, with a message that names it and how to fix it."""

    exit_code = 2
