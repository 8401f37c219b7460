"""MemoryProfiler on a plain torch loop (small MLP + Adam, world size 1, no DeepSpeed).

Expected bytes come from parameter counts and dtypes: fp32 params 4 bytes each, Adam keeps two
fp32 moments per element plus one fp32 ``step`` scalar per parameter tensor.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memprof.categories import CATEGORIES, breakdown_total
from memprof.errors import MemprofError
from memprof.measure import MemoryProfiler, SimulatedOutOfMemoryError
from memprof.run.files import load_run, read_rank_lines

STEPS = 2
REPO = Path(__file__).resolve().parents[1]


def make_loop(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(32, 64, generator=g), torch.randint(0, 16, (32,), generator=g)) for _ in range(STEPS)]
    return model, optimizer, batches


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_plain(seed: int = 0) -> list[float]:
    model, optimizer, batches = make_loop(seed)
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run_profiled(out_dir: Path, memory_budget: int | None = None, seed: int = 0):
    model, optimizer, batches = make_loop(seed)
    prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir=out_dir, run={"model": "mlp"},
                          memory_budget=memory_budget)
    losses = []
    with prof:
        for i, (x, y) in enumerate(batches):
            with prof.step(i) as s:
                with s.phase("forward"):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                s.loss = loss.item()
            losses.append(loss.item())
    return prof, model, losses


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp")
    gc.collect()  # garbage of earlier tests freed mid-phase would lower totals under the start
    prof, model, losses = run_profiled(out)
    doc = prof.finish()
    return out, prof, model, losses, doc


def phase(doc, step: int, name: str) -> dict:
    return doc["ranks"][0]["steps"][step]["phases"][name]


def test_params_grads_optimizer_state_follow_dtype_and_counts(profiled) -> None:
    _, _, model, _, doc = profiled
    n = n_params(model)
    n_tensors = len(list(model.parameters()))
    adam_state = 2 * 4 * n + 4 * n_tensors  # exp_avg + exp_avg_sq (fp32) + one fp32 step each
    for step in range(STEPS):
        for name in ("forward", "backward", "step"):
            assert phase(doc, step, name)["end"]["device"]["params"] == 4 * n
    assert phase(doc, 0, "backward")["end"]["device"]["grads"] == 4 * n
    assert phase(doc, 0, "forward")["end"]["device"]["optimizer_state"] == 0
    assert phase(doc, 0, "step")["end"]["device"]["optimizer_state"] == adam_state
    assert phase(doc, 1, "forward")["end"]["device"]["optimizer_state"] == adam_state
    assert phase(doc, 0, "step")["end"]["device"]["grads"] == 0  # zero_grad(set_to_none) freed them
    assert phase(doc, 0, "forward")["end"]["device"]["activations"] > 0
    # the step's peak saw the grads (freed only at its end) beside the new Adam state and the
    # update's temporaries, which are the optimizer's (memprof/measure/regions.py): Adam on CPU
    # tensors is the for-loop one (torch/optim/adam.py _single_tensor_adam), whose
    # `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)` holds the sqrt and the
    # quotient of one parameter at once: at most twice the largest parameter, fp32 (the allocator
    # hook also counts a few bytes of wrapped Python scalars)
    assert phase(doc, 0, "step")["peak"]["device"]["grads"] == 4 * n
    temporaries = 2 * 4 * max(p.numel() for p in model.parameters())
    assert adam_state + temporaries <= phase(doc, 0, "step")["peak"]["device"]["optimizer_state"] <= (
        adam_state + temporaries + 64)
    # and the step names everything it makes: its peak's `other` is what was `other` before it (the
    # loop's own batches, made before the profiler started, and whatever earlier tests in this
    # process left alive: seeded as `other` at the start, 32 MB of it once in the full suite). Of
    # the batches, step 0's model input x is `activations` once the model was fed it (the root
    # module's forward pre-hook, memprof/measure/regions.py); step 1's x and both label tensors y
    # (cross_entropy's, never the model's input) stay `other`.
    x_bytes, y_bytes = 32 * 64 * 4, 32 * 8  # x: 32 x 64 fp32, y: 32 int64 labels
    before_step = phase(doc, 0, "backward")["end"]["device"]["other"]
    assert before_step >= (STEPS - 1) * x_bytes + STEPS * y_bytes
    assert phase(doc, 0, "step")["peak"]["device"]["other"] == before_step
    assert phase(doc, 0, "forward")["end"]["device"]["activations"] >= x_bytes


def test_totals_are_the_sum_of_categories_and_never_negative(profiled) -> None:
    _, prof, _, _, doc = profiled
    for st in doc["ranks"][0]["steps"]:
        for rec in st["phases"].values():
            assert breakdown_total(rec["end"], "device") == rec["end_total"]
            assert breakdown_total(rec["peak"], "device") == rec["peak_total"]
            assert rec["peak_total"] >= rec["end_total"]
            assert all(rec[k][loc][c] >= 0 for k in ("end", "peak") for loc in ("device", "host") for c in CATEGORIES)
            assert breakdown_total(rec["end"], "host") == 0  # nothing is offloaded here
            assert rec["host_rss_bytes"] > 0
            assert "cuda" not in rec  # a CPU run never reports CUDA counters
    assert prof.diagnostics["negative_clamps"] == 0
    assert prof.diagnostics["untracked_owned_bytes_max"] == 0


def test_forward_peak_holds_the_logits_and_hidden_layer(profiled) -> None:
    _, _, _, _, doc = profiled
    # forward of a 32 x 64 batch keeps at least the 32 x 256 hidden pre/post GELU and 32 x 16 logits
    fwd = phase(doc, 0, "forward")
    assert fwd["peak"]["device"]["activations"] >= 4 * (2 * 32 * 256 + 32 * 16)


def test_profiler_does_not_change_losses(profiled) -> None:
    _, _, _, losses, _ = profiled
    plain = run_plain()
    # Same computation, same inputs. Not compared bit for bit: CPU BLAS kernels may sum in a
    # different order for differently aligned buffers, and the profiler changes allocation order
    # (seen once in eight runs as a last-bit difference). A changed result would be far larger.
    assert len(losses) == len(plain)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(losses, plain)), (losses, plain)


def test_rank_file_and_run_file_agree(profiled) -> None:
    out, _, _, losses, doc = profiled
    records = read_rank_lines(out / "rank0.jsonl")
    assert [r["type"] for r in records] == ["header", "step", "step", "end"]
    assert [r["loss"] for r in records if r["type"] == "step"] == losses
    on_disk = load_run(out / "memprof.json")
    assert on_disk == json.loads(json.dumps(doc))
    assert on_disk["run"]["device_type"] == "cpu" and on_disk["run"]["world_size"] == 1
    assert on_disk["ranks"][0]["complete"] and on_disk["missing_ranks"] == []
    assert on_disk["ranks"][0]["peak_host_rss_bytes"] > 0


def test_budget_stops_the_run_with_an_oom_record(tmp_path) -> None:
    # The tracked total is every live tensor of the process, so the reference run is made here,
    # with the same objects alive as in the budgeted run that follows it.
    prof, model, _ = run_profiled(tmp_path / "reference")
    n = n_params(model)
    doc = prof.finish()
    del prof, model
    gc.collect()
    # A budget between the first forward's peak and the first backward's: fails inside backward
    # (through the autograd engine), after the whole forward ran.
    budget = phase(doc, 0, "forward")["peak_total"] + 1
    assert phase(doc, 0, "backward")["peak_total"] > budget
    with pytest.raises(torch.OutOfMemoryError) as info:
        run_profiled(tmp_path, memory_budget=budget)
    assert isinstance(info.value, SimulatedOutOfMemoryError)
    records = read_rank_lines(tmp_path / "rank0.jsonl")
    oom = records[-1]
    assert oom["type"] == "oom" and oom["step"] == 0 and oom["phase"] == "backward"
    assert oom["budget_bytes"] == budget and oom["total_bytes"] > budget
    assert breakdown_total(oom["breakdown"], "device") == oom["total_bytes"]
    assert oom["breakdown"]["device"]["params"] == 4 * n
    assert oom["breakdown"]["device"]["activations"] > 0
    assert "budget" in oom["message"]
    assert not any(r["type"] == "step" for r in records)


def test_rank_file_survives_a_crash(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_profiler_torch import make_loop
        from memprof.measure import MemoryProfiler
        model, optimizer, batches = make_loop()
        prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir={str(tmp_path)!r})
        with prof:
            for i in range(3):
                with prof.step(i) as s:
                    with s.phase("forward"):
                        loss = model(batches[0][0]).sum()
                    if i == 2:
                        os._exit(17)  # dies mid-step, no cleanup, no finish()
                    with s.phase("backward"):
                        loss.backward()
                    with s.phase("step"):
                        optimizer.step()
                    s.loss = loss
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    run = load_run(tmp_path)
    entry = run["ranks"][0]
    assert [s["step"] for s in entry["steps"]] == [0, 1]
    assert not entry["complete"]
    assert set(entry["steps"][1]["phases"]) == {"forward", "backward", "step"}


def test_bad_input_is_one_clear_error(tmp_path) -> None:
    model, optimizer, _ = make_loop()
    for bad in (0, -5, 1.5, True):
        with pytest.raises(MemprofError, match="memory budget"):
            MemoryProfiler(model=model, optimizer=optimizer, out_dir=tmp_path, memory_budget=bad)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MemprofError, match="cannot write the profile"):
        MemoryProfiler(model=model, optimizer=optimizer, out_dir=blocker / "sub")
    assert not (tmp_path / "rank0.jsonl").exists()  # nothing half-written
