"""The argument parser every memprof command uses (the ``memprof`` subcommands and
``launch/train.py``), and the flag types they share.

A bad flag is a :class:`~memprof.errors.MemprofError`: the command prints one line naming the problem
and exits 2, with no usage dump and no traceback (argparse's own ``error`` prints the usage and exits
from inside the parser).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from memprof.errors import MemprofError
from memprof.units import parse_positive_int, parse_size


class MemprofArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a MemprofError (one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise MemprofError(f"{message}: see '{self.prog} --help'")


def positive_int(flag: str) -> Callable[[str], int]:
    """``type=`` for a flag that takes a positive whole number.

    It raises MemprofError itself (argparse lets exceptions other than ArgumentTypeError, TypeError
    and ValueError through), so the message names the flag once and says what to write.
    """

    def parse(text: str) -> int:
        return parse_positive_int(text, flag)

    parse.__name__ = f"positive_int({flag})"
    return parse


def positive_size(flag: str) -> Callable[[str], int]:
    """``type=`` for a flag that takes a byte size (``80GiB``, ``80GB``, ``2e9``): integer bytes."""

    def parse(text: str) -> int:
        return parse_size(text, flag)

    parse.__name__ = f"positive_size({flag})"
    return parse
