"""README's accelerate example, extracted and run as written on 2 CPU ranks under ``deepspeed`` and
under ``accelerate launch``.

The code block after ``<!-- accelerate-example -->`` in README.md is written to a file and launched
from an empty folder (DS_ACCELERATOR=cpu) with ``deepspeed --num_gpus 2`` and with the README's
``accelerate launch --use_deepspeed --num_processes 2``; each run's files are then checked as the
Trainer's are: micro-steps and their place in the accumulation, the engine's resolved config,
resident states derived from the layer shapes and ZeRO-2's partition rules, the recorded estimate
against the measurement, and the report. The selected launchers' runs go side by side
(tests/launch_helpers.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import (
    ACCELERATE,
    DEEPSPEED,
    REPO,
    free_port,
    leaked_shm_segments,
    memprof_in_process,
    run_group,
    selected_params,
    side_by_side,
)
from test_integration_trainer import PEAK_TOLERANCE, _all_values
from test_ownership_deepspeed import gpt2_param_numels, zero12_padded

from memprof.categories import PHASES

N = 2
FP32 = 4
# the example's own settings, read off its text below (and asserted to be there)
EXAMPLE_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 256}
SAMPLES, MICRO_BATCH, GAS, SEQ = 16, 2, 2, 32
# the README's accelerate command line. --use_deepspeed takes accelerate's deepspeed_launcher (torchrun,
# one process per rank); without it a machine with no GPU gets simple_launcher: one process, and
# DeepSpeed's init_distributed then looks for MPI (accelerate/commands/launch.py `launch_command`)
ACCELERATE_ARGS = ("--use_deepspeed", "--num_processes", str(N))
README_ACCELERATE_COMMAND = f"accelerate launch {' '.join(ACCELERATE_ARGS)} example.py"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- accelerate-example -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert m, "README.md lost its accelerate example block"
    return m.group(1)


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def launch_command(launcher: str, port: int) -> list[str]:
    if launcher == "deepspeed":
        return [str(DEEPSPEED), "--num_gpus", str(N), "--master_port", str(port), "example.py"]
    return [str(ACCELERATE), "launch", *ACCELERATE_ARGS, "--main_process_port", str(port), "example.py"]


LAUNCHERS = ("deepspeed", "accelerate")


def _launch(launcher: str, work: Path) -> Path:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 14
    (work / "example.py").write_text(code)
    port = free_port()
    # HF_HOME: an empty folder, so that no default_config.yaml of this machine's user changes the launch
    env = {**_env(), "HF_HOME": str(work / "hf_home")}
    proc = run_group(launch_command(launcher, port), cwd=work, env=env, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # under torchrun DeepSpeed makes no segment (LOCAL_SIZE unset: shm_interface.cpp), under deepspeed memprof unlinks it
    assert leaked_shm_segments(port) == []
    return work / "runs" / "accelerate"


@pytest.fixture(scope="module")
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | BaseException]:
    """The example run under each selected launcher, side by side."""
    work = {name: tmp_path_factory.mktemp(f"accelerate-{name}") for name in selected_params(request, "run_dir")}
    return side_by_side({name: (lambda name=name: _launch(name, work[name])) for name in work})


@pytest.fixture(scope="module", params=LAUNCHERS)
def run_dir(request: pytest.FixtureRequest, launched: dict[str, Path | BaseException]) -> Path:
    out = launched[request.param]
    if isinstance(out, BaseException):
        raise out
    return out


def _doc(out: Path) -> dict[str, Any]:
    return json.loads((out / "memprof.json").read_text())


def test_the_example_says_what_this_test_assumes() -> None:
    code = readme_example()
    for key, value in EXAMPLE_MODEL.items():
        assert f"{key}={value}" in code
    assert f"(0, 512, ({SEQ},)) for _ in range({SAMPLES})" in code and f"batch_size={MICRO_BATCH}" in code
    assert f"Accelerator(gradient_accumulation_steps={GAS}, deepspeed_plugin=DeepSpeedPlugin(zero_stage=2))" in code
    assert README_ACCELERATE_COMMAND in (REPO / "README.md").read_text(), "README.md no longer says how this test launches it"


def test_micro_steps_and_run_metadata(run_dir: Path) -> None:
    doc = _doc(run_dir)
    micro_steps = SAMPLES // (MICRO_BATCH * N)  # the prepared loader shards the samples over the ranks
    assert [r["rank"] for r in doc["ranks"]] == list(range(N)) and doc["missing_ranks"] == []
    for rank in doc["ranks"]:
        steps = rank["steps"]
        assert rank["complete"] and [s["step"] for s in steps] == list(range(micro_steps))
        assert [s["optimizer_step"] for s in steps] == [i // GAS for i in range(micro_steps)]
        assert [s["micro_step"] for s in steps] == [i % GAS for i in range(micro_steps)]
        assert [s["boundary"] for s in steps] == [i % GAS == GAS - 1 for i in range(micro_steps)]
        for s in steps:
            assert set(s["phases"]) == (set(PHASES) if s["boundary"] else {"forward", "backward"})
    run = doc["run"]
    assert run["integration"] == "accelerate" and run["zero_stage"] == 2 and run["world_size"] == N
    assert (run["micro_batch"], run["gradient_accumulation_steps"], run["seq_len"]) == (MICRO_BATCH, GAS, SEQ)
    assert run["optimizer"] == "adamw" and run["torch_adam"] is True  # torch.optim.AdamW, a client optimizer
    assert "auto" not in _all_values(run["deepspeed_config"])
    assert run["deepspeed_config"]["train_micro_batch_size_per_gpu"] == MICRO_BATCH
    assert run["accelerate"]["gradient_accumulation_steps"] == GAS and run["accelerate"]["num_processes"] == N
    assert run["accelerate"]["distributed_type"] == "DistributedType.DEEPSPEED"
    assert run["accelerate"]["prepared_model_class"] == "DeepSpeedEngine"
    # accelerate sets steps_per_print to float("inf"): strict JSON has no Infinity (browsers parse the run)
    assert run["deepspeed_config"]["steps_per_print"] == "inf"
    assert "Infinity" not in (run_dir / "memprof.json").read_text()
    assert (run_dir / "report.html").stat().st_size > 10_000


def test_resident_states_match_the_partition_rules(run_dir: Path) -> None:
    numels = gpt2_param_numels(EXAMPLE_MODEL)
    Pp = zero12_padded(sum(numels))
    part = Pp // N
    for rank in _doc(run_dir)["ranks"]:
        rest = rank["steps"][-1]["phases"]["step"]["end"]["device"]
        assert rest["params"] == FP32 * Pp
        assert rest["master_params"] == FP32 * part
        # torch AdamW over ZeRO's one flat fp32 partition: two moments and one 4-byte step tensor
        assert rest["optimizer_state"] == 2 * FP32 * part + 4
        assert rest["grads"] == 0


def test_recorded_estimate_matches_the_measurement(run_dir: Path) -> None:
    proc = memprof_in_process("compare", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    resident = [r for r in rows if r["what"] == "rest" and r["tolerance"] is not None]
    assert resident and all(r["ok"] for r in resident), [r for r in resident if not r["ok"]]
    off = {(r["rank"], r["name"]): f"{r['error']:+.2%}" for r in rows if r["what"] == "peak" and abs(r["error"]) > PEAK_TOLERANCE}
    assert not off, f"estimated peaks outside {PEAK_TOLERANCE:.0%} of the measurement: {off}"


def test_report_builds(run_dir: Path, tmp_path: Path) -> None:
    proc = memprof_in_process("report", str(run_dir), "-o", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
