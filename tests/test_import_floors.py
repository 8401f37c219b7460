"""memprof's rooms read top-down: no import runs back up a floor, and no two rooms import each other.

Every module under memprof/ is parsed (ast, no import), so an import inside a function counts as
much as one at the top. A *room* is a top-level package or module of memprof (``measure``,
``cli``, ``compare``, ...). Forbidden arrows (issue 14):

* ``measure -> cli``: display code lives in ``memprof.display``, below both;
* ``train -> cli``, ``train -> report``: the launcher ends a run through ``memprof.end_of_run``
  and parses flags with ``memprof.argparsing``;
* ``integrations -> train``: what both need lives in ``memprof.run``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "memprof"

FORBIDDEN = {("measure", "cli"), ("train", "cli"), ("train", "report"), ("integrations", "train")}


def room_of_module(dotted: str) -> str | None:
    """The room of an absolute memprof module name (``memprof.measure.gather`` -> ``measure``);
    None for a module outside memprof, ``""`` for the package itself (its version only)."""
    parts = dotted.split(".")
    if parts[0] != "memprof":
        return None
    return parts[1] if len(parts) > 1 else ""


def room_of_file(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return "" if rel.parts == ("__init__.py",) else rel.parts[0].removesuffix(".py")


def imported_modules(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module) of every import in ``source``, at any depth (functions, ``if``
    blocks, ``TYPE_CHECKING``). ``from memprof import measure`` yields ``memprof.measure``;
    relative imports are resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "memprof":
                # `from memprof import X`: X is a room when it is a module or package of memprof
                for alias in node.names:
                    is_room = (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()
                    yield node.lineno, f"memprof.{alias.name}" if is_room else "memprof"
            else:
                yield node.lineno, base


def room_arrows() -> dict[tuple[str, str], list[str]]:
    """(from room, to room) -> where each such import is (``path:line``), rooms distinct."""
    arrows: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        is_package = path.name == "__init__.py"
        module = ".".join(rel.with_suffix("").parts[:-1] if is_package else rel.with_suffix("").parts)
        here = room_of_file(path)
        for line, target in imported_modules(path.read_text(encoding="utf-8"), module, is_package):
            there = room_of_module(target)
            if there is None or there == here or "" in (here, there):
                continue
            arrows.setdefault((here, there), []).append(f"{rel}:{line}")
    return arrows


def room_cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected groups of more than one room (Tarjan's algorithm)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


@pytest.fixture(scope="module")
def arrows() -> dict[tuple[str, str], list[str]]:
    return room_arrows()


@pytest.mark.parametrize("arrow", sorted(FORBIDDEN), ids=lambda a: f"{a[0]}->{a[1]}")
def test_no_import_runs_back_up_a_floor(arrows: dict[tuple[str, str], list[str]], arrow: tuple[str, str]) -> None:
    assert arrow not in arrows, f"memprof.{arrow[0]} imports memprof.{arrow[1]} at {', '.join(arrows[arrow])}"


def test_no_two_rooms_import_each_other(arrows: dict[tuple[str, str], list[str]]) -> None:
    cycles = room_cycles(set(arrows))
    where = {
        " <-> ".join(group): [f"{a}->{b}: {arrows[(a, b)][0]}" for a in group for b in group if (a, b) in arrows]
        for group in cycles
    }
    assert not cycles, f"import circles between rooms: {where}"


def test_the_parser_sees_imports_inside_functions_and_relative_ones() -> None:
    source = (
        "import os\n"
        "from memprof import categories, __version__\n"
        "def f():\n"
        "    from memprof.cli.tables import print_rank_table\n"
        "    if True:\n"
        "        import memprof.report\n"
        "from . import gather\n"
        "from ..run.files import load_run\n"
    )
    pairs = sorted(imported_modules(source, "memprof.measure.profiler", is_package=False))
    assert pairs == [(1, "os"), (2, "memprof"), (2, "memprof.categories"), (4, "memprof.cli.tables"),
                     (6, "memprof.report"), (7, "memprof.measure"), (8, "memprof.run.files")]
    assert [room_of_module(m) for _, m in pairs] == [None, "", "categories", "cli", "report", "measure", "run"]


def test_the_cycle_finder_finds_a_circle() -> None:
    assert room_cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert room_cycles({("a", "b"), ("b", "c")}) == []
