"""How an integration measures a framework's calls: by replacing a method on one *instance*
(never on a class, so other objects of the class are untouched), restorably."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class InstancePatch:
    """One instance attribute replaced, restorable (the previous instance attribute, if any, comes back)."""

    def __init__(self, owner: Any, name: str, replacement: Callable[..., Any]) -> None:
        self.owner, self.name = owner, name
        self.had_own = name in vars(owner)
        self.previous = vars(owner).get(name)
        setattr(owner, name, replacement)

    def restore(self) -> None:
        if self.had_own:
            setattr(self.owner, self.name, self.previous)
        else:
            try:
                delattr(self.owner, self.name)
            except AttributeError:
                pass
