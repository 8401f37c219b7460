"""`memprof report`: writes one file; bad input is one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from memprof.cli import main as memprof_main
from memprof.report import write_report
from memprof.report.render import plotly_js
from memprof.run.files import load_run

FIX = Path(__file__).parent / "fixtures" / "report"


def _bad(tmp_path: Path, capsys, argv: list[str]) -> str:
    out = tmp_path / "out" / "r.html"
    rc = memprof_main(["report", *argv, "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("out/.r.html.*"))  # nothing half-written
    return err


def test_missing_file(tmp_path, capsys):
    err = _bad(tmp_path, capsys, [str(tmp_path / "nope.json")])
    assert "nope.json does not exist" in err


def test_truncated_json(tmp_path, capsys):
    text = (FIX / "one_run.json").read_text()
    bad = tmp_path / "memprof.json"
    bad.write_text(text[: len(text) // 2])
    assert "not valid JSON" in _bad(tmp_path, capsys, [str(bad)])


def test_newer_schema_version(tmp_path, capsys):
    doc = json.loads((FIX / "one_run.json").read_text())
    doc["schema_version"] = 99
    p = tmp_path / "memprof.json"
    p.write_text(json.dumps(doc))
    err = _bad(tmp_path, capsys, [str(p)])
    assert "schema_version 99" in err and "upgrade memprof" in err


def test_corrupted_field_is_named(tmp_path, capsys):
    doc = json.loads((FIX / "one_run.json").read_text())
    doc["ranks"][1]["steps"][4]["phases"]["step"]["end"]["device"]["grads"] = "many"
    p = tmp_path / "memprof.json"
    p.write_text(json.dumps(doc))
    err = _bad(tmp_path, capsys, [str(p)])
    assert f"{p}: ranks.1.steps.4.phases.step.end.device.grads" in err


def test_corrupted_rank_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = (FIX / "missing_rank" / "rank0.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]  # a torn line in the middle is corruption, not a dying rank
    (run / "rank0.jsonl").write_text("\n".join(lines) + "\n")
    assert "rank0.jsonl:2 is not valid JSON" in _bad(tmp_path, capsys, [str(run)])


def test_missing_ranks_still_report_with_warning(tmp_path, capsys):
    out = tmp_path / "gap.html"
    assert memprof_main(["report", str(FIX / "missing_rank"), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "lacks ranks [1]" in captured.err
    assert 'data-missing="1"' in out.read_text()


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = memprof_main(["report", str(FIX / "one_run.json"), "-o", str(blocker / "r.html")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot write the report" in err and len(err.splitlines()) == 1


def test_subprocess_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memprof", "report", str(tmp_path / "absent"), "-o",
                           str(tmp_path / "r.html")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "absent does not exist" in proc.stderr


def test_one_file_with_plotly_embedded_once(tmp_path):
    out = write_report([load_run(FIX / "one_run.json")], tmp_path / "r.html")
    html = out.read_text()
    bundle = str(plotly_js())
    assert html.count(bundle[:2000]) == 1  # one copy of plotly.js, inline
    assert "cdn.plot.ly" not in html.replace(bundle, "") and "<script src" not in html
    umask = os.umask(0)
    os.umask(umask)
    # permissions like any file the user writes (the atomic write's temp file alone would be 0600)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
