"""The one end of a run (memprof.end_of_run.finish_run) over a stand-in profiler, and the offload
devices an integration records, read by memprof's one DeepSpeed-config reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memprof.end_of_run import finish_run
from memprof.integrations.observed_run import offload_devices
from memprof.models import PRESETS
from memprof.run.files import REPORT_FILE_NAME, RUN_FILE_NAME, assemble_run


class _Profiler:
    """What finish_run uses of a MemoryProfiler: run, rank, out_dir and finish(estimate)."""

    def __init__(self, out_dir: Path, rank: int, run: dict[str, Any]) -> None:
        self.out_dir, self.rank, self.run = out_dir, rank, run
        self.estimates: list[Any] = []

    def finish(self, estimate: dict[str, Any] | None = None) -> dict[str, Any] | None:
        self.estimates.append(estimate)
        if self.rank != 0:
            return None
        return assemble_run(self.run, {0: [{"type": "header", "rank": 0, "run": self.run}]}, estimate)


def _run() -> dict[str, Any]:
    return {"model": "gpt2-tiny", "model_config": dict(PRESETS["gpt2-tiny"]), "world_size": 1, "zero_stage": 0,
            "optimizer": "adamw", "precision": "fp32", "micro_batch": 1, "seq_len": 16, "device_type": "cpu"}


def test_rank0_gets_the_estimate_the_table_the_report_and_the_folder_line(tmp_path: Path, capsys) -> None:
    profiler = _Profiler(tmp_path, 0, _run())
    doc = finish_run(profiler, prog="memprof", owns_process_group=False)
    assert doc is not None and doc["estimate"] is not None and profiler.estimates == [doc["estimate"]]
    out = capsys.readouterr().out
    assert "memprof: peak memory per rank (cpu run" in out
    assert f"memprof: report {tmp_path / REPORT_FILE_NAME}" in out and (tmp_path / REPORT_FILE_NAME).is_file()
    assert out.rstrip().endswith(f"memprof: run files in {tmp_path.resolve()} ({RUN_FILE_NAME}, rank<R>.jsonl)")


def test_other_ranks_print_nothing_and_a_failed_estimate_is_one_warning_on_rank0(tmp_path: Path, capsys) -> None:
    assert finish_run(_Profiler(tmp_path, 1, {"model": "x"}), prog="train.py", owns_process_group=True) is None
    assert capsys.readouterr() == ("", "")
    doc = finish_run(_Profiler(tmp_path, 0, {"model": "x"}), prog="train.py", owns_process_group=True,
                     write_report=False, print_table=False)
    assert doc is not None and doc["estimate"] is None
    out, err = capsys.readouterr()
    assert err.startswith("train.py: warning: no estimate recorded (MemprofError: ") and len(err.splitlines()) == 1
    assert out.startswith("memprof: run files in") and not (tmp_path / REPORT_FILE_NAME).exists()


@pytest.mark.parametrize("zero, expected", [
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}, ("cpu", "cpu")),
    ({"stage": 2, "offload_optimizer": {"device": "CPU"}}, ("cpu", "none")),
    # DeepSpeed reads offload_param only at stage 3 (stage3.py): it trains with parameters on the device
    ({"stage": 2, "offload_param": {"device": "cpu"}}, ("none", "none")),
    # the deprecated boolean (DeepSpeedZeroConfig cpu_offload) is an optimizer offload to the CPU
    ({"stage": 2, "cpu_offload": True}, ("cpu", "none")),
    ({"stage": 1}, ("none", "none")),
    # a config memprof does not model: the run is still profiled, its offloads unknown
    ({"stage": 3, "offload_param": {"device": "nvme"}}, (None, None)),
])
def test_offload_devices_come_from_the_one_reader(zero: dict[str, Any], expected: tuple[Any, Any]) -> None:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": zero}
    found = offload_devices(config, world_size=2)
    assert (found["offload_optimizer"], found["offload_param"]) == expected
