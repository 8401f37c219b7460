"""Who holds the bytes at a phase peak (issue 17: why one rank is heavier): each phase record's
``peak_owners`` (``{location: {category: {owner: bytes}}}``, memprof.compare.PEAK_OWNERS_KEY), the
owners the ownership walk names, with their bytes at the peak moment.

* the trackers (both CPU trackers): bytes per owner at the peak, kept beside the tally and copied
  only when owners change after a new peak; a storage freed after the peak stays counted there,
  one born after it does not, one alive at it and named later is named there too;
* the profiler on a plain torch MLP trained with Adam (in-process, both CPU trackers): every
  parameter, its gradient and its Adam state named at the step's peak with numel x 4 bytes, the
  gradients although ``zero_grad`` frees them before the phase ends;
* the CUDA backend (counters simulated, as tests/test_profiler_transients.py does): the owners of
  the walk at the phase end, bytes a labelled region adds unnamed;
* top-N per category and the ``(others)`` remainder;
* a real 2-rank ZeRO-2 run (the launch tests/test_measured_vs_estimated.py and
  tests/test_profiler_transients.py read: no launch of its own): the rank whose backward peak is
  heavier, and the owner that makes it so, in bytes derived from ZeRO-2's partition rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memprof.categories import empty_breakdown
from memprof.compare import PEAK_OWNERS_KEY
from memprof.measure import cuda_counters, native
from memprof.measure.allocation_hook_tracker import NativeAllocationTracker
from memprof.measure.backends import OTHERS, PEAK_OWNERS_TOP, CudaBackend, OwnerIndex, peak_owners_record
from memprof.measure.dispatch_tracker import DEVICE_ACTIVATIONS, DEVICE_OTHER, AllocationTracker, label_of
from memprof.measure.ownership import UNNAMED, Owned

MB = 2**20
FP32 = 4
GRADS = label_of("device", "grads")
PARAMS = label_of("device", "params")


def _hook_or_skip() -> type[NativeAllocationTracker]:
    try:
        native.load()
    except native.HookUnavailable as e:  # no C++ compiler here: the profiler uses the fallback
        pytest.skip(f"memprof's allocation hook cannot be built here: {e}")
    return NativeAllocationTracker


@pytest.fixture(params=["allocator hook", "dispatch mode"])
def Tracker(request):  # noqa: N802 - a class
    return _hook_or_skip() if request.param == "allocator hook" else AllocationTracker


def _key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _at(owners: list[int], i: int) -> int:
    return owners[i] if i < len(owners) else 0


# ---- the trackers ---------------------------------------------------------------------------------

def test_a_storage_freed_after_the_peak_keeps_its_owner_there(Tracker) -> None:
    tracker = Tracker()
    bucket, grad = 0, 1  # owner indices, as the profiler's OwnerIndex gives them
    with tracker:
        tracker.new_label = DEVICE_ACTIVATIONS
        tracker.reset_peak()
        a = torch.empty(2 * MB, dtype=torch.uint8)
        tracker.relabel_owned({_key(a): GRADS}, {}, "peak", {_key(a): grad})  # a walk names it
        b = torch.empty(3 * MB, dtype=torch.uint8)  # the peak: a (named) + b (unnamed)
        del a  # freed after the peak: the peak's owners keep it
        assert _at(tracker.peak_owners(), grad) == 2 * MB
        c = torch.empty(MB, dtype=torch.uint8)  # below the peak: born after it
        tracker.relabel_owned({_key(b): GRADS, _key(c): GRADS}, {}, "peak", {_key(b): bucket, _key(c): bucket})
        # b was alive at the peak and is named now: named there too; c was not alive then
        owners = tracker.peak_owners()
        assert (_at(owners, bucket), _at(owners, grad)) == (3 * MB, 2 * MB)
        assert tracker.peak.tally[GRADS] == 5 * MB  # the labels agree with the owners
        # a new peak: the owners as they are now (a gone, b and c named)
        d = torch.empty(8 * MB, dtype=torch.uint8)
        owners = tracker.peak_owners()
        assert (_at(owners, bucket), _at(owners, grad)) == (4 * MB, 0)
        # a storage no walk owns any more loses its owner with its label
        tracker.relabel_owned({}, {GRADS: DEVICE_OTHER}, "peak", {})
        owners = tracker.peak_owners()
        assert (_at(owners, bucket), tracker.peak.tally[GRADS]) == (0, 0)
        tracker.new_label = DEVICE_OTHER
        del b, c, d


def test_a_large_storage_named_mid_phase_is_named_at_the_peak(Tracker) -> None:
    tracker = Tracker()
    bucket = 0
    with tracker:
        tracker.new_label = DEVICE_ACTIVATIONS
        tracker.large_bytes = MB
        tracker.reset_peak()
        holder = {"buf": torch.empty(4 * MB, dtype=torch.uint8)}  # large: pending a walk
        key = _key(holder["buf"])
        tracker.relabel_pending({key: label_of("device", "comm_buffers")}, {key: bucket})
        del holder["buf"]  # freed before any phase-end walk could see it
        assert _at(tracker.peak_owners(), bucket) == 4 * MB
        assert tracker.peak.tally[label_of("device", "comm_buffers")] == 4 * MB
        tracker.large_bytes = None
        tracker.new_label = DEVICE_OTHER


# ---- the profiler, in-process -----------------------------------------------------------------------


def _profiled_mlp(out: Path) -> tuple[dict, dict[str, int]]:
    """(run document, {parameter name: numel}) of a bias-free MLP trained 2 steps with foreach Adam;
    ``zero_grad`` inside the step phase frees the gradients before it ends."""
    from test_profiler_transients import HIDDEN, IN, OUT, _profiled_adam_steps

    doc, _, _ = _profiled_adam_steps(out, bias=False)
    # the qualified names nn.Sequential gives its children's weights, and their sizes
    return doc, {"0.weight": HIDDEN * IN, "2.weight": OUT * HIDDEN}


@pytest.mark.parametrize("tracker", ["allocator", "dispatch"])
def test_every_parameter_its_gradient_and_its_state_are_named_at_the_step_peak(
        tmp_path: Path, tracker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMPROF_CPU_TRACKER", tracker)
    doc, numels = _profiled_mlp(tmp_path)
    steady = doc["ranks"][0]["steps"][1]["phases"]
    rec = steady["step"]
    owners = rec[PEAK_OWNERS_KEY]["device"]
    assert set(rec[PEAK_OWNERS_KEY]) == {"device"}  # nothing offloaded
    assert owners["params"] == {name: FP32 * n for name, n in numels.items()}
    # the gradients were named at the backward's end; zero_grad frees them after the step's peak
    assert owners["grads"] == {f".grad of {name}": FP32 * n for name, n in numels.items()}
    # torch/optim/adam.py _init_group: exp_avg, exp_avg_sq (zeros_like the param) and a 0-dim
    # fp32 `step` per parameter; the foreach update's temporaries (regions: optimizer_state) have
    # no owner: unnamed, the category's rest at the peak
    state = {f"{key} of {name}": FP32 * n for name, n in numels.items() for key in ("exp_avg", "exp_avg_sq")}
    state.update({f"step of {name}": FP32 for name in numels})
    named = {k: v for k, v in owners["optimizer_state"].items() if k != UNNAMED}
    assert named == state
    assert owners["optimizer_state"][UNNAMED] == rec["peak"]["device"]["optimizer_state"] - sum(state.values())
    # every owned category's owners add up to its bytes at the peak
    for category, by_owner in owners.items():
        assert sum(by_owner.values()) == rec["peak"]["device"][category], category
    # the forward's peak: parameters and Adam's state, no gradient (set to None by the last step)
    fwd = steady["forward"][PEAK_OWNERS_KEY]["device"]
    assert fwd["params"] == owners["params"] and "grads" not in fwd
    assert fwd["optimizer_state"] == state


# ---- the CUDA backend (counters simulated) -----------------------------------------------------------

def test_cuda_peak_owners_are_the_walks_with_region_bytes_unnamed(monkeypatch: pytest.MonkeyPatch) -> None:
    now = {"allocated": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: now["allocated"])
    monkeypatch.setattr(cuda_counters, "start_phase", lambda device: now.update(peak=now["allocated"]))
    monkeypatch.setattr(cuda_counters, "allocated_and_peak", lambda device: (now["allocated"], now["peak"]))
    monkeypatch.setattr(cuda_counters, "read", lambda device: {
        "allocated_bytes": now["allocated"], "reserved_bytes": now["peak"], "peak_allocated_bytes": now["peak"],
        "alloc_retries": 0})
    owned = {("cuda:0", 1): Owned("params", "device", 1000, "w"), ("cuda:0", 2): Owned("params", "device", 24, "b"),
             ("cuda:0", 3): Owned("grads", "device", 1000, ".grad of w"), ("cpu", 4): Owned("optimizer_state", "host", 8)}
    now["allocated"] = now["peak"] = 1000 + 24 + 1000
    backend = CudaBackend(torch.device("cuda", 0), lambda: owned, {"negative_clamps": 0}, memory_budget=None)
    backend.start()
    backend.begin_step()
    backend.begin_phase("step")
    backend._peaks.push(GRADS)  # a region labelling grads (memprof.measure.regions.PeakRegions)
    now["allocated"] += 300
    now["peak"] = now["allocated"]
    backend._peaks.pop()
    now["allocated"] -= 300
    rec = backend.end_phase("step")
    assert rec["peak"]["device"]["grads"] == 1300
    assert rec[PEAK_OWNERS_KEY] == {"device": {"params": {"w": 1000, "b": 24}, "grads": {".grad of w": 1000, UNNAMED: 300}},
                                    "host": {"optimizer_state": {UNNAMED: 8}}}


# ---- the record: bounded --------------------------------------------------------------------------

def test_a_category_keeps_its_largest_owners_and_sums_the_rest() -> None:
    index = OwnerIndex()
    n = PEAK_OWNERS_TOP + 3
    owner_bytes = {index(PARAMS, f"p{i}"): 100 * (i + 1) for i in range(n)}  # p{n-1} the largest
    peak = empty_breakdown()
    peak["device"]["params"] = sum(owner_bytes.values()) + 7  # 7 bytes nobody named
    got = peak_owners_record(owner_bytes.items(), index, peak)["device"]["params"]
    kept = [f"p{i}" for i in range(n - 1, n - 1 - PEAK_OWNERS_TOP, -1)]
    assert list(got) == [*kept, OTHERS, UNNAMED]
    assert got[OTHERS] == sum(100 * (i + 1) for i in range(3)) and got[UNNAMED] == 7
    assert sum(got.values()) == peak["device"]["params"]


# ---- a real 2-rank run whose ranks differ ---------------------------------------------------------
# ZeRO-2 with a 4096-element reduce bucket and accumulation (tests/test_measured_vs_estimated.py):
# rank 1 owns the last params, so its backward peaks with more activations alive, and the two
# ranks' gradient partitions differ by the parameter that straddles the partition boundary
UNEVEN = "z2-adamw-fp32-bucket4096-gas2-n2"


@pytest.fixture(scope="module")
def uneven_run(shared_launches) -> tuple[Path, dict]:
    from test_measured_vs_estimated import case_run

    from memprof.run.files import load_run

    out = shared_launches.deepspeed({UNEVEN: case_run(UNEVEN)})[UNEVEN].ok()
    return out, load_run(out)


def _gradient_partition_numels(n: int) -> list[int]:
    """Per rank, the elements of ZeRO-2's contiguous gradient buffer: the full numel of every
    parameter in its partition (stage_1_and_2.py copy_grads_in_partition, 2184-2192: `total_size +=
    param_in_partition.numel()`), where a parameter is in partition r when it starts inside it or
    straddles its start (get_partition_info, 2579-2609), the flat group being the parameters in
    model order (round_robin_gradients off) split in parts of zero12_partition(n) elements."""
    from test_measured_vs_estimated import param_numels, zero12_partition

    part = zero12_partition(n)
    starts, at = [], 0
    for k in param_numels():
        starts.append(at)
        at += k
    out = []
    for r in range(n):
        lo, hi = r * part, (r + 1) * part
        out.append(sum(k for s, k in zip(starts, param_numels()) if lo <= s < hi or s < lo < s + k))
    return out


def test_the_owner_of_the_uneven_gradient_partition_is_named(uneven_run) -> None:
    from launch_helpers import memprof_in_process

    from memprof.compare import rank_differences
    from memprof.units import format_bytes

    out, doc = uneven_run
    numels = _gradient_partition_numels(2)
    assert numels[1] > numels[0]  # rank 1 holds the straddling parameter and everything after it
    (d,) = [x for x in rank_differences(doc) if x.phase == "backward"]
    assert (d.heavier_rank, d.lighter_rank) == (1, 0)
    grads = next(g for g in d.gaps if g.category == "grads")
    # rank 0's grads at its peak are its gradient buffer; rank 1's hold its buffer and more (the
    # gradients still waiting for their reduction when its peak comes, named since mid-phase walks
    # reach storages this small)
    assert grads.lighter == FP32 * numels[0] and grads.heavier >= FP32 * numels[1]
    # who holds the grads at each rank's peak (the second cycle's boundary micro-step): rank 0 its
    # averaged gradient partition; rank 1, peaking earlier in that backward, the partition averaged
    # in the first micro-step (kept to accumulate into), the boundary's new contiguous buffer being
    # filled (copy_grads_in_partition), and the gradient of transformer.h.1.mlp.c_proj (64 x 256
    # fp32, larger than the 4096-element bucket) waiting for its reduction (stage_1_and_2.py 1446)
    def owners_at_peak(rank: int, step: int) -> dict[str, int]:
        (rec,) = [s for r in doc["ranks"] if r["rank"] == rank for s in r["steps"] if s["step"] == step]
        return rec["phases"]["backward"]["peak_owners"]["device"]["grads"]

    averaged, buffer = "averaged gradient partition, group 0", "grads_in_partition (this rank's gradients)"
    assert owners_at_peak(0, d.lighter_step) == {averaged: FP32 * numels[0]}
    assert owners_at_peak(1, d.heavier_step) == {averaged: FP32 * numels[1], buffer: FP32 * numels[1],
                                                 ".grad of transformer.h.1.mlp.c_proj.weight": FP32 * 64 * 256}
    # the owner named is the one whose bytes differ most by name: the new buffer rank 0 does not hold
    assert (grads.owner, grads.owner_difference) == (buffer, FP32 * numels[1])
    # the grads make the difference (+401,408 B of grads; the peaks differ by 253,440 B), and the
    # words name their owner
    assert d.cause is grads and d.held_cause is None
    said = f"most of it {buffer}, +{format_bytes(FP32 * numels[1])}"
    assert said in d.words()
    res = memprof_in_process("compare", str(out), "--fresh-estimate")
    assert res.returncode == 0, res.stderr
    assert said in " ".join(res.stdout.split())
    # the report's list of rank differences carries the same words, and the owner as data
    from memprof.report.data import build_report_data

    (shown,) = [x for x in build_report_data([doc])["runs"][0]["rank_differences"] if x["phase"] == "backward"]
    assert shown["words"] == d.words()
