"""Terminal tables that fit the console: every memprof table (``estimate``, ``plan``, ``compare`` and
the end-of-run per-rank table, :mod:`memprof.display.rank_table`) is laid out here.

No cell is ever cut: rich, given a table wider than the console, shrinks the widest columns and
ends their text with "…" (``master_pa…``). Instead each column gets a fixed width of at least its
longest cell, and the layout is the first of these that fits the console width:

1. boxed, headers on one line (a wide terminal: 120 columns and more);
2. compact (no vertical rules, no outer edge, two spaces between columns), headers on one line;
3. boxed or compact, whichever needs fewer lines for its headers wrapped at their spaces;
4. compact and split: the key columns (e.g. the category or rank) repeated in each part, the other
   columns spread over as few parts as fit.

Cells may hold rich markup (``[bold]total[/bold]``); widths are measured on the rendered text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class Column:
    header: str
    numeric: bool = False
    """Right-justified (sizes, counts, errors)."""


@dataclass(frozen=True)
class _Style:
    box: box.Box
    show_edge: bool
    padding: tuple[int, int, int, int]  # rich's (top, right, bottom, left)

    def chrome(self, n_columns: int) -> int:
        """Characters a table of ``n_columns`` spends beyond its columns' text: the vertical rules
        (a space in the compact box) and each column's left and right padding (none outside the
        outer columns without an edge: ``pad_edge`` follows ``show_edge``)."""
        _, right, _, left = self.padding
        rules = (n_columns - 1) + (2 if self.show_edge else 0)
        padding = n_columns * (left + right) - (0 if self.show_edge else left + right)
        return rules + padding


BOXED = _Style(box.HEAVY_HEAD, show_edge=True, padding=(0, 1, 0, 1))
COMPACT = _Style(box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))  # two spaces between columns


def _cell_len(cell: str) -> int:
    return max((Text.from_markup(line).cell_len for line in cell.split("\n")), default=0)


def _widths(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> tuple[list[int], list[int]]:
    """(natural, minimal) text width per column: natural holds the header on one line, minimal
    wraps it at its spaces; neither is less than the column's longest cell."""
    natural, minimal = [], []
    for i, col in enumerate(columns):
        cells = max((_cell_len(r[i]) for r in rows), default=0)
        words = max((len(w) for w in col.header.split()), default=0)
        natural.append(max(1, cells, len(col.header)))
        minimal.append(max(1, cells, words))
    return natural, minimal


def _header_lines(header: str, width: int) -> int:
    """Lines a header takes wrapped at its spaces into ``width`` (greedy, as rich wraps)."""
    lines, used = 1, 0
    for word in header.split():
        if used and used + 1 + len(word) > width:
            lines, used = lines + 1, len(word)
        else:
            used += (1 if used else 0) + len(word)
    return lines


def _fit(columns: Sequence[Column], natural: list[int], minimal: list[int], budget: int) -> list[int] | None:
    """Column widths within ``budget`` text characters, or None when even ``minimal`` is too wide.
    Spare characters buy the header row one line less at a time while they suffice (widening
    every header that is as tall as the tallest)."""
    if sum(minimal) > budget:
        return None
    widths, spare = list(minimal), budget - sum(minimal)
    while True:
        lines = [_header_lines(c.header, w) for c, w in zip(columns, widths)]
        tallest = max(lines, default=1)
        if tallest == 1:
            return widths
        grown = list(widths)
        for i, c in enumerate(columns):
            if lines[i] == tallest:
                # the narrowest width that takes this header onto fewer lines (natural always does)
                grown[i] = next(w for w in range(widths[i] + 1, natural[i] + 1) if _header_lines(c.header, w) < tallest)
        cost = sum(grown) - sum(widths)
        if cost > spare:
            return widths
        widths, spare = grown, spare - cost


def _tallest_header(columns: Sequence[Column], widths: Sequence[int]) -> int:
    return max((_header_lines(c.header, w) for c, w in zip(columns, widths)), default=1)


def _table(columns: Sequence[Column], rows: Sequence[Sequence[str]], widths: Sequence[int], style: _Style,
           title: str | None) -> Table:
    t = Table(title=title, box=style.box, show_edge=style.show_edge, pad_edge=style.show_edge, padding=style.padding)
    for col, w in zip(columns, widths):
        # a fixed width no cell exceeds: rich never shrinks it, so nothing is cut; a header wider
        # than it wraps at its spaces
        t.add_column(col.header, justify="right" if col.numeric else "left", width=w, overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


def fitted_tables(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int, title: str | None = None,
                  key_columns: int = 1) -> list[Table]:
    """One table (or, at widths too narrow for all columns, several with the first ``key_columns``
    repeated) that fits ``width`` characters without cutting any cell."""
    rows = [list(r) for r in rows]
    n = len(columns)
    natural, minimal = _widths(columns, rows)
    # headers on one line: boxed, else compact
    for style in (BOXED, COMPACT):
        if sum(natural) + style.chrome(n) <= width:
            return [_table(columns, rows, natural, style, title)]
    # headers wrapped: the style that needs fewer header lines, boxed on a tie
    fitted = [(style, w) for style in (BOXED, COMPACT)
              if (w := _fit(columns, natural, minimal, width - style.chrome(n))) is not None]
    if fitted:
        style, widths = min(fitted, key=lambda sw: _tallest_header(columns, sw[1]))
        return [_table(columns, rows, widths, style, title)]

    # split: the key columns in every part, the others in order over as few parts as fit, as
    # evenly as they allow
    keys = list(range(min(key_columns, n)))
    others = list(range(len(keys), n))

    def pack(limit: int) -> list[list[int]]:
        groups: list[list[int]] = []
        for i in others:
            trial = keys + (groups[-1] if groups else []) + [i]
            if groups and sum(minimal[j] for j in trial) + COMPACT.chrome(len(trial)) <= limit:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups or [[]]

    groups = pack(width)
    for limit in range(sum(minimal[j] for j in keys) + COMPACT.chrome(len(keys) + 1), width):
        if len(balanced := pack(limit)) == len(groups):  # the narrowest limit that needs no more parts
            groups = balanced
            break
    tables = []
    for g, group in enumerate(groups):
        idx = keys + group
        cols = [columns[j] for j in idx]
        part_rows = [[r[j] for j in idx] for r in rows]
        nat, low = [natural[j] for j in idx], [minimal[j] for j in idx]
        # a part too wide even so (a console narrower than its key and one column) keeps its
        # minimal widths: wider than the console, but whole
        widths = _fit(cols, nat, low, width - COMPACT.chrome(len(idx))) or low
        part_title = None if title is None else f"{title} (columns {g + 1}/{len(groups)})"
        tables.append(_table(cols, part_rows, widths, COMPACT, part_title if g == 0 else None))
    return tables


def print_tables(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[str]], title: str | None = None,
                 key_columns: int = 1) -> None:
    for t in fitted_tables(columns, rows, console.width, title, key_columns):
        console.print(t)
