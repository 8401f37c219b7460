"""The CPU trackers (the allocator hook, the default, and the dispatch-mode fallback): each sees every
CPU storage allocation and free, counts views once, keeps exact peaks; the same tests run on both."""

from __future__ import annotations

import pytest
import torch

from memprof.measure import SimulatedOutOfMemoryError, native
from memprof.measure.allocation_hook_tracker import NativeAllocationTracker
from memprof.measure.dispatch_tracker import DEVICE_ACTIVATIONS, DEVICE_OTHER, AllocationTracker, label_of

MB = 2**20


def _hook_or_skip() -> type[NativeAllocationTracker]:
    try:
        native.load()
    except native.HookUnavailable as e:  # no C++ compiler here: the profiler uses the fallback
        pytest.skip(f"memprof's allocation hook cannot be built here: {e}")
    return NativeAllocationTracker


@pytest.fixture(params=["allocator hook", "dispatch mode"])
def Tracker(request):  # noqa: N802 - a class
    return _hook_or_skip() if request.param == "allocator hook" else AllocationTracker


def test_sees_allocation_free_and_counts_views_once(Tracker) -> None:
    tracker = Tracker()
    with tracker:
        before = tracker.device_total
        a = torch.empty(1000, dtype=torch.float32)
        assert tracker.device_total - before == 1000 * 4
        views = [a[10:], a.view(10, 100), a.t() if a.dim() == 2 else a.unsqueeze(0)]
        assert tracker.device_total - before == 4000  # views share a's storage
        del views
        b = torch.empty(250, dtype=torch.float64)
        assert tracker.device_total - before == 4000 + 2000
        del a
        assert tracker.device_total - before == 2000
        del b
        assert tracker.device_total == before


def test_peak_of_alloc_sequence_is_exact(Tracker) -> None:
    tracker = Tracker()
    with tracker:
        tracker.reset_peak()
        base = tracker.device_total
        a = torch.empty(4 * MB, dtype=torch.uint8)
        b = torch.empty(8 * MB, dtype=torch.uint8)
        del a
        c = torch.empty(2 * MB, dtype=torch.uint8)
        assert tracker.peak_total - base == 12 * MB
        assert tracker.device_total - base == 10 * MB
        del b, c


def test_peak_breakdown_is_tally_at_the_peak_moment(Tracker) -> None:
    tracker = Tracker()
    with tracker:
        tracker.new_label = DEVICE_ACTIVATIONS
        tracker.reset_peak()
        act_before = tracker.peak.tally[DEVICE_ACTIVATIONS]
        x = torch.empty(3 * MB, dtype=torch.uint8)
        tracker.new_label = DEVICE_OTHER
        y = torch.empty(MB, dtype=torch.uint8)
        del x
        z = torch.empty(MB, dtype=torch.uint8)  # below the peak: no new snapshot
        assert tracker.peak.tally[DEVICE_ACTIVATIONS] - act_before == 3 * MB
        del y, z


def test_op_outputs_and_inplace_resize_are_seen(Tracker) -> None:
    tracker = Tracker()
    with tracker:
        base = tracker.device_total
        a = torch.ones(256, 256)  # 256 KiB
        b = a @ a  # a new 256 KiB output
        assert tracker.device_total - base == 2 * 256 * 256 * 4
        b.add_(1.0)  # in place: same storage
        assert tracker.device_total - base == 2 * 256 * 256 * 4
        c = torch.empty(0)
        c.resize_(1000)  # grows a storage through an aten op
        assert tracker.device_total - base == 2 * 256 * 256 * 4 + 4000
        del a, b, c
        assert tracker.device_total == base


def test_seeded_storages_are_counted_and_their_free_seen(Tracker) -> None:
    t = torch.empty(500, dtype=torch.float32)
    tracker = Tracker()
    params = label_of("device", "params")
    assert tracker.seed([t.untyped_storage()], params) == 2000
    with tracker:
        assert tracker.tally[params] == 2000
        del t
        assert tracker.tally[params] == 0 and tracker.device_total == 0


def test_relabel_moves_bytes_in_tally_and_in_snapshots_alive_then(Tracker) -> None:
    tracker = Tracker()
    grads = label_of("device", "grads")
    with tracker:
        tracker.new_label = DEVICE_ACTIVATIONS
        tracker.reset_peak()
        g = torch.empty(MB, dtype=torch.uint8)
        key = (str(g.device), g.untyped_storage().data_ptr())
        missing = tracker.relabel_owned({key: grads, ("cpu", 12345): grads, ("cpu", -1): grads}, {}, "peak")
        assert missing == {("cpu", 12345), ("cpu", -1)}  # owned but never allocated: reported, not counted
        assert tracker.tally[grads] == MB
        assert tracker.peak.tally[grads] == MB
        # a storage born after the peak moment moves in the tally only, not in the peak
        tracker.reset_peak()
        big = torch.empty(4 * MB, dtype=torch.uint8)
        del big
        peak_before = list(tracker.peak.tally)
        small = torch.empty(MB, dtype=torch.uint8)  # below the peak: no new snapshot
        tracker.relabel_owned({(str(small.device), small.untyped_storage().data_ptr()): grads}, {}, "peak")
        assert tracker.tally[grads] == 2 * MB
        assert tracker.peak.tally == peak_before
        del small
        tracker.new_label = DEVICE_OTHER
        del g


def test_budget_raises_from_the_crossing_allocation(Tracker) -> None:
    tracker = Tracker()
    with tracker:
        pass
    tracker = Tracker(budget_bytes=tracker.device_total + 3 * MB)
    with tracker:
        keep = torch.empty(2 * MB, dtype=torch.uint8)
        with pytest.raises(torch.OutOfMemoryError) as info:
            torch.empty(2 * MB, dtype=torch.uint8)
        # the hook raises torch's error from C++; the profiler re-raises it as memprof's
        err = tracker.simulated_oom(info.value) or info.value
        assert isinstance(err, SimulatedOutOfMemoryError)
        assert err.requested_bytes == 2 * MB
        assert err.total_bytes == tracker.oom.device_total
        assert err.total_bytes > err.budget_bytes
        del keep


# ---- the allocator hook only ------------------------------------------------------------------


def test_hook_counts_the_tracking_thread_and_frees_on_any_thread() -> None:
    """Blocks another thread allocates are not counted (gloo's workers stage collectives through
    scratch that NCCL does not need; a dispatch mode does not see other threads either); a block
    the tracking thread allocated is uncounted when another thread frees it."""
    import threading

    tracker = _hook_or_skip()()
    held = []
    with tracker:
        before = tracker.device_total
        t = threading.Thread(target=lambda: held.append(torch.empty(3 * MB, dtype=torch.uint8)))
        t.start()
        t.join()
        assert tracker.device_total == before
        held.clear()
        mine = [torch.empty(2 * MB, dtype=torch.uint8)]
        assert tracker.device_total - before == 2 * MB
        t = threading.Thread(target=mine.clear)  # the last reference dies on the other thread
        t.start()
        t.join()
        assert tracker.device_total == before


def test_hook_asks_for_a_walk_at_the_next_top_level_op() -> None:
    """A large allocation is walked for its owner at the next op that is not nested in another:
    torch.zeros allocates inside aten.empty and fills with a nested aten.zero_, so a walk at the
    nested op would run before the caller holds the tensor."""
    tracker = _hook_or_skip()()
    holder: dict[str, torch.Tensor] = {}
    seen: list[bool] = []
    tracker.on_large_allocation = lambda: seen.append("buf" in holder)
    with tracker:
        tracker.large_bytes = MB
        holder["buf"] = torch.zeros(2 * MB, dtype=torch.uint8)
        assert seen == []
        torch.ones(1)  # the next top-level op
        assert seen == [True]
        torch.ones(1)
        assert seen == [True]  # once per large allocation
        tracker.relabel_pending({("cpu", holder["buf"].untyped_storage().data_ptr()): label_of("device", "comm_buffers")})
        assert tracker.tally[label_of("device", "comm_buffers")] == 2 * MB
        tracker.large_bytes = None
        del holder["buf"]


def test_hook_restores_the_allocator_and_frees_after_stop() -> None:
    tracker = _hook_or_skip()()
    with tracker:
        kept = torch.empty(MB, dtype=torch.uint8)
        total = tracker.device_total
    after = torch.empty(MB, dtype=torch.uint8)  # not tracked: the hook is out
    del kept, after  # a block allocated while tracking is freed through the hook's deleter
    assert tracker.device_total == total - MB


def test_profiler_falls_back_to_the_dispatch_tracker_and_says_why(monkeypatch, tmp_path) -> None:
    from memprof.measure import MemoryProfiler

    def unavailable(**_kw):
        raise native.HookUnavailable("no C++ compiler")

    model = torch.nn.Linear(4, 4)
    monkeypatch.setattr(native, "load", unavailable)
    monkeypatch.setattr("memprof.measure.allocation_hook_tracker.load", unavailable)
    prof = MemoryProfiler(model=model, out_dir=tmp_path / "a")
    with prof:
        pass
    assert prof.diagnostics["cpu_tracker"] == "dispatch mode (allocator hook unavailable: no C++ compiler)"
    monkeypatch.undo()
    monkeypatch.setenv(native.TRACKER_ENV, "dispatch")
    prof = MemoryProfiler(model=model, out_dir=tmp_path / "b")
    with prof:
        pass
    assert prof.diagnostics["cpu_tracker"] == "dispatch mode (MEMPROF_CPU_TRACKER=dispatch)"


def test_hook_leaves_out_a_collectives_own_staging(tmp_path) -> None:
    """gloo's all_gather_into_tensor stages the whole output in a flat copy it allocates inside the
    c10d op (NCCL gathers in place): not counted; the caller's output and input are."""
    import torch.distributed as dist

    tracker = _hook_or_skip()()
    n = MB  # elements
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with tracker:
            base = tracker.device_total
            out, inp = torch.empty(n), torch.ones(n)
            assert tracker.device_total - base == 2 * 4 * n
            tracker.reset_peak()
            dist.all_gather_into_tensor(out, inp)
            assert tracker.peak_total - base == 2 * 4 * n  # no staging copy of 4n bytes
            assert torch.equal(out, inp)
            after = torch.empty(n)  # ops after the collective are counted again
            assert tracker.device_total - base == 3 * 4 * n
            del out, inp, after
    finally:
        dist.destroy_process_group()
