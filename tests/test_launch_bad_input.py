"""Bad input to launch/train.py: one line on stderr, exit code 2, no traceback, nothing trained.

Each case runs the real script as a subprocess; validation happens before torch is imported, so
each takes well under a second. One case also goes through the deepspeed launcher (~5-15 s) to
check that the launcher passes the ranks' failure on as a non-zero exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import run_group

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
DEMO = REPO / "configs" / "demo.json"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def _ds_json(tmp_path: Path, name: str, **overrides) -> Path:
    """The demo config with ``overrides`` applied, written to its own file ``name``."""
    config = json.loads(DEMO.read_text())
    for key, value in overrides.items():
        if key == "stage":
            config["zero_optimization"]["stage"] = value
        else:
            config[key] = value
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv after train.py, a fragment the error line must contain)."""
    out = str(tmp_path / "out")
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"train_micro_batch_size_per_gpu": 1,')
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    return {
        "unknown preset": (["--deepspeed_config", str(DEMO), "--model", "gpt5", "--out", out], "unknown model preset 'gpt5'"),
        "missing json": (["--deepspeed_config", str(tmp_path / "nope.json"), "--out", out], "does not exist"),
        "malformed json": (["--deepspeed_config", str(malformed), "--out", out], "is not valid JSON"),
        "stage 4": (["--deepspeed_config", str(_ds_json(tmp_path, "stage4.json", stage=4)), "--out", out], "ZeRO stages are 0, 1, 2 or 3"),
        "micro-batch 0": (
            ["--deepspeed_config", str(_ds_json(tmp_path, "micro0.json", train_micro_batch_size_per_gpu=0)), "--out", out],
            "train_micro_batch_size_per_gpu is 0",
        ),
        "unknown optimizer": (
            ["--deepspeed_config", str(_ds_json(tmp_path, "shampoo.json", optimizer={"type": "Shampoo"})), "--out", out],
            "unknown optimizer type 'Shampoo'",
        ),
        # root ignores permission bits, so make the folder impossible: its parent is a file
        "unwritable out": (["--deepspeed_config", str(DEMO), "--out", str(a_file / "run")], "is not a writable folder"),
        "bad budget": (["--deepspeed_config", str(DEMO), "--out", out, "--memory-budget", "lots"], "is not a size"),
        "unknown flag": (["--deepspeed_config", str(DEMO), "--out", out, "--stpes", "3"], "unrecognized arguments"),
        "bf16 enabled as a string": (
            ["--deepspeed_config", str(_ds_json(tmp_path, "bf16str.json", bf16={"enabled": "false"})), "--out", out],
            "bf16.enabled is 'false': use true or false",
        ),
        "momentum not a number": (
            ["--deepspeed_config", str(_ds_json(tmp_path, "mom.json", stage=0, optimizer={"type": "SGD", "params": {"momentum": "abc"}})),
             "--out", out],
            "optimizer.params.momentum is 'abc': it must be a number",
        ),
        "momentum a list": (
            ["--deepspeed_config", str(_ds_json(tmp_path, "momlist.json", stage=0, optimizer={"type": "RMSprop", "params": {"momentum": [1]}})),
             "--out", out],
            "optimizer.params.momentum is [1]: it must be a number",
        ),
        "bad n_positions": (
            ["--deepspeed_config", str(DEMO), "--model-config", str(_model_json(tmp_path, n_positions="lots")), "--out", out],
            "positive integer 'n_positions' (got 'lots')",
        ),
    }


def _model_json(tmp_path: Path, **overrides) -> Path:
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 256, **overrides}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config))
    return path


def test_each_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = _cases(tmp_path)
    for name, (argv, fragment) in cases.items():
        result = subprocess.run([sys.executable, str(TRAIN), *argv], capture_output=True, text=True, timeout=60, cwd=REPO)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), (name, result.stderr)
        assert fragment in lines[0], (name, lines[0])
        assert result.stdout == "", (name, result.stdout)
        # nothing half-written: validation runs before the --out folder is even created
        assert not (tmp_path / "out").exists(), name
        assert not list(tmp_path.rglob("rank*.jsonl")) and not list(tmp_path.rglob("memprof.json")), name


def test_deepspeed_launcher_exits_non_zero_when_ranks_reject_input(tmp_path: Path) -> None:
    if not DEEPSPEED.exists():
        pytest.fail(f"{DEEPSPEED} is missing: install deepspeed in this environment")
    bad = _ds_json(tmp_path, "stage4.json", stage=4)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = run_group(
        [str(DEEPSPEED), "--num_gpus", "2", str(TRAIN), "--deepspeed_config", str(bad), "--out", str(tmp_path / "out")],
        timeout=300, cwd=REPO, env=env,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith("train.py: error: ")]
    assert errors and all("ZeRO stages are 0, 1, 2 or 3" in l for l in errors)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
