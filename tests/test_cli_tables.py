"""Every terminal table (estimate, plan, compare, the launcher's per-rank table) at 80 and 120
columns: no line wider than the console, no cell cut ("…"), every name and number whole."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from memprof.categories import CATEGORIES, PHASES
from memprof.display.rank_table import print_rank_table
from memprof.display.tables import Column, fitted_tables
from memprof.units import format_bytes

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "fixtures" / "report" / "one_run.json"
WIDTHS = (80, 120)


def memprof(width: int, *args: str) -> str:
    env = {**os.environ, "COLUMNS": str(width)}
    out = subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_fits(text: str, width: int) -> None:
    assert "…" not in text, text
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, "\n".join(too_wide)


def assert_whole(text: str, cells: list[str]) -> None:
    """Each cell appears whole on some line, delimited by spaces or the table's rules."""
    padded = [f" {line.replace('│', ' ').replace('┃', ' ')} " for line in text.splitlines()]
    missing = [c for c in cells if not any(f" {c} " in line for line in padded)]
    assert not missing, (missing, text)


def table_part(text: str, start: str, end: str) -> str:
    """The lines from the first containing ``start`` up to the first after it containing ``end``."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if start in line)
    j = next(k for k in range(i + 1, len(lines)) if end in lines[k])
    return "\n".join(lines[i:j + 1])


ESTIMATE = ["--model", "gpt2", "--world-size", "4", "--zero-stage", "3", "--offload-optimizer", "cpu",
            "--micro-batch", "4", "--seq-len", "1024", "--gpu-memory", "80GiB"]


@pytest.mark.parametrize("width", WIDTHS)
def test_estimate_table(width):
    text = memprof(width, "estimate", *ESTIMATE)
    js = json.loads(memprof(width, "estimate", *ESTIMATE, "--json"))
    tables = text.split("device at rest (max over ranks)")[0]  # the prose after the tables wraps freely
    assert_fits(tables, width)
    for r in js["ranks"]:
        cells = list(CATEGORIES) + [format_bytes(r["device"][c]) for c in CATEGORIES]
        cells += [format_bytes(r["host"][c]) for c in CATEGORIES]
        cells += [format_bytes(r["phases"][ph]["peak"]["device"][c]) for ph in PHASES for c in CATEGORIES]
        cells += [format_bytes(r["phases"][ph]["peak_total"]) for ph in PHASES]
        assert_whole(table_part(tables, f"rank {r['rank']}", "total"), cells)
    if width >= 120:  # the room is used: one boxed table per rank, every header on one line
        assert "┃ category        ┃ device at rest ┃ host at rest ┃ forward peak ┃ backward peak ┃ step peak ┃" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_plan_table(width):
    args = ["plan", "--model", "gpt2-xl", "--gpus", "8", "--gpu-memory", "16GiB", "--micro-batch", "4",
            "--max-gpus", "64", "--activation-checkpointing"]
    text = memprof(width, *args)
    js = json.loads(memprof(width, *args, "--json"))
    assert_fits(text, width)
    for r in js["rows"]:
        off = ", ".join(x for x in (f"opt->{r['offload_optimizer']}" if r["offload_optimizer"] != "none" else "",
                                    f"params->{r['offload_param']}" if r["offload_param"] != "none" else "") if x) or "-"
        row = [str(r["zero_stage"]), off, format_bytes(r["peak_device_bytes"]), format_bytes(r["host_bytes_per_node"]),
               "yes" if r["fits"] else "no",
               str(r["largest_micro_batch"] or "-"), str(r["fewest_gpus"] or "-")]
        # the row's cells in order on one line: the plan table is never split at these widths
        assert any(_in_order(line, row) for line in text.splitlines()), (row, text)


def _in_order(line: str, cells: list[str]) -> bool:
    at = 0
    for c in cells:
        k = line.find(c, at)
        if k < 0:
            return False
        at = k + len(c)
    return True


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_table(width):
    text = memprof(width, "compare", str(RUN))
    js = json.loads(memprof(width, "compare", str(RUN), "--json"))
    assert_fits(text, width)
    shown = [r for r in js["rows"] if not (r["what"] == "rest" and r["measured"] == 0 and r["estimated"] == 0)]
    assert shown
    for r in shown:
        assert_whole(text, [r["name"], format_bytes(r["measured"]), format_bytes(r["estimated"])])
    assert_whole(text, ["optimizer_state", "master_params", "comm_buffers"])


def _rank_doc(n_ranks: int) -> dict:
    doc = json.loads(RUN.read_text())
    template = doc["ranks"][0]
    doc["ranks"] = [{**template, "rank": r} for r in range(n_ranks)]
    doc["run"]["world_size"] = n_ranks
    return doc


@pytest.mark.parametrize("n_ranks", [2, 8])
@pytest.mark.parametrize("width", WIDTHS)
def test_launcher_rank_table(width, n_ranks):
    doc = _rank_doc(n_ranks)
    buf = io.StringIO()
    print_rank_table(doc, Console(file=buf, width=width))
    text = buf.getvalue()
    assert_fits(text, width)
    step = doc["ranks"][0]["steps"]
    worst = max(((s["step"], ph, rec) for s in step for ph, rec in s["phases"].items()), key=lambda t: t[2]["peak_total"])
    device = worst[2]["peak"]["device"]
    cells = [*CATEGORIES, format_bytes(worst[2]["peak_total"]), *(format_bytes(device[c]) for c in CATEGORIES),
             f"step {worst[0]} {worst[1]}", format_bytes(doc["ranks"][0]["peak_host_rss_bytes"]), "complete"]
    assert_whole(text, cells)
    # every rank is shown: a column "rank R" when few, else a row starting with R
    for r in range(n_ranks):
        assert f"rank {r}" in text or any(line.split()[:1] == [str(r)] for line in text.splitlines()), r


def test_any_width_cuts_nothing():
    """The layout rules on a table wider than any of the widths: every part fits, nothing is cut,
    every cell of every row appears in some part with its key."""
    columns = [Column("name")] + [Column(f"column number {i}", numeric=True) for i in range(9)]
    rows = [[f"row_name_{k}"] + [f"{k * 1000 + i:,} MiB" for i in range(9)] for k in range(5)]
    for width in (40, 60, 80, 100, 120, 160, 240):
        buf = io.StringIO()
        console = Console(file=buf, width=width)
        for t in fitted_tables(columns, rows, width, title="wide"):
            console.print(t)
        text = buf.getvalue()
        assert_fits(text, width)
        for row in rows:
            for cell in row[1:]:
                assert any(row[0] in line and cell in line for line in text.splitlines()), (width, cell)
