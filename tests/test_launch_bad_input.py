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
from launch_helpers import free_port, run_group

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
            ["--deepspeed_config",
             str(_ds_json(tmp_path, "momlist.json", stage=0, optimizer={"type": "RMSprop", "params": {"momentum": [1]}})),
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
        [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN), "--deepspeed_config", str(bad),
         "--out", str(tmp_path / "out")],
        timeout=300, cwd=REPO, env=env,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith("train.py: error: ")]
    assert errors and all("ZeRO stages are 0, 1, 2 or 3" in l for l in errors)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- a precision DeepSpeed's accelerator lacks: one line, exit 2, before training ----------------


def _fp16_config(tmp_path: Path) -> Path:
    return _ds_json(tmp_path, "fp16.json", fp16={"enabled": True})


def test_fp16_where_the_cpu_lacks_it_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The real path, on a CPU whose DeepSpeed accelerator has no fp16 (skipped where it has it)."""
    from precision_support import unsupported_reason

    if unsupported_reason("fp16") is None:
        pytest.skip("DeepSpeed's CPU accelerator supports fp16 on this machine: nothing to refuse")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(TRAIN), "--deepspeed_config", str(_fp16_config(tmp_path)),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: fp16 is not supported"), result.stderr[-2000:]
    assert "use bf16 or fp32 on this CPU" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_missing_precision_support_is_refused_before_the_out_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """Simulated in-process (the accelerator's answer patched), so it runs on any machine."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    from memprof.train.cli import main
    from memprof.train.config import check_precision_supported, parse_args

    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)
    out = tmp_path / "out"
    assert main(["--deepspeed_config", str(_fp16_config(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16 is not supported by DeepSpeed's cpu accelerator" in err[0], err
    assert "use bf16 or fp32 on this CPU" in err[0]
    assert not out.exists()
    # where the accelerator has fp16, the same config passes validation
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: True)
    cfg = parse_args(["--deepspeed_config", str(_fp16_config(tmp_path)), "--out", str(out)], environ={},
                     check_precision=check_precision_supported)
    assert cfg.deepspeed.precision == "fp16"


class _FakeAccelerator:
    def __init__(self, device: str, fp16: bool, bf16: bool):
        self.device, self.fp16, self.bf16 = device, fp16, bf16

    def device_name(self) -> str:
        return self.device

    def is_fp16_supported(self) -> bool:
        return self.fp16

    def is_bf16_supported(self) -> bool:
        return self.bf16


def test_precision_check_names_the_precision_and_the_fix() -> None:
    from memprof.errors import MemprofError
    from memprof.train.config import check_precision_supported

    no_fp16_cpu = _FakeAccelerator("cpu", fp16=False, bf16=True)
    for ok in ("fp32", "bf16"):
        check_precision_supported(ok, no_fp16_cpu)
    with pytest.raises(MemprofError, match="fp16 is not supported .* use bf16 or fp32 on this CPU"):
        check_precision_supported("fp16", no_fp16_cpu)
    old_gpu = _FakeAccelerator("cuda", fp16=True, bf16=False)
    check_precision_supported("fp16", old_gpu)
    with pytest.raises(MemprofError, match="bf16 is not supported by DeepSpeed's cuda accelerator.*use fp16 or fp32 on this device"):
        check_precision_supported("bf16", old_gpu)
