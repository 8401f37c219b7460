"""The profiler API: per rank, per step, per phase, bytes by category at the phase end and peak.

::

    profiler = MemoryProfiler(engine=engine, out_dir=out, run=run_meta, memory_budget=None)
    with profiler:                                   # starts/stops allocation tracking
        for step in range(steps):
            with profiler.step(step) as s:
                with s.phase("forward"):
                    loss = engine(**batch).loss
                with s.phase("backward"):
                    engine.backward(loss)
                with s.phase("step"):
                    engine.step()
                s.loss = loss.item()
    run_doc = profiler.finish()                      # collective; memprof.json on rank 0
    profiler.print_table(run_doc)

Two ways of measuring, chosen by the device the model computes on:

* CPU: an :class:`~memprof.measure.tracker.AllocationTracker` sees every storage allocation and
  free, so the peak is exact at op granularity and its breakdown is a copy of a running tally.
* CUDA: the caching allocator's counters (peak reset per phase), the ownership walk for model
  states, and no dispatch mode, which keeps the cost to a few reads per phase.

Categories of model states come from the ownership walk (:mod:`memprof.measure.ownership`) at phase
boundaries; see docs/profiler.md for the rules and the approximations left.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from memprof.categories import PHASES, Breakdown, Phase, empty_breakdown
from memprof.errors import MemprofError
from memprof.measure import cuda_counters
from memprof.measure.gather import gather_records, rank_and_world, render_rank_table, write_run_file
from memprof.measure.host import HostMemory
from memprof.measure.oom import SimulatedOutOfMemoryError, oom_record
from memprof.measure.tracker import (
    DEVICE_ACTIVATIONS,
    DEVICE_OTHER,
    MODEL_STATE_LABELS,
    N_LABELS,
    AllocationTracker,
    Snapshot,
    device_total,
    label_of,
    live_tensor_storages,
    tally_to_breakdown,
)
from memprof.runfile import SCHEMA_VERSION, RankWriter

OwnedMap = Mapping[tuple[str, int], Any]
"""``(device string, untyped-storage data_ptr) -> Owned(category, location, nbytes)``."""
OwnershipWalk = Callable[[], OwnedMap]

_ACTIVATION_PHASES = (Phase.FORWARD.value, Phase.BACKWARD.value)
# A new storage of at least max(1 MiB, 1/64 of the tracked device bytes at the phase start) gets
# an ownership walk before the phase ends; smaller ones are labelled at the phase end only. The
# floor and fraction bound the walks per phase (cost) while catching engine buffers and gradients.
_MIN_LARGE_BYTES = 2**20
_LARGE_FRACTION = 64
# how long a phase end gives up the GIL so gloo's worker threads can drop finished collectives'
# buffers (see MemoryProfiler._let_comm_threads_release); 3 per step
_COMM_RELEASE_WAIT_S = 0.005


class _OwnedTally(NamedTuple):
    tally: list[int]  # label-indexed bytes of owned storages
    labels: dict[tuple[str, int], int]  # storage key -> label
    nbytes: dict[tuple[str, int], int]  # storage key -> bytes


def _tally_owned(owned: OwnedMap) -> _OwnedTally:
    tally = [0] * N_LABELS
    labels: dict[tuple[str, int], int] = {}
    nbytes: dict[tuple[str, int], int] = {}
    for key, o in owned.items():
        label = label_of(o.location, o.category)
        labels[key] = label
        nbytes[key] = int(o.nbytes)
        tally[label] += int(o.nbytes)
    return _OwnedTally(tally, labels, nbytes)


def _add_tallies(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)]


def _detect_device(engine: Any, model: torch.nn.Module | None) -> torch.device:
    """The device the model computes on: DeepSpeed's ``engine.device``, else the first parameter's."""
    device = getattr(engine, "device", None) if engine is not None else None
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    module = getattr(engine, "module", None) if engine is not None else model
    if module is not None:
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


class StepContext:
    """One training step: ``with s.phase(name):`` around each phase; set ``s.loss``."""

    def __init__(self, profiler: MemoryProfiler, step: int) -> None:
        self._profiler = profiler
        self.step = int(step)
        self.loss: float | torch.Tensor | None = None
        self.phases: dict[str, dict[str, Any]] = {}

    def phase(self, name: str | Phase) -> Any:
        """Context manager measuring one phase (``forward``, ``backward`` or ``step``)."""
        value = name.value if isinstance(name, Phase) else str(name)
        if value not in PHASES:
            raise ValueError(f"unknown phase {name!r}: use one of {', '.join(PHASES)}")
        return self._profiler._phase(self, value)

    def __enter__(self) -> StepContext:
        self._profiler._begin_step(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self._profiler._end_step(self)
        else:
            self._profiler._record_oom_if_unrecorded(exc, self.step, None)
        return False


class MemoryProfiler:
    """Per-rank memory profiler for a DeepSpeed engine or a plain torch model + optimizer.

    Writes the ``rank<R>.jsonl`` header at construction (rank and world size from
    torch.distributed when initialised, else 0 of 1), one ``step`` record (flushed)
    per step, an ``oom`` record if the run runs out of (simulated) memory, and ``end`` in
    :meth:`finish`.

    ``memory_budget``: simulated device capacity in bytes, or None. ``owner_walk``: the function
    naming the owner of each storage; by default
    :func:`memprof.measure.ownership.owned_storages` on the engine / model / optimizer.
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        out_dir: str | os.PathLike,
        run: dict[str, Any] | None = None,
        memory_budget: int | None = None,
        owner_walk: OwnershipWalk | None = None,
    ) -> None:
        if engine is None and model is None:
            raise ValueError("MemoryProfiler needs engine=... (DeepSpeed) or model=... (plain torch)")
        if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0
        ):
            raise MemprofError(
                f"memory budget {memory_budget!r} must be a positive number of bytes, e.g. 2GiB"
            )
        self.engine = engine
        self.model = model
        self.optimizer = optimizer
        self.memory_budget = memory_budget
        self.out_dir = Path(out_dir)
        self._owner_walk = owner_walk or self._default_owner_walk
        self.device = _detect_device(engine, model)
        if self.device.type not in ("cpu", "cuda"):
            raise MemprofError(
                f"memprof measures CPU and CUDA runs; the model is on {self.device.type!r}"
            )
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world_size = rank_and_world()
        self._multi_rank = self.world_size > 1
        self.run: dict[str, Any] = dict(run or {})
        # memprof never pretends a CPU is a GPU: the device type is what the model is on
        self.run["device_type"] = self.device.type
        self.run.setdefault("world_size", self.world_size)

        self.host = HostMemory()
        self.tracker: AllocationTracker | None = None
        self.records: list[dict[str, Any]] = []
        self.diagnostics = {"negative_clamps": 0, "untracked_owned_bytes_max": 0, "mid_phase_walks": 0,
                            # wall time in the profiler's own step/phase bookkeeping (its
                            # cost outside allocation tracking): phase starts and ends, records
                            "phase_end_seconds": 0.0}
        self._active = False
        self._finished = False
        self._oom_recorded = False
        self._unowned_baseline = 0  # CUDA: unowned allocated bytes at the step start
        self._backward_activations = 0  # CUDA: activations at the end of backward
        header = {"host": socket.gethostname(), "device": self._device_label(), "run": self.run}
        try:
            self._writer = RankWriter(self.out_dir, self.rank, header)
        except OSError as e:
            raise MemprofError(
                f"cannot write the profile to {self.out_dir}: {e.strerror}; pass a writable --out folder"
            ) from None
        self.records.append({"type": "header", "schema_version": SCHEMA_VERSION, "rank": self.rank, **header})

    # ---- public API ---------------------------------------------------------------------------
    def __enter__(self) -> MemoryProfiler:
        if self._active:
            raise RuntimeError("this MemoryProfiler is already active")
        if self.on_cuda:
            owned = _tally_owned(self._owner_walk())
            self._unowned_baseline = max(
                0, torch.cuda.memory_allocated(self.device) - device_total(owned.tally)
            )
        else:
            # dead reference cycles holding tensors would otherwise be seeded, then "freed"
            # inside some phase whenever the collector happens to run
            gc.collect()
            tracker = AllocationTracker(budget_bytes=self.memory_budget)
            labels = _tally_owned(self._owner_walk()).labels
            by_label: dict[int, list[torch.UntypedStorage]] = {}
            for st in live_tensor_storages():
                label = labels.get((str(st.device), st.data_ptr()), DEVICE_OTHER)
                by_label.setdefault(label, []).append(st)
            for label, storages in by_label.items():
                tracker.seed(storages, label)
            tracker.on_large_allocation = self._mid_phase_walk
            tracker.__enter__()
            self.tracker = tracker
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self._record_oom_if_unrecorded(exc, None, None)
        if self.tracker is not None:
            self.tracker.__exit__(exc_type, exc, tb)
            self.diagnostics["negative_clamps"] += self.tracker.negative_clamps
        self._active = False
        return False

    def step(self, step: int) -> StepContext:
        """Context manager for one training step (use inside ``with profiler:``)."""
        if not self._active:
            raise RuntimeError("profiler.step() must run inside `with profiler:`")
        return StepContext(self, step)

    def finish(self, estimate: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Write the ``end`` record, gather every rank's records to rank 0 and write
        ``<out>/memprof.json`` there atomically. A collective: call it on every rank. Returns the
        run document on rank 0, None elsewhere."""
        if self._finished:
            raise RuntimeError("MemoryProfiler.finish() was already called")
        if self._active:
            raise RuntimeError("call finish() after the `with profiler:` block has ended")
        self._finished = True
        self._write({"type": "end", "peak_host_rss_bytes": self.host.peak_rss(), "diagnostics": self.diagnostics})
        self._writer.close()
        gathered = gather_records(self.records, device=self.device if self.on_cuda else None)
        if gathered is None:
            return None
        return write_run_file(self.out_dir, self.run, gathered, estimate)

    def print_table(self, run_doc: dict[str, Any] | None, console: Any = None) -> None:
        """Print a per-rank table (rich) of each rank's worst phase peak; nothing when ``run_doc``
        is None (ranks other than 0)."""
        if run_doc is None:
            return
        render_rank_table(run_doc, console=console)

    # ---- steps and phases ---------------------------------------------------------------------
    def _begin_step(self, ctx: StepContext) -> None:
        started = time.perf_counter()
        if self.tracker is not None:
            # activations are "of the current step": older unowned leftovers become other
            self._retire_activations()
        self.diagnostics["phase_end_seconds"] += time.perf_counter() - started

    def _end_step(self, ctx: StepContext) -> None:
        started = time.perf_counter()
        loss = ctx.loss
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().item()
        if loss is not None:
            loss = float(loss)
            if not math.isfinite(loss):
                loss = None  # strict JSON has no NaN/inf; a missing loss marks it
        self._write({"type": "step", "step": ctx.step, "loss": loss, "phases": ctx.phases})
        self.diagnostics["phase_end_seconds"] += time.perf_counter() - started

    @contextmanager
    def _phase(self, ctx: StepContext, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        tracker = self.tracker
        if tracker is not None:
            tracker.new_label = DEVICE_ACTIVATIONS if phase in _ACTIVATION_PHASES else DEVICE_OTHER
            # "large" = worth an ownership walk before the phase ends (see tracker.pending). Only a
            # DeepSpeed engine owns buffers that live and die inside one phase (reduce buckets,
            # gathered ZeRO-3 params); a plain model's grads and optimizer state outlive the phase
            # and the phase-end walk labels them at the peak too, so no mid-phase walks there.
            tracker.large_bytes = (
                max(_MIN_LARGE_BYTES, tracker.device_total // _LARGE_FRACTION) if self.engine is not None else None
            )
            tracker.reset_peak()
        else:
            cuda_counters.start_phase(self.device)
        self.diagnostics["phase_end_seconds"] += time.perf_counter() - started
        try:
            yield
        except BaseException as exc:
            if tracker is not None:
                tracker.new_label = DEVICE_OTHER
                tracker.large_bytes = None
            self._record_oom_if_unrecorded(exc, ctx.step, phase)
            raise
        started = time.perf_counter()
        if tracker is not None:
            self._let_comm_threads_release()
            tracker.new_label = DEVICE_OTHER
            tracker.large_bytes = None
            record = self._cpu_phase_record()
        else:
            record = self._cuda_phase_record(phase)
        ctx.phases[phase] = record
        self.diagnostics["phase_end_seconds"] += time.perf_counter() - started
        if self.on_cuda and self.memory_budget is not None and record["peak_total"] > self.memory_budget:
            # On CUDA the budget is checked against the allocator's peak at the phase end: the
            # phase did reach that many bytes, so a GPU of this capacity would have failed in it.
            err = SimulatedOutOfMemoryError(None, record["peak_total"], self.memory_budget)
            self._write_oom(ctx.step, phase, record["peak"], record["peak_total"], self.memory_budget, str(err))
            raise err

    def _let_comm_threads_release(self) -> None:
        """A sync point for the CPU tracker in multi-rank runs. gloo completes a collective on its
        own worker thread, which drops its references to the buffers (e.g. ZeRO's flat all-reduce
        copy, a reduce bucket) only once it gets the GIL; until then a buffer DeepSpeed has already
        released is still alive, at a random rank and step, and would be counted in this phase's
        end and the next phase's peak. Giving up the GIL briefly lets those threads finish."""
        if self._multi_rank:
            time.sleep(_COMM_RELEASE_WAIT_S)

    def _cpu_phase_record(self) -> dict[str, Any]:
        tracker = self.tracker
        assert tracker is not None
        peak = tracker.peak
        extra = self._relabel_from_ownership([peak])
        end_tally = _add_tallies(tracker.tally, extra)
        peak_tally = _add_tallies(peak.tally, extra)
        return {
            "end": tally_to_breakdown(end_tally),
            "peak": tally_to_breakdown(peak_tally),
            "peak_total": device_total(peak_tally),
            "end_total": device_total(end_tally),
            "host_rss_bytes": self.host.rss(),
        }

    def _cuda_phase_record(self, phase: str) -> dict[str, Any]:
        counters = cuda_counters.read(self.device)
        owned = _tally_owned(self._owner_walk())
        end = self._cuda_breakdown(owned.tally, counters["allocated_bytes"], phase)
        peak = self._cuda_breakdown(owned.tally, counters["peak_allocated_bytes"], phase)
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
            "host_rss_bytes": self.host.rss(),
            "cuda": counters,
        }

    def _cuda_breakdown(self, owned_tally: list[int], allocated: int, phase: str) -> Breakdown:
        """Owned states by category; the allocated bytes nobody owns split into activations (what
        grew since the step start) and other (what was there before). See docs/profiler.md."""
        tally = list(owned_tally)
        unowned = allocated - device_total(owned_tally)
        if unowned < 0:
            self.diagnostics["negative_clamps"] += 1
            unowned = 0
        activations = max(0, unowned - self._unowned_baseline)
        if phase == Phase.STEP.value:
            activations = min(activations, self._backward_activations)
        tally[DEVICE_ACTIVATIONS] += activations
        tally[DEVICE_OTHER] += unowned - activations
        return tally_to_breakdown(tally)

    # ---- ownership bookkeeping (CPU) ----------------------------------------------------------
    def _relabel_from_ownership(self, snapshots: list[Snapshot]) -> list[int]:
        """Relabel the tracker's live storages from a fresh ownership walk, fixing ``snapshots``.
        Returns the label tally of owned storages the tracker does not hold (counted as alive
        throughout; should be empty)."""
        tracker = self.tracker
        assert tracker is not None
        owned = _tally_owned(self._owner_walk())

        def label_for(key: tuple[str, int], rec: Any) -> int:
            label = owned.labels.get(key)
            if label is not None:
                return label
            if rec.label in MODEL_STATE_LABELS:
                return DEVICE_OTHER  # no longer owned by the engine (e.g. a dropped buffer)
            return rec.label

        live_keys = tracker.relabel(label_for, snapshots)
        extra = [0] * N_LABELS
        missing = 0
        for key, label in owned.labels.items():
            if key not in live_keys:
                # owned but never seen allocated (made outside dispatch before tracking could see
                # it): counted from the walk's size, as if alive for the whole phase
                extra[label] += owned.nbytes[key]
                missing += owned.nbytes[key]
        if missing > self.diagnostics["untracked_owned_bytes_max"]:
            self.diagnostics["untracked_owned_bytes_max"] = missing
        return extra

    def _mid_phase_walk(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        self.diagnostics["mid_phase_walks"] += 1
        tracker.relabel_pending(_tally_owned(self._owner_walk()).labels.get)

    def _retire_activations(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        tracker.relabel(lambda key, rec: DEVICE_OTHER if rec.label == DEVICE_ACTIVATIONS else rec.label)

    # ---- out-of-memory ------------------------------------------------------------------------
    def _record_oom_if_unrecorded(self, exc: BaseException, step: int | None, phase: str | None) -> None:
        if self._oom_recorded or not isinstance(exc, torch.OutOfMemoryError):
            return
        try:
            if isinstance(exc, SimulatedOutOfMemoryError) and self.tracker is not None and self.tracker.oom:
                snap = self.tracker.oom
                extra = self._relabel_from_ownership([snap])
                tally = _add_tallies(snap.tally, extra)
                breakdown, total, budget = tally_to_breakdown(tally), exc.total_bytes, exc.budget_bytes
            elif self.on_cuda:
                allocated = torch.cuda.memory_allocated(self.device)
                owned = _tally_owned(self._owner_walk())
                breakdown = self._cuda_breakdown(owned.tally, allocated, phase or Phase.STEP.value)
                total = allocated
                budget = self.memory_budget or cuda_counters.device_capacity(self.device)
            else:
                return
        except Exception:  # noqa: BLE001 - the walk itself failed under OOM: keep the total
            breakdown = empty_breakdown()
            total = getattr(exc, "total_bytes", 0)
            breakdown["device"]["other"] = total
            budget = getattr(exc, "budget_bytes", self.memory_budget)
        self._write_oom(step, phase, breakdown, total, budget, str(exc))

    def _write_oom(
        self, step: int | None, phase: str | None, breakdown: Breakdown, total: int, budget: int | None, message: str
    ) -> None:
        self._oom_recorded = True
        self._write(
            oom_record(step=step, phase=phase, breakdown=breakdown, total_bytes=total, budget_bytes=budget, message=message)
        )

    # ---- helpers ------------------------------------------------------------------------------
    def _write(self, record: dict[str, Any]) -> None:
        self._writer.write(record)
        self.records.append(record)

    def _device_label(self) -> str:
        if self.on_cuda:
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return "cpu"

    def _default_owner_walk(self) -> OwnedMap:
        from memprof.measure.ownership import owned_storages

        return owned_storages(self.engine, model=self.model, optimizer=self.optimizer)

