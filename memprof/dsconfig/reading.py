"""What one reading of a config collects as it goes (the "auto" values and what they became, keys
DeepSpeed ignores, values it derives) and how it fails (one line naming the config); the number
rule DeepSpeed's pydantic fields follow."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from memprof.dsconfig.schema import AutoValue
from memprof.errors import MemprofError


@dataclass
class Reading:
    """One config being read: its name for messages and the notes gathered so far."""

    where: str
    auto: list[AutoValue] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)

    def fail(self, message: str) -> MemprofError:
        return MemprofError(f"{self.where}: {message}")

    def whole(self, value: Any, key: str, positive: bool = False) -> int:
        return whole(value, key, self.where, positive)


def whole(value: Any, key: str, where: str, positive: bool = False) -> int:
    """A whole number as DeepSpeed's pydantic int fields take it (``5e8`` included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MemprofError(f"{where}: {key} = {value!r} must be a non-negative whole number")
    if value < 0 or (positive and value < 1):
        kind = "an integer of at least 1" if positive else "a non-negative whole number"
        raise MemprofError(f"{where}: {key} is {value!r}: it must be {kind}")
    if float(value) != int(value):
        raise MemprofError(f"{where}: {key} = {value!r} must be a whole number")
    return int(value)
