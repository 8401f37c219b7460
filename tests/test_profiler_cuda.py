"""MemoryProfiler on CUDA: allocator counters per phase, budget at phase ends, real OOM record.

Runs only where a GPU is present (CI has none; these were run on an H100, see docs/profiler.md).
"""

from __future__ import annotations

import gc

import pytest
import torch

from memprof.categories import breakdown_total
from memprof.measure import MemoryProfiler, SimulatedOutOfMemoryError
from memprof.run.files import read_rank_lines

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def loop(out, memory_budget=None, huge_in_step: int | None = None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).cuda()
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(256, 1024, device="cuda")
    prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir=out, memory_budget=memory_budget)
    with prof:
        for i in range(2):
            with prof.step(i) as s:
                with s.phase("forward"):
                    loss = model(x).square().mean()
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if huge_in_step is not None:
                        torch.empty(huge_in_step, dtype=torch.uint8, device="cuda")
                s.loss = loss
    return prof, model


def test_cuda_phase_records_use_allocator_counters(tmp_path) -> None:
    prof, model = loop(tmp_path)
    doc = prof.finish()
    n = sum(p.numel() for p in model.parameters())
    assert doc["run"]["device_type"] == "cuda"
    steps = doc["ranks"][0]["steps"]
    for st in steps:
        for rec in st["phases"].values():
            assert rec["end"]["device"]["params"] == 4 * n
            assert rec["peak_total"] == rec["cuda"]["peak_allocated_bytes"]
            assert rec["end_total"] == rec["cuda"]["allocated_bytes"]
            assert breakdown_total(rec["end"], "device") == rec["end_total"]
            assert breakdown_total(rec["peak"], "device") == rec["peak_total"]
            assert rec["cuda"]["reserved_bytes"] >= rec["cuda"]["allocated_bytes"]
    assert steps[0]["phases"]["forward"]["end"]["device"]["activations"] >= 4 * 2 * 256 * 4096
    assert steps[0]["phases"]["backward"]["end"]["device"]["grads"] == 4 * n
    assert steps[1]["phases"]["forward"]["end"]["device"]["optimizer_state"] >= 2 * 4 * n


def test_cuda_budget_checked_against_phase_peak(tmp_path) -> None:
    prof, model = loop(tmp_path / "ref")
    doc = prof.finish()
    del prof, model  # the budgeted run must start from the same allocated bytes as this one
    gc.collect()
    steps = doc["ranks"][0]["steps"]
    budget = steps[0]["phases"]["forward"]["peak_total"] + 1
    # the first phase, in run order, whose allocator peak went over the budget
    first = next((st["step"], name) for st in steps for name, rec in st["phases"].items() if rec["peak_total"] > budget)
    with pytest.raises(SimulatedOutOfMemoryError):
        loop(tmp_path, memory_budget=budget)
    oom = read_rank_lines(tmp_path / "rank0.jsonl")[-1]
    assert oom["type"] == "oom" and (oom["step"], oom["phase"]) == first and oom["total_bytes"] > budget


def test_real_cuda_oom_writes_the_same_record(tmp_path) -> None:
    capacity = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.OutOfMemoryError):
        loop(tmp_path, huge_in_step=2 * capacity)
    oom = read_rank_lines(tmp_path / "rank0.jsonl")[-1]
    assert oom["type"] == "oom" and oom["phase"] == "step" and oom["step"] == 0
    assert oom["budget_bytes"] == capacity
    assert breakdown_total(oom["breakdown"], "device") == oom["total_bytes"] > 0
