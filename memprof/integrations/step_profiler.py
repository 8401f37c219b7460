"""Which profiler an integration runs: a :class:`~memprof.measure.MemoryProfiler` whose step records
carry the recorder's micro-step fields, walking the owners the framework built (the DeepSpeed
engine, or the plain model and optimizer with DDP's gradient buckets)."""

from __future__ import annotations

import os
from typing import Any

import torch

from memprof.measure import MemoryProfiler
from memprof.measure.ownership import DdpBuckets, owned_storages

StepFields = dict[str, Any]


class StepFieldsProfiler(MemoryProfiler):
    """A MemoryProfiler whose ``step`` records carry the recorder's micro-step fields
    (``optimizer_step``, ``micro_step``, ``boundary``: memprof.integrations.recorder).

    MemoryProfiler fills ``micro_step`` / ``boundary`` itself from the engine's counters when a step
    starts; the recorder's own fields win here because it learns the boundary only when the
    micro-step ends (the optimizer stepped or not), and under accelerate the engine's
    ``micro_steps`` counter does not advance once per micro-batch. This hooks the one place every
    record passes through."""

    step_fields: StepFields
    # the step records of the optimizer step being accumulated, and of the last one that stepped
    # (read by MemprofCallback.on_log: memprof.integrations.log_values)
    open_optimizer_step: list[dict[str, Any]]
    last_optimizer_step: list[dict[str, Any]]

    def _write(self, record: dict[str, Any]) -> None:
        if record.get("type") == "step":
            fields = getattr(self, "step_fields", None) or {}
            record = {"type": "step", "step": record["step"], **fields,
                      **{k: v for k, v in record.items() if k not in ("type", "step", *fields)}}
            self._keep_optimizer_step(record)
        super()._write(record)

    def _keep_optimizer_step(self, record: dict[str, Any]) -> None:
        self.open_optimizer_step.append(record)
        if record.get("boundary"):
            self.last_optimizer_step, self.open_optimizer_step = self.open_optimizer_step, []


def plain_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's AcceleratedOptimizer (its state is what the ownership walk names)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def new_step_profiler(
    out_dir: str | os.PathLike,
    *,
    engine: Any,
    model: torch.nn.Module,
    optimizer: Any,
    run: dict[str, Any],
    memory_budget: int | None,
    ddp: Any,
    frozen_models: tuple[torch.nn.Module, ...] = (),
) -> StepFieldsProfiler:
    """The profiler of one rank, not yet entered. With an engine, the engine's own ownership walk;
    without, the model and the optimizer's states, plus, under DDP, its gradient buckets as
    ``comm_buffers`` (memprof.measure.ownership.DdpBuckets). ``frozen_models``: further models the
    trainer holds beside the one it trains (TRL DPOTrainer's ``ref_model``): their parameters,
    ZeRO-3 partitions and buffers are counted as ``params`` (not ``other``)."""
    owner_walk = None
    holder: dict[str, Any] = {}
    if ddp is not None and engine is None:
        walked_optimizer, buckets = plain_optimizer(optimizer), DdpBuckets(ddp)

        def owner_walk() -> dict:
            owned = owned_storages(model=model, optimizer=walked_optimizer)
            # the dispatch-mode tracker sees the buckets' storages itself (as other): naming
            # them from their sizes too would count them twice
            tracker = holder["profiler"].diagnostics.get("cpu_tracker", "") if "profiler" in holder else ""
            if buckets.device.startswith("cuda") or not tracker.startswith("dispatch"):
                owned.update(buckets.owned())
            return owned

    if frozen_models:
        owner_walk = _with_frozen_models(owner_walk, frozen_models, engine=engine, model=model,
                                         optimizer=plain_optimizer(optimizer))
    profiler = StepFieldsProfiler(
        engine=engine,
        model=None if engine is not None else model,
        optimizer=None if engine is not None else plain_optimizer(optimizer),
        out_dir=out_dir,
        run=run,
        memory_budget=memory_budget,
        owner_walk=owner_walk,
    )
    profiler.step_fields = {}
    profiler.open_optimizer_step, profiler.last_optimizer_step = [], []
    holder["profiler"] = profiler
    return profiler


def _with_frozen_models(owner_walk: Any, frozen_models: tuple[torch.nn.Module, ...], *, engine: Any,
                        model: torch.nn.Module, optimizer: Any) -> Any:
    """``owner_walk`` (or the profiler's default walk of the engine / model and optimizer) plus the
    frozen models' storages as ``params``; a storage already named keeps its first owner (a
    reference model never shares storage with the policy, but a PEFT "ref" adapter would be in the
    policy's own walk)."""

    def walk() -> dict:
        if owner_walk is not None:
            owned = owner_walk()
        elif engine is not None:
            owned = owned_storages(engine)
        else:
            owned = owned_storages(model=model, optimizer=optimizer)
        for frozen in frozen_models:
            for key, item in owned_storages(model=frozen).items():
                owned.setdefault(key, item)
        return owned

    return walk
