"""The command-line plumbing every memprof command shares (memprof/argparsing.py, memprof/cli/__init__.py):
bad flags are one line and exit 2 for the `memprof` subcommands and launch/train.py alike, one
positive-integer flag type, and the top-level usage built from the subcommand modules."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from memprof import cli
from memprof.argparsing import MemprofArgumentParser, positive_int, positive_size
from memprof.errors import MemprofError
from memprof.units import parse_positive_int

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
DEMO = REPO / "configs" / "demo.json"


@pytest.mark.parametrize("text,value", [("8", 8), ("1e3", 1000), ("1_000", 1000), ("64.0", 64)])
def test_positive_int_accepts_whole_numbers(text, value):
    assert parse_positive_int(text, "--gpus") == value


@pytest.mark.parametrize("text,needle", [("0", "positive whole number"), ("-3", "positive whole number"),
                                         ("2.5", "positive whole number"), ("inf", "positive whole number"),
                                         ("nan", "positive whole number"), ("eight", "is not a number")])
def test_positive_int_rejects_with_the_flag_named(text, needle):
    with pytest.raises(MemprofError) as e:
        parse_positive_int(text, "--micro-batch")
    assert str(e.value).startswith(f"--micro-batch {text!r}") and needle in str(e.value)


def test_parser_errors_are_memprof_errors_naming_the_help():
    p = MemprofArgumentParser(prog="memprof thing")
    p.add_argument("--n", type=positive_int("--n"))
    p.add_argument("--size", type=positive_size("--size"))
    assert p.parse_args(["--n", "4", "--size", "2GiB"]).size == 2 * 2**30
    with pytest.raises(MemprofError, match=r"unrecognized arguments: --m 1: see 'memprof thing --help'"):
        p.parse_args(["--m", "1"])
    with pytest.raises(MemprofError, match=r"^--n '0' must be a positive whole number"):
        p.parse_args(["--n", "0"])  # the type's own message, not argparse's "invalid value"
    with pytest.raises(MemprofError, match=r"^--size 'big' is not a size"):
        p.parse_args(["--size", "big"])
    with pytest.raises(MemprofError, match=r"expected one argument"):
        p.parse_args(["--n"])


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=REPO)


BAD = {
    # every command's unknown flag, missing value and bad number: one line, exit 2
    "estimate unknown flag": (["-m", "memprof", "estimate", "--model", "gpt2", "--bogus"],
                              "memprof estimate: error: unrecognized arguments: --bogus"),
    "estimate bad nodes": (["-m", "memprof", "estimate", "--model", "gpt2", "--nodes", "two"], "--nodes 'two' is not a number"),
    "plan bad gpus": (["-m", "memprof", "plan", "--model", "gpt2", "--gpus", "0", "--gpu-memory", "80GiB"],
                      "--gpus '0' must be a positive whole number"),
    "plan missing value": (["-m", "memprof", "plan", "--model", "gpt2", "--gpus"], "expected one argument"),
    "compare no run": (["-m", "memprof", "compare"], "memprof compare: error: the following arguments are required: run"),
    "report no run": (["-m", "memprof", "report"], "memprof report: error: the following arguments are required: RUN"),
    "no command": (["-m", "memprof"], "memprof: error: no command"),
    "unknown command": (["-m", "memprof", "estmate"], "memprof: error: unknown command 'estmate'"),
    "train.py bad steps": ([str(TRAIN), "--deepspeed_config", str(DEMO), "--out", "{out}", "--steps", "0"],
                           "train.py: error: --steps '0' must be a positive whole number"),
    "train.py bad seq-len": ([str(TRAIN), "--deepspeed_config", str(DEMO), "--out", "{out}", "--seq-len", "1.5"],
                             "train.py: error: --seq-len '1.5' must be a positive whole number"),
    "train.py missing out": ([str(TRAIN), "--deepspeed_config", str(DEMO)],
                             "train.py: error: the following arguments are required: --out"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_every_command_reports_bad_flags_in_one_line(name, tmp_path):
    argv, needle = BAD[name]
    out = _run([a.replace("{out}", str(tmp_path / "out")) for a in argv])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr and "usage:" not in out.stderr, out.stderr
    assert needle in lines[0], lines[0]
    assert out.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing written


def test_top_level_usage_comes_from_the_subcommand_modules(monkeypatch, capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, module in cli.SUBCOMMANDS.items():
        summary = importlib.import_module(module).SUMMARY
        assert any(line.split() == [name, *summary.split()] for line in text.splitlines()), (name, text)
    # the usage is built from the modules, not kept by hand: a changed summary shows at once
    monkeypatch.setattr(importlib.import_module(cli.SUBCOMMANDS["plan"]), "SUMMARY", "a summary changed in a test")
    assert cli.main(["--help"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["plan", "a", "summary", "changed", "in", "a", "test"] in lines


def test_each_subcommand_help_starts_with_its_summary(capsys):
    for name, module in cli.SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        with pytest.raises(SystemExit) as e:
            mod.build_parser().parse_args(["--help"])
        assert e.value.code == 0
        assert mod.SUMMARY in " ".join(capsys.readouterr().out.split()), name
