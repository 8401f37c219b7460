"""AllocationTracker: sees each CPU storage allocation and free, counts views once, exact peaks."""

from __future__ import annotations

import pytest
import torch

from memprof.measure import SimulatedOutOfMemoryError
from memprof.measure.tracker import DEVICE_ACTIVATIONS, DEVICE_OTHER, AllocationTracker, label_of

MB = 2**20


def test_sees_allocation_free_and_counts_views_once() -> None:
    tracker = AllocationTracker()
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


def test_peak_of_alloc_sequence_is_exact() -> None:
    tracker = AllocationTracker()
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


def test_peak_breakdown_is_tally_at_the_peak_moment() -> None:
    tracker = AllocationTracker()
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


def test_op_outputs_and_inplace_resize_are_seen() -> None:
    tracker = AllocationTracker()
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


def test_seeded_storages_are_counted_and_their_free_seen() -> None:
    t = torch.empty(500, dtype=torch.float32)
    tracker = AllocationTracker()
    params = label_of("device", "params")
    assert tracker.seed([t.untyped_storage()], params) == 2000
    assert tracker.tally[params] == 2000
    with tracker:
        del t
    assert tracker.tally[params] == 0 and tracker.device_total == 0


def test_relabel_moves_bytes_in_tally_and_in_snapshots_alive_then() -> None:
    tracker = AllocationTracker()
    grads = label_of("device", "grads")
    with tracker:
        tracker.new_label = DEVICE_ACTIVATIONS
        tracker.reset_peak()
        g = torch.empty(MB, dtype=torch.uint8)
        peak = tracker.peak
        key = (str(g.device), g.untyped_storage().data_ptr())
        tracker.relabel(lambda k, rec: grads if k == key else rec.label, [peak])
        assert tracker.tally[grads] == MB
        assert peak.tally[grads] == MB
        tracker.new_label = DEVICE_OTHER
        del g


def test_budget_raises_from_the_crossing_allocation() -> None:
    tracker = AllocationTracker()
    with tracker:
        pass
    tracker = AllocationTracker(budget_bytes=tracker.device_total + 3 * MB)
    with tracker:
        keep = torch.empty(2 * MB, dtype=torch.uint8)
        with pytest.raises(torch.OutOfMemoryError) as info:
            torch.empty(2 * MB, dtype=torch.uint8)
        assert isinstance(info.value, SimulatedOutOfMemoryError)
        assert info.value.requested_bytes == 2 * MB
        assert info.value.total_bytes == tracker.oom.device_total
        assert info.value.total_bytes > info.value.budget_bytes
        del keep
