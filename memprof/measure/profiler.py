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

Two ways of measuring, chosen by the device the model computes on, each a small backend of
:mod:`memprof.measure.backends`: on CPU an allocation tracker sees every storage allocation and free
(exact peaks at op granularity); on CUDA the caching allocator's counters are read per phase.

Categories of model states come from the ownership walk (:mod:`memprof.measure.ownership`) at phase
boundaries; see docs/profiler.md for the rules and the approximations left.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from memprof.categories import PHASES, Breakdown, Phase, empty_breakdown
from memprof.errors import MemprofError
from memprof.measure.backends import Backend, CpuBackend, CudaBackend, OwnedMap, OwnershipWalk
from memprof.measure.gather import gather_records, rank_and_world, render_rank_table, write_run_file
from memprof.measure.host import HostMemory
from memprof.measure.oom import oom_record
from memprof.measure.regions import install_regions
from memprof.runfile import SCHEMA_VERSION, RankWriter
from memprof.units import is_positive_int

__all__ = ["MemoryProfiler", "OwnedMap", "OwnershipWalk", "StepContext"]


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


def _accumulation_position(engine: Any) -> tuple[int | None, bool | None]:
    """(micro-step index in the accumulation cycle, is it the boundary) of a DeepSpeed engine's
    next micro-batch (deepspeed/runtime/engine.py: ``is_gradient_accumulation_boundary``,
    ``micro_steps``, incremented at the end of ``step()``); (None, None) for anything else."""
    boundary_of = getattr(engine, "is_gradient_accumulation_boundary", None)
    gas_of = getattr(engine, "gradient_accumulation_steps", None)
    micro_steps = getattr(engine, "micro_steps", None)
    if not callable(boundary_of) or not callable(gas_of) or not isinstance(micro_steps, int):
        return None, None
    return micro_steps % max(1, int(gas_of())), bool(boundary_of())


class StepContext:
    """One training step (one micro-step under gradient accumulation): ``with s.phase(name):``
    around each phase; set ``s.loss``. ``micro_step`` (its index in the accumulation cycle) and
    ``boundary`` (whether the optimizer steps at its end) go into the step record when known."""

    def __init__(self, profiler: MemoryProfiler, step: int, micro_step: int | None = None,
                 boundary: bool | None = None) -> None:
        self._profiler = profiler
        self.step = int(step)
        self.micro_step = micro_step
        self.boundary = boundary
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


def _fsdp2_record(engine: Any, model: torch.nn.Module | None) -> dict[str, Any] | None:
    """``run["fsdp2"]`` for a plain model with ``fully_shard`` modules (ownership.fsdp2_record)."""
    if engine is not None or model is None:
        return None
    from memprof.measure.ownership import fsdp2_record

    return fsdp2_record(model)


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
        if memory_budget is not None and not is_positive_int(memory_budget):
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
        on_cuda = self.device.type == "cuda"
        if on_cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world_size = rank_and_world()
        self.run: dict[str, Any] = dict(run or {})
        # memprof never pretends a CPU is a GPU: the device type is what the model is on
        self.run["device_type"] = self.device.type
        self.run.setdefault("world_size", self.world_size)
        fsdp2 = _fsdp2_record(engine, model)  # refuses (one line) an FSDP2 layout memprof does not model
        if fsdp2 is not None:
            self.run.setdefault("fsdp2", fsdp2)

        self.host = HostMemory()
        self.records: list[dict[str, Any]] = []
        self.diagnostics = {"negative_clamps": 0, "untracked_owned_bytes_max": 0, "mid_phase_walks": 0,
                            # wall time in the profiler's own step/phase bookkeeping (its
                            # cost outside allocation tracking): phase starts and ends, records
                            "phase_end_seconds": 0.0}
        self._backend: Backend = (
            CudaBackend(self.device, self._owner_walk, self.diagnostics, memory_budget=memory_budget,
                        regions=functools.partial(install_regions, engine=engine, optimizer=optimizer, model=model,
                                                    owner_walk=self._owner_walk))
            if on_cuda
            else CpuBackend(self._owner_walk, self.diagnostics, memory_budget=memory_budget,
                            # FSDP2 gathers and frees a block's params inside a phase, as ZeRO-3 does;
                            # it walks at its own moments (ownership.fsdp2.Fsdp2GroupWatch)
                            mid_phase_walks=engine is not None or fsdp2 is not None,
                            multi_rank=self.world_size > 1, walks_at_engine_points=engine is None and fsdp2 is not None,
                            # transients named by the code that makes them (memprof.measure.regions)
                            regions=functools.partial(install_regions, engine=engine, optimizer=optimizer, model=model,
                                                    owner_walk=self._owner_walk))
        )
        self._active = False
        self._resize_watch: Any = None
        self._comm_watch: Any = None  # ownership.fsdp2.Fsdp2GroupWatch (FSDP2's walks; gloo's releases)
        self._finished = False
        self._oom_recorded = False
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
        self._backend.start()
        self._watch_fsdp2_resizes(True)
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self._record_oom_if_unrecorded(exc, None, None)
        self._watch_fsdp2_resizes(False)
        self._backend.stop()
        self._active = False
        return False

    def _watch_fsdp2_resizes(self, on: bool) -> None:
        """FSDP2 frees and re-gathers blocks by resizing storages in place, which a CPU tracker sees
        only when told (the dispatch mode never; the allocator hook not for a storage made before it
        started: ownership.fsdp2.StorageResizeWatch); ownership walks run before FSDP2 frees what it
        owns, and on several CPU ranks gloo's threads get the GIL after each backward collective
        (Fsdp2GroupWatch)."""
        if not on:
            for watch in (self._resize_watch, self._comm_watch):
                if watch is not None:
                    watch.__exit__(None, None, None)
            self._resize_watch = self._comm_watch = None
            return
        resync = getattr(getattr(self._backend, "tracker", None), "resync", None)
        if "fsdp2" in self.run and resync is not None:
            from memprof.measure.ownership.fsdp2 import StorageResizeWatch

            self._resize_watch = StorageResizeWatch(resync).__enter__()
        # gloo (CPU, several ranks): FSDP2's freed backward buffers released before the next peak
        let_release = getattr(self._backend, "_let_comm_threads_release", None)
        if not getattr(self._backend, "_multi_rank", False):
            let_release = None
        walk = getattr(self._backend, "walk_if_due", None) if getattr(self._backend, "_walks_at_engine_points", False) else None
        if "fsdp2" in self.run and (let_release is not None or walk is not None):
            from memprof.measure.ownership.fsdp2 import Fsdp2GroupWatch

            self._comm_watch = Fsdp2GroupWatch(walk, let_release).__enter__()

    def step(self, step: int, *, micro_step: int | None = None, boundary: bool | None = None) -> StepContext:
        """Context manager for one training step (use inside ``with profiler:``): one call per
        micro-batch, i.e. per ``engine.step()`` call under gradient accumulation.

        ``micro_step`` / ``boundary``: the micro-batch's index in its accumulation cycle and whether
        the optimizer steps at its end. Left None with a DeepSpeed engine, they are read from it
        when the step starts (``engine.micro_steps % gradient_accumulation_steps()`` and
        ``engine.is_gradient_accumulation_boundary()``, which ``engine.step()`` itself consults);
        with a plain model they are recorded only when given."""
        if not self._active:
            raise RuntimeError("profiler.step() must run inside `with profiler:`")
        if micro_step is None and boundary is None:
            micro_step, boundary = _accumulation_position(self.engine)
        return StepContext(self, step, micro_step, boundary)

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
        gathered = gather_records(self.records, device=self.device if self.device.type == "cuda" else None)
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
        self._backend.begin_step()
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
        record: dict[str, Any] = {"type": "step", "step": ctx.step, "loss": loss}
        if ctx.micro_step is not None:
            record["micro_step"] = int(ctx.micro_step)
        if ctx.boundary is not None:
            record["boundary"] = bool(ctx.boundary)
        record["phases"] = ctx.phases
        self._write(record)
        self.diagnostics["phase_end_seconds"] += time.perf_counter() - started

    @contextmanager
    def _phase(self, ctx: StepContext, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        self._backend.begin_phase(phase)
        self.diagnostics["phase_end_seconds"] += time.perf_counter() - started
        try:
            yield
        except BaseException as exc:
            self._backend.abandon_phase()
            translated = self._backend.translate_error(exc)
            self._record_oom_if_unrecorded(translated, ctx.step, phase)
            if translated is not exc:
                raise translated.with_traceback(exc.__traceback__) from None
            raise
        started = time.perf_counter()
        record = self._backend.end_phase(phase)
        record["host_rss_bytes"] = self.host.rss()
        for key in ("cuda", "peak_owners"):  # keep the documented key order: host_rss_bytes, cuda, peak_owners
            if key in record:
                record[key] = record.pop(key)
        ctx.phases[phase] = record
        self.diagnostics["phase_end_seconds"] += time.perf_counter() - started
        err = self._backend.over_budget(record)
        if err is not None:
            self._write_oom(ctx.step, phase, record["peak"], err.total_bytes, err.budget_bytes, str(err))
            raise err

    # ---- out-of-memory ------------------------------------------------------------------------
    def _record_oom_if_unrecorded(self, exc: BaseException, step: int | None, phase: str | None) -> None:
        if self._oom_recorded or not isinstance(exc, torch.OutOfMemoryError):
            return
        try:
            state = self._backend.oom_state(exc, phase)
            if state is None:
                return
            breakdown, total, budget = state
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
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return "cpu"

    def _default_owner_walk(self) -> OwnedMap:
        from memprof.measure.ownership import owned_storages

        return owned_storages(self.engine, model=self.model, optimizer=self.optimizer)

