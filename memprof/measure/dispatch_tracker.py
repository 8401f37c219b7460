"""Allocation tracking on CPU by a dispatch mode: every tensor storage created and freed while tracking
is on (the fallback of memprof/measure/allocation_hook_tracker.py: no C++ compiler, or MEMPROF_CPU_TRACKER=dispatch).

CPU tensors have no caching allocator with counters, so the tracker sees memory the way PyTorch's
MemTracker does: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` looks at the output
storages of every aten op (factory ops such as ``aten.empty`` included, from Python or C++), and a
weak reference on each new :class:`torch.UntypedStorage` reports its free the moment the storage
dies. Views share their storage's Python object (PyTorch preserves it), so a view adds nothing.

Every live storage carries a *label*: one (location, category) pair of :mod:`memprof.categories`.
The tracker keeps a running tally of live bytes per label, so the breakdown at any moment is a
list copy; it copies that list only when the device total reaches a new peak. Labels of new
storages come from :attr:`AllocationTracker.new_label` (the profiler sets it per phase); the
profiler corrects them at phase boundaries from the ownership walk (:meth:`relabel`).

The hot path (one Python call per aten op) does a dict lookup per output and, for a new storage,
creates one weak reference. Nothing else: no stack walks, no per-op copies.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.categories import CATEGORIES, LOCATIONS, Breakdown, Category, Location
from memprof.measure.oom import SimulatedOutOfMemoryError

N_CATEGORIES = len(CATEGORIES)
N_LABELS = len(LOCATIONS) * N_CATEGORIES


def label_of(location: str, category: str) -> int:
    """The tally index of a (location, category) pair; device labels are 0 .. N_CATEGORIES-1."""
    return LOCATIONS.index(str(Location(location).value)) * N_CATEGORIES + CATEGORIES.index(
        str(Category(category).value)
    )


DEVICE_ACTIVATIONS = label_of("device", "activations")
DEVICE_OTHER = label_of("device", "other")
MODEL_STATE_LABELS = frozenset(
    label_of(loc, cat)
    for loc in LOCATIONS
    for cat in ("params", "master_params", "grads", "optimizer_state", "comm_buffers")
)


def tally_to_breakdown(tally: list[int]) -> Breakdown:
    """``{location: {category: bytes}}`` from a label-indexed tally (negative entries clamped)."""
    return {
        loc: {cat: max(0, int(tally[li * N_CATEGORIES + ci])) for ci, cat in enumerate(CATEGORIES)}
        for li, loc in enumerate(LOCATIONS)
    }


def device_total(tally: list[int]) -> int:
    return sum(max(0, v) for v in tally[:N_CATEGORIES])


class _Live(weakref.ref):
    """A weak reference to one live storage that also carries what the tracker knows of it."""

    __slots__ = ("key", "nbytes", "label", "seq", "owner")

    key: int
    nbytes: int
    label: int
    seq: int
    owner: int  # its owner's index (the profiler's OwnerIndex), -1 for none


@dataclass
class Snapshot:
    """The tally at one moment (a peak, or the allocation that crossed the budget) and the
    allocation sequence number of that moment: a storage with ``seq <= snapshot.seq`` that is still
    alive later was alive then too."""

    tally: list[int]
    seq: int

    @property
    def device_total(self) -> int:
        return device_total(self.tally)


class AllocationTracker(TorchDispatchMode):
    """Live bytes per label of every CPU tensor storage, with the peak of the device total.

    Use as a context manager (it is a dispatch mode). ``seed`` it first with the storages that
    exist already, or their bytes are unknown to it and a free of one is ignored.
    ``budget_bytes``: raise :class:`SimulatedOutOfMemoryError` from the allocation that takes the
    device total above it.
    """

    mechanism = "dispatch mode"

    def __init__(self, budget_bytes: int | None = None) -> None:
        super().__init__()
        self.budget_bytes = budget_bytes
        self.live: dict[int, _Live] = {}  # id(UntypedStorage) -> its record
        self.tally: list[int] = [0] * N_LABELS
        self.device_total = 0
        self.seq = 0
        self.new_label = DEVICE_OTHER
        self.peak = Snapshot(list(self.tally), 0)
        self.peak_total = 0
        # Bytes per owner (an index the profiler gives at its walks), and their copy at the peak.
        # Only walks and the frees of owned storages change them, never a new allocation (it has no
        # owner yet), so the copy is taken lazily: at the first owner change after a new peak
        # (`_owner_peak_of` is then not `self.peak`), never per allocation.
        self.owner_tally: list[int] = []
        self._owner_peak: list[int] = []
        self._owner_peak_of: Snapshot | None = None
        self.oom: Snapshot | None = None
        self.negative_clamps = 0  # times a tally would have gone below zero (should stay 0)
        # Large new storages wait here for an ownership walk before their phase ends: a buffer an
        # engine allocates and frees inside one phase (a reduce bucket, a gradient) would
        # otherwise keep the phase's default label at the peak. ``on_large_allocation`` (set by
        # the profiler) runs at the op after one, when the owner has attached it.
        self.large_bytes: int | None = None
        self.pending: list[_Live] = []
        self.on_large_allocation: Callable[[], None] | None = None
        self._walk_due = False
        self._free_cb = self._on_free

    # ---- hot path -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if self._walk_due:
            # one op after a large allocation: its owner (if any) has attached it by now
            self._walk_due = False
            if self.on_large_allocation is not None:
                self.on_large_allocation()
        out = func(*args, **kwargs) if kwargs else func(*args)
        if isinstance(out, torch.Tensor):
            self._see(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self._see(o)
        return out

    def _see(self, t: torch.Tensor) -> None:
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            # a DTensor (FSDP2's sharded params, their grads, the optimizer's state and its
            # temporaries): the mode sees the DTensor op only, so count its local tensor's storage
            local = getattr(t, "_local_tensor", None)
            if isinstance(local, torch.Tensor):
                t = local
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse / nested / functional wrappers: no plain storage to count
        rec = self.live.get(id(st))
        if rec is not None:
            n = st.nbytes()
            if n != rec.nbytes:  # resize_ / out= grew or shrank a storage we already count
                self._resize(rec, n)
            return
        n = st.nbytes()
        try:
            ptr = st.data_ptr()
        except RuntimeError:
            return  # a wrapper subclass (DTensor): its local tensor's ops are seen on their own
        if n == 0 or ptr == 0:
            return  # empty or meta: holds no memory (a later resize is seen as a new storage)
        self._add(st, n, self.new_label)

    def _add(self, st: torch.UntypedStorage, n: int, label: int) -> None:
        self.seq += 1
        rec = _Live(st, self._free_cb)
        rec.key = id(st)
        rec.nbytes = n
        rec.label = label
        rec.seq = self.seq
        rec.owner = -1
        self.live[rec.key] = rec
        self.tally[label] += n
        if self.large_bytes is not None and n >= self.large_bytes:
            self.pending.append(rec)
            self._walk_due = True
        if label < N_CATEGORIES:
            self.device_total += n
            if self.device_total > self.peak_total:
                self.peak_total = self.device_total
                self.peak = Snapshot(self.tally.copy(), self.seq)
            if self.budget_bytes is not None and self.device_total > self.budget_bytes and self.oom is None:
                self.oom = Snapshot(self.tally.copy(), self.seq)
                raise SimulatedOutOfMemoryError(
                    requested_bytes=n, total_bytes=self.device_total, budget_bytes=self.budget_bytes
                )

    def _on_free(self, rec: _Live) -> None:
        if self.live.pop(rec.key, None) is None:
            return
        if rec.owner >= 0:
            self._owner_add(rec.owner, -rec.nbytes, False)
        self._sub(rec.label, rec.nbytes)

    def _sub(self, label: int, n: int) -> None:
        v = self.tally[label] - n
        if v < 0:
            self.negative_clamps += 1
            n += v
            v = 0
        self.tally[label] = v
        if label < N_CATEGORIES:
            self.device_total -= n

    def resync(self, st: torch.UntypedStorage, label: int = DEVICE_OTHER) -> None:
        """A storage FSDP2 has just resized or made, whose bytes are ``label``'s
        (ownership.fsdp2.StorageResizeWatch: a gathered parameter after ``free_storage`` /
        ``alloc_storage``, which resize it with ``UntypedStorage.resize_``, outside any dispatched op;
        a flat all-gather output after ``foreach_all_gather``). Its new size is counted, under
        ``label`` while it has bytes: one grown from empty is a new block (a new sequence number,
        as an allocation gets: it was not alive at a peak taken before), one counted already (made
        by an op this mode saw, under the phase's label) moves to ``label``, in the peak and the
        OOM snapshot too; one not counted yet (empty when tracking started) is counted from now on."""
        rec = self.live.get(id(st))
        n = st.nbytes()
        if rec is None:
            if n and st.data_ptr():
                self._add(st, n, label)
            return
        if rec.nbytes == 0 and n:
            # re-gathered after a reshard: made now, under ``label`` (no owner yet, as any new block;
            # an empty storage adds no bytes to the owner it had)
            self.seq += 1
            rec.seq, rec.label, rec.owner = self.seq, label, -1
        if n != rec.nbytes:
            self._resize(rec, n)
        if n and rec.label != label:
            self._move(rec, label, [self.peak] if self.oom is None else [self.peak, self.oom])

    def _resize(self, rec: _Live, n: int) -> None:
        delta = n - rec.nbytes
        if rec.owner >= 0:
            self._owner_add(rec.owner, delta, False)
        rec.nbytes = n
        if delta < 0:
            self._sub(rec.label, -delta)
            return
        self.tally[rec.label] += delta
        if rec.label < N_CATEGORIES:
            self.device_total += delta
            if self.device_total > self.peak_total:
                self.peak_total = self.device_total
                self.peak = Snapshot(self.tally.copy(), self.seq)

    # ---- boundaries (cold path) ------------------------------------------------------------
    def seed(self, storages: Iterable[torch.UntypedStorage], label: int = DEVICE_OTHER) -> int:
        """Count storages that exist already under ``label`` (those already counted are skipped).
        Returns the bytes added."""
        added = 0
        for st in storages:
            if id(st) in self.live:
                continue
            n = st.nbytes()
            if n == 0 or st.data_ptr() == 0:
                continue
            self.seq += 1
            rec = _Live(st, self._free_cb)
            rec.key, rec.nbytes, rec.label, rec.seq, rec.owner = id(st), n, label, self.seq, -1
            self.live[rec.key] = rec
            self.tally[label] += n
            if label < N_CATEGORIES:
                self.device_total += n
            added += n
        self.reset_peak()
        return added

    def reset_peak(self) -> None:
        """Start a new peak window at the current moment (a phase start)."""
        self.peak_total = self.device_total
        self.peak = Snapshot(self.tally.copy(), self.seq)

    def relabel(
        self,
        label_for: Callable[[tuple[str, int], _Live], int],
        snapshots: Iterable[Snapshot] = (),
        owner_for: Callable[[tuple[str, int], _Live, int], int] | None = None,
    ) -> set[tuple[str, int]]:
        """Give every live storage the label ``label_for((device, data_ptr), record)`` returns
        (and the owner ``owner_for(key, record, new label)`` returns; without it, a storage whose
        label changes loses its owner).

        A storage whose label changes and that was alive at a snapshot (its ``seq`` is at most the
        snapshot's) moves its bytes in that snapshot too, so the peak's breakdown names what the
        bytes turned out to be (e.g. gradients born in backward); so does its owner at the peak.
        Sizes changed outside dispatch (``UntypedStorage.resize_``) are picked up here. Returns the
        keys of the live storages.
        """
        snapshots = list(snapshots)
        fix_peak = any(snap is self.peak for snap in snapshots)
        keys: set[tuple[str, int]] = set()
        for rec in list(self.live.values()):
            st = rec()
            if st is None:
                continue
            n = st.nbytes()
            if n != rec.nbytes:
                self._resize(rec, n)
            key = (str(st.device), st.data_ptr())
            keys.add(key)
            new = label_for(key, rec)
            owner = owner_for(key, rec, new) if owner_for is not None else (rec.owner if new == rec.label else -1)
            if owner != rec.owner:
                self._set_owner(rec, owner, fix_peak)
            if new != rec.label:
                self._move(rec, new, snapshots)
        self.pending.clear()
        return keys

    def relabel_owned(self, owned_labels: Mapping[tuple[str, int], int], unowned: Mapping[int, int],
                      snapshot: str | None, owners: Mapping[tuple[str, int], int] | None = None) -> set[tuple[str, int]]:
        """Owned storages (keys of ``owned_labels``) take their owner's label, and their owner's
        index from ``owners`` (-1 where it has none); an unowned one whose label is a key of
        ``unowned`` takes the mapped label (and loses its owner); ``snapshot`` ("peak", "oom" or
        None) is fixed for the storages alive at it. Returns the owned keys not live here.
        (The interface the profiler's CPU backend uses, shared with the allocator hook.)"""
        snaps = {"peak": [self.peak], "oom": [self.oom] if self.oom is not None else []}.get(snapshot or "", [])

        def label_for(key: tuple[str, int], rec: _Live) -> int:
            label = owned_labels.get(key)
            return label if label is not None else unowned.get(rec.label, rec.label)

        def owner_for(key: tuple[str, int], rec: _Live, label: int) -> int:
            if key in owned_labels:
                return owners.get(key, -1) if owners is not None else -1
            return rec.owner if label == rec.label else -1

        live = self.relabel(label_for, snaps, owner_for)
        return {key for key in owned_labels if key not in live}

    # ---- owners ------------------------------------------------------------------------------
    def peak_owners(self) -> list[int]:
        """Bytes per owner index at the current peak (an index past the end: 0)."""
        return list(self._owner_peak if self._owner_peak_of is self.peak else self.owner_tally)

    def _freeze_owner_peak(self) -> None:
        """Before the owners change: keep their bytes at the peak, if a new peak came since the last change."""
        if self._owner_peak_of is not self.peak:
            self._owner_peak = self.owner_tally.copy()
            self._owner_peak_of = self.peak

    def _owner_add(self, owner: int, delta: int, at_peak_too: bool) -> None:
        """``delta`` bytes to ``owner``; ``at_peak_too``: a storage alive at the peak changes
        owner, so the peak's owners change as well."""
        if at_peak_too:
            if self._owner_peak_of is self.peak:  # a copy was taken: it changes too
                if owner >= len(self._owner_peak):
                    self._owner_peak.extend([0] * (owner + 1 - len(self._owner_peak)))
                self._owner_peak[owner] += delta
            # else no owner changed since the peak: its owners are the tally's, changed below
        else:
            self._freeze_owner_peak()
        if owner >= len(self.owner_tally):
            self.owner_tally.extend([0] * (owner + 1 - len(self.owner_tally)))
        self.owner_tally[owner] += delta

    def _set_owner(self, rec: _Live, owner: int, fix_peak: bool) -> None:
        at_peak = fix_peak and rec.seq <= self.peak.seq
        if rec.owner >= 0:
            self._owner_add(rec.owner, -rec.nbytes, at_peak)
        if owner >= 0:
            self._owner_add(owner, rec.nbytes, at_peak)
        rec.owner = owner

    def simulated_oom(self, exc: BaseException) -> SimulatedOutOfMemoryError | None:
        """This tracker raises :class:`SimulatedOutOfMemoryError` itself: nothing to translate."""
        return None

    def relabel_pending(self, owned_labels: Mapping[tuple[str, int], int],
                        owners: Mapping[tuple[str, int], int] | None = None) -> None:
        """Label the large storages allocated since the last walk that have an owner now (their
        key is in ``owned_labels``; their owner's index in ``owners``), in the tally and in the
        current peak. Those without an owner yet stay pending until the next walk or the phase end."""
        still: list[_Live] = []
        for rec in self.pending:
            st = rec()
            if st is None or rec.key not in self.live:
                continue  # freed already: it keeps its label
            key = (str(st.device), st.data_ptr())
            new = owned_labels.get(key)
            if new is None:
                still.append(rec)
                continue
            owner = owners.get(key, -1) if owners is not None else -1
            if owner != rec.owner:
                self._set_owner(rec, owner, True)
            if new != rec.label:
                self._move(rec, new, [self.peak])
        self.pending = still

    def _move(self, rec: _Live, new: int, snapshots: Iterable[Snapshot]) -> None:
        """Move one live storage's bytes to label ``new``, also in the snapshots it was alive at."""
        self._sub(rec.label, rec.nbytes)
        self.tally[new] += rec.nbytes
        if new < N_CATEGORIES:
            self.device_total += rec.nbytes
        for snap in snapshots:
            if rec.seq <= snap.seq:
                snap.tally[rec.label] = max(0, snap.tally[rec.label] - rec.nbytes)
                snap.tally[new] += rec.nbytes
        rec.label = new
        if self.device_total > self.peak_total:  # a host->device move can raise the total
            self.peak_total = self.device_total
            self.peak = Snapshot(self.tally.copy(), self.seq)


def live_tensor_storages() -> list[torch.UntypedStorage]:
    """Every distinct CPU storage held by a tensor the garbage collector can see (one-time seed).

    Tensors are GC-tracked objects, so this finds parameters, buffers, optimizer state and
    DeepSpeed's flat buffers alike; storages reachable only from C++ (none of those above) are
    missed and show up later only if an op outputs them.
    """
    seen: dict[int, torch.UntypedStorage] = {}
    with warnings.catch_warnings():
        # isinstance() on some module-level objects (deprecated torch.distributed aliases) warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                    continue
                st = obj.untyped_storage()
                st.data_ptr()  # a wrapper subclass (DTensor) has no storage of its own: its local tensor does
            except Exception:  # noqa: BLE001 - exotic tensor subclasses may refuse storage access
                continue
            seen.setdefault(id(st), st)
    return list(seen.values())
