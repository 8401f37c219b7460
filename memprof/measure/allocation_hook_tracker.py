"""Allocation tracking on CPU through memprof's compiled allocator hook (the default).

The same bookkeeping as :class:`memprof.measure.dispatch_tracker.AllocationTracker` (labels, running tally,
peak snapshot, budget, pending large allocations), kept in C++ inside a wrapper around c10's CPU
allocator (``memprof/measure/native/allocation_hook.cpp``), so nothing runs in Python per aten op.
What differs from the dispatch-mode tracker, by mechanism:

* it counts what the allocator hands out on the thread that started tracking: a kernel's own
  temporary tensors and wrapped Python scalars too (a dispatch mode sees op outputs only); like
  the (thread-local) dispatch mode it leaves out blocks other threads allocate, such as gloo's
  staging buffers for a collective, which NCCL on a GPU does not need; frees count on any thread;
* storages that existed before tracking started are *seeded* from Python; their frees are seen
  through a weak reference on the storage, since their deleter is not the hook's.

Only one tracker of this kind can be active in a process (it replaces the process's CPU allocator
while active).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping

import torch

from memprof.measure.dispatch_tracker import DEVICE_OTHER, N_CATEGORIES, N_LABELS, Snapshot
from memprof.measure.native import HookUnavailable, load
from memprof.measure.oom import SimulatedOutOfMemoryError

_OOM_PREFIX = "memprof simulated out of memory"


class NativeAllocationTracker:
    """Live bytes per label of every CPU allocation, with the peak of the device total."""

    mechanism = "allocator hook"

    def __init__(self, budget_bytes: int | None = None) -> None:
        self._hook = load()
        self.budget_bytes = budget_bytes
        self.on_large_allocation: Callable[[], None] | None = None
        self._new_label = DEVICE_OTHER
        self._large_bytes: int | None = None
        self._active = False
        # seeded storages: data_ptr -> (weak reference, seq, nbytes); id(storage) -> that data_ptr
        self._seeded: dict[int, tuple[weakref.ref, int, int]] = {}
        self._seeded_ptr: dict[int, int] = {}
        # seeded storages resized to 0 in place, which may grow again (FSDP2's free_storage /
        # alloc_storage): id(storage) -> (weak reference, the label to seed it with again)
        self._emptied: dict[int, tuple[weakref.ref, int]] = {}
        self._pending_seeds: list[tuple[torch.UntypedStorage, int]] = []
        # the hook's {pointer: value} of the last owned_labels / owners mappings passed: the
        # profiler passes the same dicts again while its walks find the same storages
        self._blocks = [_BlocksOf(), _BlocksOf()]

    # ---- the context ----------------------------------------------------------------------
    def __enter__(self) -> NativeAllocationTracker:
        budget = -1 if self.budget_bytes is None else int(self.budget_bytes)
        if self._hook.start(N_LABELS, N_CATEGORIES, budget, self.on_large_allocation) is False:
            raise HookUnavailable("another CPU allocator of higher priority is installed")
        self._active = True
        self._hook.set_new_label(self._new_label)
        for st, label in self._pending_seeds:
            self._seed_one(st, label)
        self._pending_seeds.clear()
        self._hook.reset_peak()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._hook.stop()
        self._active = False
        return False

    # ---- state -----------------------------------------------------------------------------
    @property
    def tally(self) -> list[int]:
        return list(self._hook.state()[0])

    @property
    def device_total(self) -> int:
        return int(self._hook.state()[1])

    @property
    def negative_clamps(self) -> int:
        return int(self._hook.state()[3])

    @property
    def untracked_allocations(self) -> int:
        return int(self._hook.state()[4])

    @property
    def peak(self) -> Snapshot:
        tally, seq, _ = self._hook.peak()
        return Snapshot(list(tally), int(seq))

    @property
    def peak_total(self) -> int:
        return int(self._hook.peak()[2])

    @property
    def oom(self) -> Snapshot | None:
        got = self._hook.oom()
        return None if got is None else Snapshot(list(got[0]), int(got[1]))

    @property
    def new_label(self) -> int:
        return self._new_label

    @new_label.setter
    def new_label(self, label: int) -> None:
        self._new_label = int(label)
        if self._active:
            self._hook.set_new_label(self._new_label)

    @property
    def large_bytes(self) -> int | None:
        return self._large_bytes

    @large_bytes.setter
    def large_bytes(self, n: int | None) -> None:
        self._large_bytes = n
        self._hook.set_large_bytes(-1 if n is None else int(n))

    def reset_peak(self) -> None:
        self._hook.reset_peak()

    # ---- seeding ---------------------------------------------------------------------------
    def seed(self, storages: Iterable[torch.UntypedStorage], label: int = DEVICE_OTHER) -> int:
        """Count storages that exist already under ``label`` (counted from ``__enter__`` on when
        called before it). Returns the bytes added."""
        added = 0
        for st in storages:
            n = st.nbytes()
            if n == 0 or st.data_ptr() == 0:
                continue
            if self._active:
                added += n if self._seed_one(st, label) else 0
            else:
                self._pending_seeds.append((st, label))
                added += n
        return added

    def _seed_one(self, st: torch.UntypedStorage, label: int) -> bool:
        ptr, n = st.data_ptr(), st.nbytes()
        seq = self._hook.seed(ptr, n, label)
        if not seq:
            return False
        hook, key = self._hook, id(st)

        def freed(_ref: weakref.ref, ptr: int = ptr, seq: int = seq) -> None:
            hook.forget(ptr, seq)
            if self._seeded.pop(ptr, None) is not None and self._seeded_ptr.get(key) == ptr:
                del self._seeded_ptr[key]

        self._seeded[ptr] = (weakref.ref(st, freed), seq, n)
        self._seeded_ptr[key] = ptr
        return True

    def _refresh_seeded(self) -> None:
        """Seeded storages resized in place since (``UntypedStorage.resize_`` through the allocator
        each was made with, not the hook): follow their new size and pointer, under the label each had."""
        for ref, _, _ in list(self._seeded.values()):
            st = ref()
            if st is not None:
                self._follow(st, DEVICE_OTHER, named=False)
        for ref, _ in list(self._emptied.values()):
            st = ref()
            if st is not None and st.nbytes():
                self._follow(st, DEVICE_OTHER, named=False)

    def resync(self, st: torch.UntypedStorage, label: int = DEVICE_OTHER) -> None:
        """A storage FSDP2 has just resized in place or made, whose bytes are ``label``'s
        (ownership.fsdp2.StorageResizeWatch: a gathered parameter after ``free_storage`` /
        ``alloc_storage``, a flat all-gather output after ``foreach_all_gather``).

        ``UntypedStorage.resize_`` goes through the allocator the storage was made with: not the
        hook for one made before tracking started (a model that trained before the profiler
        started, or a root FSDP2 gathered in the forward that started it). Such a block is invisible
        to the hook: its old block is forgotten and its new one counted, with the peak. A block the
        hook allocated itself is counted already, but under the label open when it was allocated
        (``activations`` in forward), and FSDP2 frees a re-gathered block (reshard) before any walk
        can name it: it takes ``label`` here, in the peak too (the hook's ``label_block``)."""
        self._follow(st, label, named=True)

    def _follow(self, st: torch.UntypedStorage, label: int, named: bool) -> None:
        """Follow ``st``'s block; ``named``: its bytes are ``label``'s, else those of the label it had."""
        key = id(st)
        ptr, n = st.data_ptr(), st.nbytes()
        old_ptr = self._seeded_ptr.get(key)
        if old_ptr is not None:
            ref, seq, old_n = self._seeded[old_ptr]
            if old_ptr == ptr and old_n == n:
                if named and n:
                    self._hook.label_block(ptr, label)
                return
            if old_ptr == ptr and n and not named:
                self._hook.resize_seeded(ptr, seq, n)
                self._seeded[ptr] = (ref, seq, n)
                return
            # named and resized: the block made now is seeded anew (a new sequence number: it was not
            # alive, at this size, at a peak taken before)
            if not named:
                label = self._label_of_seeded(old_ptr, seq)
            self._hook.forget(old_ptr, seq)
            del self._seeded[old_ptr], self._seeded_ptr[key]
        elif key in self._emptied:
            kept = self._emptied.pop(key)[1]
            label = label if named else kept
        if n and ptr:
            if not self._seed_one(st, label) and named:
                self._hook.label_block(ptr, label)  # the hook made this block and counts it
            return
        emptied = self._emptied

        def dropped(_ref: weakref.ref, key: int = key) -> None:
            emptied.pop(key, None)

        emptied[key] = (weakref.ref(st, dropped), label)

    def _label_of_seeded(self, ptr: int, seq: int) -> int:
        label = self._hook.label_of(ptr, seq)
        return DEVICE_OTHER if label < 0 else int(label)

    # ---- relabelling (phase boundaries) ----------------------------------------------------
    def relabel_owned(self, owned_labels: Mapping[tuple[str, int], int], unowned: Mapping[int, int],
                      snapshot: str | None, owners: Mapping[tuple[str, int], int] | None = None) -> set[tuple[str, int]]:
        """Owned storages take their owner's label (and their owner's index from ``owners``); an
        unowned one whose label is a key of ``unowned`` takes the mapped label; ``snapshot``
        ("peak" / "oom" / None) is fixed for the storages alive at it. Returns the owned keys that
        are not live allocations here. The mappings are read as they are when first passed: pass a
        new one, not the same one changed (the profiler passes a walk's, unchanged, while its walks
        find the same storages)."""
        self._refresh_seeded()
        labels, owner_of = self._blocks[0](owned_labels), self._blocks[1](owners or {})
        missing = self._hook.relabel(labels, dict(unowned), snapshot == "peak", snapshot == "oom", owner_of)
        out = {("cpu", int(p)) for p in missing}
        # other devices, and keys no block has (memprof.measure.ownership.DdpBuckets: negative)
        out.update(key for key in owned_labels if key[0] != "cpu" or key[1] <= 0)
        return out

    def relabel_pending(self, owned_labels: Mapping[tuple[str, int], int],
                        owners: Mapping[tuple[str, int], int] | None = None) -> None:
        """Label the large storages allocated since the last walk that have an owner now (also in
        the current peak; their owner's index from ``owners``); the others stay pending."""
        self._hook.relabel_pending(self._blocks[0](owned_labels), self._blocks[1](owners or {}))

    def peak_owners(self) -> list[int]:
        """Bytes per owner index at the current peak (an index past the end: 0)."""
        return list(self._hook.peak_owners())

    # ---- the budget ------------------------------------------------------------------------
    def simulated_oom(self, exc: BaseException) -> SimulatedOutOfMemoryError | None:
        """The :class:`SimulatedOutOfMemoryError` for an error the hook raised (a plain
        ``torch.OutOfMemoryError`` from C++), else None."""
        if isinstance(exc, SimulatedOutOfMemoryError) or not isinstance(exc, torch.OutOfMemoryError):
            return None
        got = self._hook.oom()
        if got is None or not str(exc).startswith(_OOM_PREFIX):
            return None
        _, _, requested, total, budget = got
        return SimulatedOutOfMemoryError(requested_bytes=requested, total_bytes=total, budget_bytes=budget)


class _BlocksOf:
    """:func:`_cpu_blocks` of a mapping, kept for the next call with the same (unchanged) object."""

    def __init__(self) -> None:
        self._of: Mapping[tuple[str, int], int] | None = None
        self._blocks: dict[int, int] = {}

    def __call__(self, mapping: Mapping[tuple[str, int], int]) -> dict[int, int]:
        if mapping is not self._of:
            self._of, self._blocks = mapping, _cpu_blocks(mapping)
        return self._blocks


def _cpu_blocks(owned_labels: Mapping[tuple[str, int], int]) -> dict[int, int]:
    """``{pointer: label}`` of the owned keys that can be CPU blocks (the hook's map is keyed by
    pointer; a key with no real pointer is never a live block)."""
    return {ptr: label for (dev, ptr), label in owned_labels.items() if dev == "cpu" and ptr > 0}
