"""The argument parser's old import path: the parser and the flag types live in
:mod:`memprof.argparsing`, below both ``memprof.cli`` and ``memprof.train`` (which uses them too)."""

from memprof.argparsing import MemprofArgumentParser, positive_int, positive_size

__all__ = ["MemprofArgumentParser", "positive_int", "positive_size"]
