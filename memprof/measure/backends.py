"""The two ways the profiler measures a phase, behind one interface.

* :class:`CpuBackend`: the :class:`~memprof.measure.dispatch_tracker.AllocationTracker` sees every storage
  allocation and free, so the peak is exact at op granularity and its breakdown is a copy of a
  running tally, relabelled from the ownership walk at phase boundaries.
* :class:`CudaBackend`: the caching allocator's counters (peak reset per phase), the ownership walk
  for model states, and no dispatch mode, which keeps the cost to a few reads per phase (and one
  per labelled region's start and end: memprof.measure.regions.PeakRegions).

:class:`~memprof.measure.profiler.MemoryProfiler` owns the steps, the records and the files and asks
its backend only for what differs: starting, a phase's start and end (its PhaseRecord), the budget
check and the breakdown at an out-of-memory error. See docs/profiler.md for the rules.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

import torch

from memprof.categories import CATEGORIES, LOCATIONS, Breakdown, Phase
from memprof.measure import cuda_counters, native
from memprof.measure.allocation_hook_tracker import NativeAllocationTracker
from memprof.measure.dispatch_tracker import (
    DEVICE_ACTIVATIONS,
    DEVICE_OTHER,
    MODEL_STATE_LABELS,
    N_CATEGORIES,
    N_LABELS,
    AllocationTracker,
    device_total,
    label_of,
    live_tensor_storages,
    tally_to_breakdown,
)
from memprof.measure.oom import SimulatedOutOfMemoryError
from memprof.measure.ownership.core import UNNAMED, Owned
from memprof.measure.regions import DEVICE_COMM_BUFFERS, LabelStack, PeakRegions, Remover

CpuTracker = AllocationTracker | NativeAllocationTracker
OwnedMap = Mapping[tuple[str, int], Any]
"""``(device string, untyped-storage data_ptr) -> Owned(category, location, nbytes)``."""
OwnershipWalk = Callable[[], OwnedMap]
Diagnostics = dict[str, Any]

_ACTIVATION_PHASES = (Phase.FORWARD.value, Phase.BACKWARD.value)
# A new storage of at least max(4 KiB, 1/64 of the tracked device bytes at the phase start) gets
# an ownership walk before the phase ends; smaller ones are labelled at the phase end only. The
# fraction bounds the walks per phase (cost) while catching engine buffers and gradients, and it
# is what decides on any real model (1/64 of 256 KiB is 4 KiB); the floor only stops walks after
# every op of a model smaller than that. (It was 1 MiB: on the tests' 2-3 MiB models the reduce
# buckets and the gradients ZeRO-1/2 bucket and free inside backward, 16-330 KB each, kept their
# allocation label, `activations`, at the backward peak: 6-22% of it misnamed.)
_MIN_LARGE_BYTES = 2**12
_LARGE_FRACTION = 64
# how long a phase end gives up the GIL so gloo's worker threads can drop finished collectives'
# buffers (see CpuBackend._let_comm_threads_release); 3 per step
_COMM_RELEASE_WAIT_S = 0.005


PEAK_OWNERS_TOP = 8
"""Owners named per location and category in a phase record's ``peak_owners`` (the largest at the
peak); the rest are summed as :data:`OTHERS`. A per-parameter walk (plain torch, DDP, optimizer
state per parameter) names thousands of owners on a large model: the file keeps at most
PEAK_OWNERS_TOP + 2 entries per category (~10 x 5 model-state categories per phase record), while
what tells ranks apart (ZeRO's flat partitions, buckets, gradient partitions) is one owner each."""
OTHERS = "(others)"
"""The owners beyond the :data:`PEAK_OWNERS_TOP` largest of a category, summed."""


class OwnerIndex:
    """Owner names as small integers for the trackers (which keep bytes per index): index i is the
    owner ``names[i]`` of the storages labelled ``labels[i]``, one index per (label, name), growing
    as walks name new owners (bounded by the model's structure: names are parameters' and engine
    buffers')."""

    def __init__(self) -> None:
        self._of_label: list[dict[str, int]] = [{} for _ in range(N_LABELS)]
        self.labels: list[int] = []
        self.names: list[str] = []

    def __call__(self, label: int, name: str) -> int:
        i = self._of_label[label].get(name)
        return self._add(label, name) if i is None else i

    def _add(self, label: int, name: str) -> int:
        i = self._of_label[label][name] = len(self.names)
        self.labels.append(label)
        self.names.append(name or UNNAMED)
        return i


class OwnedTally(NamedTuple):
    tally: list[int]  # label-indexed bytes of owned storages
    labels: dict[tuple[str, int], int]  # storage key -> label
    nbytes: dict[tuple[str, int], int]  # storage key -> bytes
    owners: dict[tuple[str, int], int]  # storage key -> owner index (OwnerIndex)
    owner_bytes: dict[int, int]  # owner index -> bytes


# label_of() validates its pair through the enums on every call; a walk's hundreds of storages use
# this table instead (a pair not in it, e.g. enum members, goes through label_of).
_LABEL_OF_PAIR: dict[tuple[str, str], int] = {(loc, cat): label_of(loc, cat) for loc in LOCATIONS for cat in CATEGORIES}


def tally_owned(owned: OwnedMap, index: OwnerIndex | None = None) -> OwnedTally:
    index = index if index is not None else OwnerIndex()
    tally = [0] * N_LABELS
    labels: dict[tuple[str, int], int] = {}
    nbytes: dict[tuple[str, int], int] = {}
    owners: dict[tuple[str, int], int] = {}
    owner_bytes: dict[int, int] = {}
    of_label = index._of_label  # OwnerIndex.__call__, inlined: hundreds of storages per walk
    for key, o in owned.items():
        label = _LABEL_OF_PAIR.get((o.location, o.category))
        if label is None:
            label = label_of(o.location, o.category)
        n = int(o.nbytes)
        labels[key] = label
        nbytes[key] = n
        tally[label] += n
        name = o.owner if type(o) is Owned else getattr(o, "owner", "")
        owner = of_label[label].get(name)
        if owner is None:
            owner = index._add(label, name)
        owners[key] = owner
        owner_bytes[owner] = owner_bytes.get(owner, 0) + n
    return OwnedTally(tally, labels, nbytes, owners, owner_bytes)


class OwnedTallies:
    """``tally_owned`` of each walk, reused while a walk finds exactly what the last one found
    (most phase ends after the first steps: comparing two maps costs far less than tallying)."""

    def __init__(self, index: OwnerIndex | None = None) -> None:
        self.index = index if index is not None else OwnerIndex()
        self._owned: dict[tuple[str, int], Any] | None = None
        self._tallied: OwnedTally | None = None

    def of(self, owned: OwnedMap) -> OwnedTally:
        if self._tallied is None or owned != self._owned:
            self._owned = dict(owned)
            self._tallied = tally_owned(owned, self.index)
        return self._tallied


def peak_owners_record(owner_bytes: Iterable[tuple[int, int]], index: OwnerIndex, peak: Breakdown) -> dict[str, Any]:
    """A phase record's ``peak_owners`` (memprof.compare.PEAK_OWNERS_KEY): ``{location: {category:
    {owner: bytes}}}`` of every model-state category with bytes at the peak, from the bytes per
    owner index there (``(index, bytes)`` pairs; an index may come twice); the
    :data:`PEAK_OWNERS_TOP` largest owners by name, the rest as :data:`OTHERS`, and the category's
    bytes at the peak no named owner accounts for as :data:`~memprof.measure.ownership.core.UNNAMED`."""
    labels, names = index.labels, index.names
    named: dict[int, dict[str, int]] = {}
    for i, n in owner_bytes:
        if n > 0:
            by_name = named.get(labels[i])
            if by_name is None:
                by_name = named[labels[i]] = {}
            name = names[i]
            by_name[name] = by_name.get(name, 0) + n
    out: dict[str, Any] = {}
    for label in sorted(MODEL_STATE_LABELS):
        location, category = LOCATIONS[label // N_CATEGORIES], CATEGORIES[label % N_CATEGORIES]
        at_peak = int(peak[location][category])
        by_name = named.get(label, {})
        if at_peak <= 0 and not by_name:
            continue
        by_name.pop(UNNAMED, None)  # storages given no name: in the remainder below
        unnamed = max(0, at_peak - sum(by_name.values()))
        ranked = sorted(by_name.items(), key=lambda kv: (-kv[1], kv[0]))
        entry = dict(ranked[:PEAK_OWNERS_TOP])
        if len(ranked) > PEAK_OWNERS_TOP:
            entry[OTHERS] = sum(n for _, n in ranked[PEAK_OWNERS_TOP:])
        if unnamed:
            entry[UNNAMED] = unnamed
        out.setdefault(location, {})[category] = entry
    return out


def _add_tallies(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)]


class Backend(Protocol):
    """What differs between measuring on CPU and on CUDA."""

    def start(self) -> None:
        """``with profiler:`` entered: note (or start tracking) what is alive now."""

    def stop(self) -> None:
        """``with profiler:`` left."""

    def begin_step(self) -> None:
        """A step starts (before its first phase)."""

    def begin_phase(self, phase: str) -> None:
        """A phase starts: open its peak window."""

    def abandon_phase(self) -> None:
        """The phase raised; nothing of it is recorded."""

    def end_phase(self, phase: str) -> dict[str, Any]:
        """The phase ended: its PhaseRecord less ``host_rss_bytes`` (see memprof.runfile)."""

    def over_budget(self, record: dict[str, Any]) -> SimulatedOutOfMemoryError | None:
        """The error to raise after a phase whose record shows the budget was crossed, if any."""

    def translate_error(self, exc: BaseException) -> BaseException:
        """The error a phase raised, as the profiler re-raises it (a budget crossing as
        :class:`SimulatedOutOfMemoryError`)."""

    def oom_state(self, exc: torch.OutOfMemoryError, phase: str | None) -> tuple[Breakdown, int, int | None] | None:
        """(breakdown, total bytes, budget bytes) at an out-of-memory error, or None to record
        nothing. May raise if the ownership walk fails under memory pressure."""


class CpuBackend:
    """Every CPU storage allocation and free: by memprof's allocator hook
    (:class:`~memprof.measure.allocation_hook_tracker.NativeAllocationTracker`, compiled; no Python per
    op) or, where it cannot be built or ``MEMPROF_CPU_TRACKER=dispatch``, by the dispatch-mode
    :class:`~memprof.measure.dispatch_tracker.AllocationTracker`. Both keep the same labelled tally."""

    def __init__(
        self,
        owner_walk: OwnershipWalk,
        diagnostics: Diagnostics,
        *,
        memory_budget: int | None,
        mid_phase_walks: bool,
        multi_rank: bool,
        walks_at_engine_points: bool = False,
        regions: Callable[[LabelStack], Remover] | None = None,
    ) -> None:
        self._owner_walk = owner_walk
        # marks the code regions that allocate transients (memprof.measure.regions): installed
        # when tracking starts, removed when it stops
        self._regions = regions
        self._labels: LabelStack | None = None
        self._remove_regions: Remover | None = None
        self._diagnostics = diagnostics
        self._memory_budget = memory_budget
        # Only a DeepSpeed engine owns buffers that live and die inside one phase (reduce buckets,
        # gathered ZeRO-3 params); a plain model's grads and optimizer state outlive the phase and
        # the phase-end walk labels them at the peak too, so no mid-phase walks there.
        self._mid_phase_walks = mid_phase_walks
        # An engine that says when it is about to free what it owns (FSDP2:
        # ownership.fsdp2.Fsdp2GroupWatch) walks there (walk_if_due), a large allocation only
        # marking a walk as due: one walk per such point, not one per large activation
        self._walks_at_engine_points = walks_at_engine_points
        self._walk_due = False
        self._multi_rank = multi_rank
        self._tallies = OwnedTallies()
        self._last_owners: dict[str, tuple[Any, dict[str, Any]]] = {}  # phase -> (inputs, peak_owners)
        self.tracker: CpuTracker | None = None

    def start(self) -> None:
        # dead reference cycles holding tensors would otherwise be seeded, then "freed"
        # inside some phase whenever the collector happens to run
        gc.collect()
        labels = self._tallies.of(self._owner_walk()).labels
        by_label: dict[int, list[torch.UntypedStorage]] = {}
        for st in live_tensor_storages():
            label = labels.get((str(st.device), st.data_ptr()), DEVICE_OTHER)
            by_label.setdefault(label, []).append(st)

        def started(tracker: CpuTracker) -> CpuTracker:
            for label, storages in by_label.items():
                tracker.seed(storages, label)
            if self._mid_phase_walks:
                tracker.on_large_allocation = self._note_walk_due if self._walks_at_engine_points else self._mid_phase_walk
            tracker.__enter__()
            return tracker

        try:
            self.tracker = started(new_cpu_tracker(self._memory_budget, self._diagnostics, multi_rank=self._multi_rank))
        except native.HookUnavailable as e:  # the hook loaded but cannot be installed here
            self._diagnostics["cpu_tracker"] = f"{AllocationTracker.mechanism} (allocator hook unavailable: {e})"
            self.tracker = started(AllocationTracker(budget_bytes=self._memory_budget))
        self._labels = LabelStack(self.tracker)
        if self._regions is not None:
            self._remove_regions = self._regions(self._labels)

    def stop(self) -> None:
        tracker = self._live_tracker()
        if self._remove_regions is not None:
            self._remove_regions()
            self._remove_regions = None
        tracker.__exit__(None, None, None)
        self._diagnostics["negative_clamps"] += tracker.negative_clamps

    def begin_step(self) -> None:
        # activations are "of the current step": older unowned leftovers become other
        self._live_tracker().relabel_owned({}, {DEVICE_ACTIVATIONS: DEVICE_OTHER}, None)

    def begin_phase(self, phase: str) -> None:
        tracker = self._live_tracker()
        self._close_regions()
        tracker.new_label = DEVICE_ACTIVATIONS if phase in _ACTIVATION_PHASES else DEVICE_OTHER
        # "large" = worth an ownership walk before the phase ends (see tracker.pending)
        tracker.large_bytes = (
            max(_MIN_LARGE_BYTES, tracker.device_total // _LARGE_FRACTION) if self._mid_phase_walks else None
        )
        tracker.reset_peak()

    def abandon_phase(self) -> None:
        tracker = self._live_tracker()
        self._close_regions()
        tracker.new_label = DEVICE_OTHER
        tracker.large_bytes = None

    def end_phase(self, phase: str) -> dict[str, Any]:
        self._let_comm_threads_release()
        tracker = self._live_tracker()
        self._close_regions()
        tracker.new_label = DEVICE_OTHER
        tracker.large_bytes = None
        self._walk_due = False
        extra, extra_owners = self._relabel_from_ownership("peak")
        end_tally = _add_tallies(tracker.tally, extra)
        peak_tally = _add_tallies(tracker.peak.tally, extra)
        peak = tally_to_breakdown(peak_tally)
        # who holds the peak's bytes: the tracker's bytes per owner at the peak moment (kept beside
        # its tally, copied only when owners change after a new peak), and the owned storages it
        # never saw, counted as alive throughout as in the tally
        return {
            "end": tally_to_breakdown(end_tally),
            "peak": peak,
            "peak_total": device_total(peak_tally),
            "end_total": device_total(end_tally),
            "peak_owners": self._peak_owners(phase, tracker.peak_owners(), extra_owners, peak_tally, peak),
        }

    def _peak_owners(self, phase: str, at_peak: list[int], extra: dict[int, int], peak_tally: list[int],
                     peak: Breakdown) -> dict[str, Any]:
        """:func:`peak_owners_record`, kept per phase for the next step whose peak has the same
        owners and bytes (most steps after the first): comparing costs less than ranking again."""
        key = (at_peak, extra, peak_tally)
        last = self._last_owners.get(phase)
        if last is None or last[0] != key:
            owners = itertools.chain(enumerate(at_peak), extra.items())
            last = self._last_owners[phase] = (key, peak_owners_record(owners, self._tallies.index, peak))
        return {loc: {cat: dict(by_owner) for cat, by_owner in cats.items()} for loc, cats in last[1].items()}

    def over_budget(self, record: dict[str, Any]) -> SimulatedOutOfMemoryError | None:
        return None  # the tracker raises from inside the allocation that crosses the budget

    def translate_error(self, exc: BaseException) -> BaseException:
        """The allocator hook raises a plain ``torch.OutOfMemoryError`` from C++ at the budget:
        the profiler re-raises it as :class:`SimulatedOutOfMemoryError`."""
        tracker = self.tracker
        translated = tracker.simulated_oom(exc) if tracker is not None else None
        return translated if translated is not None else exc

    def oom_state(self, exc: torch.OutOfMemoryError, phase: str | None) -> tuple[Breakdown, int, int | None] | None:
        tracker = self.tracker
        if not isinstance(exc, SimulatedOutOfMemoryError) or tracker is None or tracker.oom is None:
            return None
        extra, _ = self._relabel_from_ownership("oom")
        snap = tracker.oom
        assert snap is not None
        tally = _add_tallies(snap.tally, extra)
        return tally_to_breakdown(tally), exc.total_bytes, exc.budget_bytes

    # ---- internals ------------------------------------------------------------------------
    def _close_regions(self) -> None:
        """Forget label regions an exception left open (their labels are reset with the phase's)."""
        if self._labels is not None:
            self._labels.clear()

    def _live_tracker(self) -> AllocationTracker:
        assert self.tracker is not None, "CpuBackend.start() was not called"
        return self.tracker

    def _let_comm_threads_release(self) -> None:
        """A sync point in multi-rank runs. gloo completes a collective on its own worker thread,
        which drops its references to the buffers (e.g. ZeRO's flat all-reduce copy, a reduce
        bucket) only once it gets the GIL; until then a buffer DeepSpeed has already released is
        still alive, at a random rank and step, and would be counted in this phase's end and the
        next phase's peak. Giving up the GIL briefly lets those threads finish."""
        if self._multi_rank:
            time.sleep(_COMM_RELEASE_WAIT_S)

    def _relabel_from_ownership(self, snapshot: str) -> tuple[list[int], dict[int, int]]:
        """Relabel the tracker's live storages (and give them their owners) from a fresh ownership
        walk, fixing ``snapshot`` ("peak" or "oom"). Returns the label tally, and the bytes per
        owner index, of owned storages the tracker does not hold (counted as alive throughout;
        should be empty)."""
        tracker = self._live_tracker()
        owned = self._tallies.of(self._owner_walk())
        # a model state nobody owns any more (e.g. a dropped buffer) becomes other
        unowned = {label: DEVICE_OTHER for label in MODEL_STATE_LABELS}
        missing_keys = tracker.relabel_owned(owned.labels, unowned, snapshot, owned.owners)
        extra = [0] * N_LABELS
        extra_owners: dict[int, int] = {}
        missing = 0
        for key in missing_keys:
            # owned but never seen allocated (made outside the tracker's sight before tracking
            # could see it): counted from the walk's size, as if alive for the whole phase
            n = owned.nbytes[key]
            extra[owned.labels[key]] += n
            extra_owners[owned.owners[key]] = extra_owners.get(owned.owners[key], 0) + n
            missing += n
        if missing > self._diagnostics["untracked_owned_bytes_max"]:
            self._diagnostics["untracked_owned_bytes_max"] = missing
        return extra, extra_owners

    def _mid_phase_walk(self) -> None:
        self._walk_due = False
        self._diagnostics["mid_phase_walks"] += 1
        owned = self._tallies.of(self._owner_walk())
        self._live_tracker().relabel_pending(owned.labels, owned.owners)

    def _note_walk_due(self) -> None:
        self._walk_due = True

    def walk_if_due(self) -> None:
        """An ownership walk if a large storage came since the last one (``walks_at_engine_points``:
        called at the engine's own moments, before it frees a buffer it owns)."""
        if self._walk_due and self.tracker is not None and self.tracker.large_bytes is not None:
            self._mid_phase_walk()


def new_cpu_tracker(budget_bytes: int | None, diagnostics: Diagnostics, *, multi_rank: bool = False) -> CpuTracker:
    """The CPU tracker; ``diagnostics["cpu_tracker"]`` says which, and why.

    ``MEMPROF_CPU_TRACKER`` (allocator / dispatch) decides when set. Otherwise the allocator hook
    wherever it loads, single-process and multi-rank runs alike (``multi_rank`` no longer decides:
    the rank aborts at exit that once made multi-rank runs fall back were gloo's, with either
    tracker, and are fixed in memprof.run_teardown); the dispatch-mode tracker where it does not."""
    choice = native.requested()
    if choice == "dispatch":
        diagnostics["cpu_tracker"] = f"{AllocationTracker.mechanism} ({native.TRACKER_ENV}=dispatch)"
        return AllocationTracker(budget_bytes=budget_bytes)
    try:
        tracker: CpuTracker = NativeAllocationTracker(budget_bytes=budget_bytes)
        diagnostics["cpu_tracker"] = tracker.mechanism
        return tracker
    except native.HookUnavailable as e:
        diagnostics["cpu_tracker"] = f"{AllocationTracker.mechanism} (allocator hook unavailable: {e})"
        return AllocationTracker(budget_bytes=budget_bytes)


class CudaBackend:
    """The caching allocator's counters per phase; unowned bytes split into activations/other."""

    def __init__(self, device: torch.device, owner_walk: OwnershipWalk, diagnostics: Diagnostics,
                 *, memory_budget: int | None, regions: Callable[[PeakRegions], Remover] | None = None) -> None:
        self._device = device
        # the labelled regions (memprof.measure.regions), as counters: which one the peak was in
        self._regions = regions
        self._peaks = PeakRegions(lambda: cuda_counters.allocated_and_peak(self._device))
        self._remove_regions: Remover | None = None
        self._owned_before = 0  # owned device bytes at the previous phase end
        self._owner_walk = owner_walk
        self._diagnostics = diagnostics
        self._memory_budget = memory_budget
        self._tallies = OwnedTallies()
        self._unowned_baseline = 0  # unowned allocated bytes at the step start
        self._backward_activations = 0  # activations at the end of backward

    def start(self) -> None:
        owned = self._tallies.of(self._owner_walk())
        self._owned_before = device_total(owned.tally)
        self._unowned_baseline = max(0, torch.cuda.memory_allocated(self._device) - self._owned_before)
        if self._regions is not None:
            self._remove_regions = self._regions(self._peaks)

    def stop(self) -> None:
        if self._remove_regions is not None:
            self._remove_regions()
            self._remove_regions = None

    def begin_step(self) -> None:
        pass  # the baseline of unowned bytes is taken at the end of the previous step

    def begin_phase(self, phase: str) -> None:
        cuda_counters.start_phase(self._device)
        self._peaks.clear()

    def abandon_phase(self) -> None:
        pass

    def end_phase(self, phase: str) -> dict[str, Any]:
        counters = cuda_counters.read(self._device)
        owned = self._tallies.of(self._owner_walk())
        end = self._breakdown(owned.tally, counters["allocated_bytes"], phase)
        peak = self._breakdown(owned.tally, counters["peak_allocated_bytes"], phase, self._peak_layers(owned.tally, counters))
        # the owned states at the peak are the walk's at the phase end (as in the breakdown above):
        # their owners likewise; bytes a labelled region adds are unnamed
        self._peaks.clear()
        self._owned_before = device_total(owned.tally)
        if phase == Phase.BACKWARD.value:
            self._backward_activations = end["device"]["activations"]
        if phase == Phase.STEP.value:
            # the next step starts from what is left unowned now
            self._unowned_baseline = max(0, counters["allocated_bytes"] - device_total(owned.tally))
        return {
            "end": end,
            "peak": peak,
            "peak_total": counters["peak_allocated_bytes"],
            "end_total": counters["allocated_bytes"],
            "peak_owners": peak_owners_record(owned.owner_bytes.items(), self._tallies.index, peak),
            "cuda": counters,
        }

    def over_budget(self, record: dict[str, Any]) -> SimulatedOutOfMemoryError | None:
        # The budget is checked against the allocator's peak at the phase end: the phase did
        # reach that many bytes, so a GPU of this capacity would have failed in it.
        if self._memory_budget is not None and record["peak_total"] > self._memory_budget:
            return SimulatedOutOfMemoryError(None, record["peak_total"], self._memory_budget)
        return None

    def translate_error(self, exc: BaseException) -> BaseException:
        return exc

    def oom_state(self, exc: torch.OutOfMemoryError, phase: str | None) -> tuple[Breakdown, int, int | None] | None:
        allocated = torch.cuda.memory_allocated(self._device)
        owned = self._tallies.of(self._owner_walk())
        breakdown = self._breakdown(owned.tally, allocated, phase or Phase.STEP.value)
        return breakdown, allocated, self._memory_budget or cuda_counters.device_capacity(self._device)

    def _peak_layers(self, owned_tally: list[int], counters: dict[str, int]) -> dict[int, int]:
        """The bytes each labelled region had added when the phase peaked, when it peaked inside one
        (PeakRegions), less the owned bytes the phase added (e.g. Adam's state born in the first
        step: already counted from the walk), taken from the innermost region first."""
        if self._peaks.peak != counters["peak_allocated_bytes"]:
            return {}
        born = max(0, device_total(owned_tally) - self._owned_before)
        layers: dict[int, int] = {}
        for label, n in self._peaks.layers.items():
            if label >= N_CATEGORIES:
                continue  # an offloaded optimizer's region: its working memory is not on the GPU
            # the all-reduce region's bytes are its flat copy, which no walk owns: the owned bytes
            # the phase grew by (backward's .grad, born before the all-reduce) are not in it
            taken = 0 if label == DEVICE_COMM_BUFFERS else min(n, born)
            born -= taken
            layers[label] = n - taken
        return layers

    def _breakdown(self, owned_tally: list[int], allocated: int, phase: str,
                   region_layers: dict[int, int] | None = None) -> Breakdown:
        """Owned states by category; the allocated bytes nobody owns go first to the labelled
        region the peak was reached in (``region_layers``), the rest split into activations (what
        grew since the step start) and other (what was there before). See docs/profiler.md."""
        tally = list(owned_tally)
        unowned = allocated - device_total(owned_tally)
        if unowned < 0:
            self._diagnostics["negative_clamps"] += 1
            unowned = 0
        for label, n in (region_layers or {}).items():
            named = min(n, unowned, max(0, unowned - self._unowned_baseline))
            tally[label] += named
            unowned -= named
        activations = max(0, unowned - self._unowned_baseline)
        if phase == Phase.STEP.value:
            activations = min(activations, self._backward_activations)
        tally[DEVICE_ACTIVATIONS] += activations
        tally[DEVICE_OTHER] += unowned - activations
        return tally_to_breakdown(tally)
