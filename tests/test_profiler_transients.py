"""The profiler names the transients: tensors born and freed inside a phase, between two ownership
walks, are labelled by the code that made them (memprof/measure/regions.py), so `other` stays
<= 1% of the step's peak.

* a plain torch Adam step (in-process, both CPU trackers): foreach Adam's temporary
  (``exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)``, torch/optim/adam.py
  ``_multi_tensor_adam``: one fp32 tensor per parameter) is optimizer_state at the step peak;
* a ZeRO-2 bf16 step on 2 ranks (the launch tests/test_measured_vs_estimated.py also reads): the
  fp32 gradient partition ZeRO flattens and casts inside ``step()`` (stage_1_and_2.py
  ``single_grad_partition = flat_grad_partition.to(fp32)``: partition numel x 4 bytes) is grads.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from launch_helpers import SharedLaunches
from test_measured_vs_estimated import case_run, zero12_partition

from memprof.measure import MemoryProfiler
from memprof.run.files import load_run

OTHER_SHARE = 0.01
IN, HIDDEN, OUT, BATCH = 256, 1024, 256, 8


def _profiled_adam_steps(out: Path, steps: int = 2) -> tuple[dict, int, int]:
    """(run document, parameter elements, parameter tensors) of a small MLP trained with foreach Adam."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, OUT))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    gc.collect()
    prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir=out)
    with prof:
        for i in range(steps):
            x, y = torch.randn(BATCH, IN), torch.randn(BATCH, OUT)
            with prof.step(i) as s:
                with s.phase("forward"):
                    loss = torch.nn.functional.mse_loss(model(x), y)
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                s.loss = loss
    doc = prof.finish()
    assert doc is not None
    params = list(model.parameters())
    return doc, sum(p.numel() for p in params), len(params)


@pytest.mark.parametrize("tracker", ["allocator", "dispatch"])
def test_adam_step_temporaries_are_optimizer_state(tmp_path: Path, tracker: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMPROF_CPU_TRACKER", tracker)
    doc, numel, tensors = _profiled_adam_steps(tmp_path)
    rank = doc["ranks"][0]
    for step in rank["steps"]:
        rec = step["phases"]["step"]
        peak = rec["peak"]["device"]
        assert peak["other"] <= OTHER_SHARE * rec["peak_total"], (step["step"], peak)
        # exp_avg + exp_avg_sq (fp32) + a 4-byte step tensor per parameter, and the foreach
        # sqrt temporary (fp32, one per parameter) alive while the parameters are updated; the
        # allocator hook also sees a few bytes of wrapped Python scalars
        state = 2 * 4 * numel + 4 * tensors
        assert state + 4 * numel <= peak["optimizer_state"] <= state + 4 * numel + 64, peak
        assert peak["grads"] == 4 * numel and peak["params"] == 4 * numel


def test_regions_are_removed_when_the_profiler_exits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam(model.parameters())
    with MemoryProfiler(model=model, optimizer=optimizer, out_dir=tmp_path):
        assert len(optimizer._optimizer_step_pre_hooks) == 1 and len(optimizer._optimizer_step_post_hooks) == 1
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


Z2 = "z2-adamw-bf16-n2"


@pytest.fixture(scope="module")
def z2_run(shared_launches: SharedLaunches) -> dict:
    return load_run(shared_launches.deepspeed({Z2: case_run(Z2)})[Z2].ok())


def test_zero2_step_names_the_fp32_gradient_partition(z2_run: dict) -> None:
    n = len(z2_run["ranks"])
    # this rank's fp32 gradient partition: partition numel (the flat group padded to 2N, split
    # in N) x 4 bytes, made by step() from the bf16 averaged gradients
    fp32_partition = 4 * zero12_partition(n)
    for rank in z2_run["ranks"]:
        for step in rank["steps"]:
            for phase, rec in step["phases"].items():
                peak = rec["peak"]["device"]
                assert peak["other"] <= OTHER_SHARE * rec["peak_total"], (rank["rank"], step["step"], phase, peak)
            if step.get("boundary", True):
                assert step["phases"]["step"]["peak"]["device"]["grads"] >= fp32_partition, (rank["rank"], step)
