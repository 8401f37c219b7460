"""The house rules a reader relies on: no function in memprof/ longer than a screen (80 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "memprof"
MAX_FUNCTION_LINES = 80


def _functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_over_a_screen():
    long = [f"{path.relative_to(ROOT.parent)}:{line} {name}() is {n} lines"
            for path in sorted(ROOT.rglob("*.py")) for name, line, n in _functions(path) if n > MAX_FUNCTION_LINES]
    assert not long, "split these at their seams:\n" + "\n".join(long)
