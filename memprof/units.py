"""Byte sizes and counts: parsing user input ("80GiB", "80GB", "2e9", "8") and formatting for display.

Internally memprof always holds integer bytes; this module is the only place units appear.
"""

from __future__ import annotations

import math
import re

from memprof.errors import MemprofError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """Parse a byte size. ``80GB`` is 80e9 bytes, ``80GiB`` is 80 * 2**30; a bare number is bytes.

    Raises MemprofError naming ``what`` for anything that is not a positive size.
    """
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise MemprofError(
            f"{what} {text!r} is not a size: use a number with an optional unit, "
            "e.g. 80GiB (2**30 bytes each) or 80GB (10**9 bytes each)"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise MemprofError(f"{what} {text!r} must be a positive size, e.g. 80GiB")
    return int(value)


def parse_count(text: str, what: str = "count") -> int:
    """Parse a positive count such as ``7.5e9`` or ``124000000``."""
    try:
        value = float(str(text).replace("_", ""))
    except ValueError:
        raise MemprofError(f"{what} {text!r} is not a number: use e.g. 7.5e9") from None
    if not math.isfinite(value) or value <= 0:
        raise MemprofError(f"{what} {text!r} must be a positive number, e.g. 7.5e9")
    return int(round(value))


def is_positive_int(value: object) -> bool:
    """Whether a value read from a file or passed in code is a positive whole number (bool is not:
    Python counts True as 1). The one check behind every "must be a positive whole number"."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_positive_int(text: str, what: str) -> int:
    """A positive whole number written by the user (``8``, ``1e3``, ``1_000``), or a MemprofError
    naming ``what`` (the flag)."""
    try:
        value = float(str(text).replace("_", ""))
    except ValueError:
        raise MemprofError(f"{what} {text!r} is not a number: use a positive whole number, e.g. 8") from None
    if not math.isfinite(value) or value <= 0 or value != int(value):
        raise MemprofError(f"{what} {text!r} must be a positive whole number, e.g. 8")
    return int(value)


def format_bytes(n: float, binary: bool = True, precision: int = 1) -> str:
    """Human-readable bytes: ``format_bytes(3 * 2**30) == '3.0 GiB'``; decimal with binary=False."""
    base, units = (1024.0, ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]) if binary else (
        1000.0,
        ["B", "KB", "MB", "GB", "TB", "PB"],
    )
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    i = 0
    while n >= base and i < len(units) - 1:
        n /= base
        i += 1
    if i == 0:
        return f"{sign}{int(n)} B"
    return f"{sign}{n:.{precision}f} {units[i]}"
