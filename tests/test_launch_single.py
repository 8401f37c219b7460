"""Plain `python launch/train.py` (no launcher: a world of one), and the simulated memory budget
running out. Two launches of one process each, side by side (tests/launch_helpers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import side_by_side

from memprof.run.files import read_rank_lines

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
# A bare environment: no launcher variables may leak in from whoever runs pytest.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_WORLD_SIZE", "CROSS_SIZE", "LOCAL_SIZE")
ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}, "DS_ACCELERATOR": "cpu"}


def _train(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


RUNS = {
    "zero3_bf16": ("--deepspeed_config", "configs/stage3_adamw_bf16.json", "--steps", "2", "--seq-len", "32"),
    # 64 KiB: less than gpt2-tiny's 149,248 fp32 parameters (583 KiB) alone
    "over_budget": ("--deepspeed_config", "configs/stage0_sgd.json", "--steps", "2", "--seq-len", "32", "--memory-budget", "64KiB"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("single")
    done = side_by_side({name: (lambda name=name, argv=argv: _train(*argv, "--out", str(root / name))) for name, argv in RUNS.items()})
    return {name: (root / name, done[name]) for name in RUNS}


def _run(runs: dict[str, tuple[Path, subprocess.CompletedProcess]], name: str) -> tuple[Path, subprocess.CompletedProcess]:
    out, result = runs[name]
    if isinstance(result, BaseException):
        raise result
    return out, result


def test_plain_python_is_a_world_of_one_zero3_bf16(runs) -> None:
    out, result = _run(runs, "zero3_bf16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((out / "memprof.json").read_text())
    run = doc["run"]
    assert (run["world_size"], run["nodes"], run["zero_stage"], run["precision"]) == (1, 1, 3, "bf16")
    assert run["model"] == "gpt2-tiny"  # the default preset
    assert [r["rank"] for r in doc["ranks"]] == [0] and doc["ranks"][0]["complete"] is True
    assert [s["step"] for s in doc["ranks"][0]["steps"]] == [0, 1]
    assert f"memprof: run files in {out.resolve()}" in result.stdout


def test_memory_budget_exceeded_is_recorded_and_exits_3(runs) -> None:
    out, result = _run(runs, "over_budget")
    budget = 64 * 1024  # the run's --memory-budget 64KiB
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    oom_lines = [l for l in result.stderr.splitlines() if l.startswith("train.py: rank 0: out of memory: ")]
    assert len(oom_lines) == 1 and "Traceback" not in result.stderr
    records = read_rank_lines(out / "rank0.jsonl")
    ooms = [r for r in records if r["type"] == "oom"]
    assert len(ooms) == 1 and ooms[0]["budget_bytes"] == budget and ooms[0]["total_bytes"] > budget
    # the parameters alone are over budget, so the first allocation of step 0 (its batch) fails
    assert (ooms[0]["step"], ooms[0]["phase"]) == (0, "forward")
    assert ooms[0]["breakdown"]["device"]["params"] >= 149_248 * 4
    assert not (out / "memprof.json").exists()
