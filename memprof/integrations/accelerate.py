"""memprof in a custom accelerate loop (``Accelerator(deepspeed_plugin=...)``, plain / DDP, or FSDP2).

::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    run = profile_accelerate(accelerator, model, optimizer, out_dir="runs/acc")
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    run.finish()          # every rank: memprof.json + report.html on rank 0

Phases (accelerate 1.x ``Accelerator.backward``, ``DeepSpeedEngineWrapper.backward``,
``AcceleratedOptimizer.step``):

* ``forward``: the prepared model's ``forward`` (the DeepSpeed engine, DDP or the model) in training
  mode with grad enabled;
* ``backward``: ``engine.backward`` under DeepSpeed (accelerate calls it from
  ``accelerator.backward``), else ``accelerator.backward`` itself;
* ``step``: ``engine.step`` under DeepSpeed, which accelerate calls inside ``accelerator.backward``
  on the accumulation boundary only (the prepared optimizer's ``step`` is a no-op there); else the
  prepared optimizer's ``step`` when ``accelerator.sync_gradients`` (it skips the update otherwise).

A micro-step is one forward; it ends after the optimizer step, or when the next forward starts.
Its ``boundary`` is ``accelerator.sync_gradients`` at its backward (the accumulation boundary
accelerate decided).

FSDP2 (accelerate's FSDP plugin with ``fsdp_version: 2``, which applies ``fully_shard`` in place;
or a model the script ``fully_shard``-ed itself): the prepared model has ``FSDPModule``s, and the
run records ``run["fsdp2"]`` (ownership.fsdp2_record) as ``MemoryProfiler(model=...)`` does; a
layout memprof does not model is refused in one line when profiling starts.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from memprof.integrations.observed_run import describe_observed_run, device_type_of
from memprof.integrations.recorder import MicroStepRecorder
from memprof.measure.ownership import fsdp2_record, is_fsdp2_model
from memprof.run.deepspeed_shm import release_cpu_shm_segment


class AccelerateProfile:
    """What :func:`profile_accelerate` returns: call :meth:`finish` on every rank after the loop."""

    def __init__(self, recorder: MicroStepRecorder) -> None:
        self.recorder = recorder
        self.run_doc: dict[str, Any] | None = None

    def finish(self, *, report: bool = True) -> dict[str, Any] | None:
        """Gather every rank into ``memprof.json`` with the estimate (rank 0) and write
        ``report.html`` beside it. A collective. Returns the run document on rank 0, else None."""
        self.run_doc = self.recorder.finish(write_report=report)
        return self.run_doc


def profile_accelerate(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    *,
    out_dir: str | os.PathLike,
    memory_budget: int | None = None,
) -> AccelerateProfile:
    """Start profiling a loop over the objects ``accelerator.prepare`` returned. Call it on every
    rank (on CPU DeepSpeed launches it releases DeepSpeed's /dev/shm segment after a barrier)."""
    engine = _deepspeed_engine(accelerator, model)
    unwrapped = accelerator.unwrap_model(model) if hasattr(accelerator, "unwrap_model") else model
    if device_type_of(engine, unwrapped) == "cpu":
        release_cpu_shm_segment()
    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
    # FSDP2's record now: an unsupported sharding is refused (one line) before the loop runs
    fsdp2 = fsdp2_record(unwrapped) if engine is None and is_fsdp2_model(unwrapped) else None
    settings = {
        "distributed_type": str(getattr(accelerator, "distributed_type", None)),
        "mixed_precision": str(getattr(accelerator, "mixed_precision", None)),
        "gradient_accumulation_steps": int(getattr(accelerator, "gradient_accumulation_steps", 1)),
        "num_processes": int(getattr(accelerator, "num_processes", 1)),
        "prepared_model_class": type(model).__name__,
    }
    fsdp_version = getattr(getattr(getattr(accelerator, "state", None), "fsdp_plugin", None), "fsdp_version", None)
    if fsdp_version is not None:  # accelerate's FSDP plugin (fsdp_version 2: fully_shard)
        settings["fsdp_version"] = int(fsdp_version)

    def describe(batch_shape: tuple[int, ...] | None) -> dict[str, Any]:
        run = describe_observed_run(engine=engine, model=unwrapped, optimizer=optimizer, batch_shape=batch_shape,
                           integration="accelerate", framework_settings=settings, ddp=ddp)
        if engine is None:
            run["gradient_accumulation_steps"] = settings["gradient_accumulation_steps"]
        if fsdp2 is not None:
            run["fsdp2"] = fsdp2
        return run

    recorder = MicroStepRecorder(out_dir, engine=engine, model=unwrapped, optimizer=optimizer,
                                 describe=describe, memory_budget=memory_budget, ddp=ddp)
    recorder.wrap_forward(model)

    def note_boundary() -> None:
        recorder.set_boundary(bool(accelerator.sync_gradients))

    if engine is not None:
        recorder.wrap_phase(engine, "backward", "backward", before=note_boundary)
        recorder.wrap_phase(engine, "step", "step", after=recorder.end_micro_step)
    else:
        recorder.wrap_phase(accelerator, "backward", "backward", before=note_boundary)
        recorder.wrap_phase(optimizer, "step", "step", when=lambda: bool(accelerator.sync_gradients),
                            after=recorder.end_micro_step)
    return AccelerateProfile(recorder)


def _deepspeed_engine(accelerator: Any, model: torch.nn.Module) -> Any:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover
        return None
    if isinstance(model, DeepSpeedEngine):
        return model
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    engine = getattr(wrapped, "engine", None)
    return engine if isinstance(engine, DeepSpeedEngine) else None
