"""Drive a :class:`~memprof.measure.MemoryProfiler` from a loop memprof does not own.

One profiler *step* per micro-step (one forward + backward, and the optimizer step on the
accumulation boundary), as in memprof's own launcher (memprof/train/loop.py). Each step record
also says where it sits in the accumulation cycle::

    {"type": "step", "step": <micro-step index from 0>, "optimizer_step": <optimizer step from 0>,
     "micro_step": <index inside the accumulation, from 0>, "boundary": <the optimizer stepped>,
     "loss": ..., "phases": {...}}

Phases are measured around calls the framework makes, found by patching *instance* attributes
(never classes: :mod:`memprof.integrations.patching`), restored by :meth:`MicroStepRecorder.detach`:

* ``forward``: the training module's ``forward`` (the DeepSpeed engine, the DDP wrapper or the
  model itself), only while it is in training mode with grad enabled, so evaluation and
  generation are not counted;
* ``backward``: ``engine.backward`` under DeepSpeed; otherwise whatever the front end wraps
  (accelerate's ``Accelerator.backward``);
* ``step``: ``engine.step`` under DeepSpeed; otherwise the front end opens and closes it.

A training forward that finds the previous micro-step still open (it had its forward) closes it
first, so a loop that never tells the recorder where a micro-step ends is still recorded.
An exception inside a measured phase (out of memory, KeyboardInterrupt, a crash) ends the
recording there: the profiler writes its ``oom`` record when it is one, allocation tracking stops,
and every finished micro-step is already on disk in ``rank<R>.jsonl``.

The profiler it starts is :mod:`memprof.integrations.step_profiler`'s; the run ends through
:func:`memprof.end_of_run.finish_run`, as the launcher's does.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from memprof.end_of_run import finish_run
from memprof.integrations.call_values import batch_shape, loss_of
from memprof.integrations.patching import InstancePatch
from memprof.integrations.step_profiler import StepFieldsProfiler, new_step_profiler
from memprof.measure.profiler import StepContext
from memprof.measure.regions import install_input_batches


class MicroStepRecorder:
    """Per rank: one MemoryProfiler, started lazily at the first training forward (when the batch
    shape is known, so the rank file header carries the sequence length).

    ``describe(batch_shape) -> run dict`` builds the run metadata (memprof.integrations.observed_run).
    ``engine``: the DeepSpeed engine or None; ``model``/``optimizer``: the plain-torch objects the
    ownership walk names states from when there is no engine. ``ddp``: the
    ``DistributedDataParallel`` wrapper when there is one (its gradient buckets are counted as
    ``comm_buffers``: memprof.measure.ownership.DdpBuckets). ``frozen_models``: other models the
    framework holds beside the trained one (a DPO reference model), counted as ``params``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        engine: Any,
        model: torch.nn.Module,
        optimizer: Any,
        describe: Callable[[tuple[int, ...] | None], dict[str, Any]],
        memory_budget: int | None = None,
        ddp: Any = None,
        frozen_models: tuple[torch.nn.Module, ...] = (),
    ) -> None:
        self.out_dir = Path(out_dir)
        self.frozen_models = tuple(frozen_models)
        self.ddp = ddp
        self.engine = engine
        self.model = model
        self.optimizer = optimizer
        self._describe = describe
        self._memory_budget = memory_budget
        self.profiler: StepFieldsProfiler | None = None
        self._tracking = False  # inside `with profiler:` (entered by hand)
        self._patches: list[InstancePatch] = []
        self._step: StepContext | None = None
        self._open_phase: Any = None  # a phase context entered by hand (open_phase)
        self._phases_done: set[str] = set()
        self._in_forward = 0
        self._micro_index = 0  # next profiler step number
        self.optimizer_step = 0  # the optimizer step being accumulated
        self.micro_step = 0  # micro-steps seen in this optimizer step
        self._boundary: bool | None = None
        self.stopped = False  # an exception ended the recording
        self.finished = False
        # the profiler starts at the first training forward; the batches the loop fetches before it
        # (the Trainer's first get_batch_samples, accelerate's one-ahead) are recorded from now, so
        # its walks name them (memprof.measure.regions, data-loader section); removed by detach()
        root = getattr(engine, "module", None) if engine is not None else model
        self._stop_recording_batches = install_input_batches(root) if isinstance(root, torch.nn.Module) else None

    # ---- attaching ---------------------------------------------------------------------------
    def wrap_forward(self, module: torch.nn.Module) -> None:
        """Measure ``module``'s training forwards as the ``forward`` phase."""
        original = module.forward

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.stopped or self.finished or self._in_forward or not module.training or not torch.is_grad_enabled():
                return original(*args, **kwargs)
            self._in_forward += 1
            try:
                self._before_forward(args, kwargs)
                with self._phase_guard("forward"):
                    out = original(*args, **kwargs)
                loss = loss_of(out)
                if loss is not None and self._step is not None:
                    self._step.loss = loss.detach()
                return out
            finally:
                self._in_forward -= 1

        self._patches.append(InstancePatch(module, "forward", forward))

    def wrap_phase(
        self,
        owner: Any,
        name: str,
        phase: str,
        when: Callable[[], bool] | None = None,
        before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        """Measure every call of ``owner.<name>`` (e.g. ``engine.backward``) as ``phase``; with
        ``when``, only calls for which it returns True. ``before`` / ``after`` run just outside
        the measured phase (e.g. noting the accumulation boundary, ending the micro-step)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.stopped or self.finished or self._step is None or (when is not None and not when()):
                return original(*args, **kwargs)
            if before is not None:
                before()
            with self._phase_guard(phase):
                out = original(*args, **kwargs)
            if after is not None:
                after()
            return out

        self._patches.append(InstancePatch(owner, name, call))

    def guard(self, owner: Any, name: str) -> None:
        """Make an exception inside ``owner.<name>`` end the recording as one inside a wrapped phase
        does (for calls made inside a phase opened by hand, e.g. the Trainer's ``optimizer.step``)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except BaseException as exc:
                if not (self.stopped or self.finished):
                    self._fail_open_phase(exc)
                    self._stop(exc)
                raise

        self._patches.append(InstancePatch(owner, name, call))

    def detach(self) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches.clear()
        if self._stop_recording_batches is not None:
            self._stop_recording_batches()
            self._stop_recording_batches = None

    # ---- micro-steps, driven by the front ends ------------------------------------------------
    def begin_optimizer_step(self, index: int) -> None:
        """The framework starts accumulating optimizer step ``index`` (0-based)."""
        self.optimizer_step = int(index)
        self.micro_step = 0

    def set_boundary(self, boundary: bool) -> None:
        """Whether the current micro-step ends the accumulation (the optimizer steps in it)."""
        self._boundary = bool(boundary)

    def open_phase(self, phase: str) -> None:
        """Open ``phase`` by hand (closed by :meth:`close_phase`): for phases that start and end in
        two different callbacks, e.g. the Trainer's optimizer step without DeepSpeed."""
        if self.stopped or self.finished or self._step is None or self._open_phase is not None:
            return
        cm = self._step.phase(phase)
        cm.__enter__()
        self._open_phase = (phase, cm)

    def close_phase(self) -> None:
        if self._open_phase is None:
            return
        phase, cm = self._open_phase
        self._open_phase = None
        cm.__exit__(None, None, None)
        self._phases_done.add(phase)

    def end_micro_step(self) -> None:
        """The current micro-step is over: its record is written (and flushed) now."""
        self.close_phase()
        step = self._step
        if step is None:
            return
        self._step = None
        assert self.profiler is not None
        boundary = self._boundary if self._boundary is not None else ("step" in self._phases_done)
        self.profiler.step_fields = {"optimizer_step": self.optimizer_step, "micro_step": self.micro_step, "boundary": boundary}
        step.__exit__(None, None, None)
        self._micro_index += 1
        if boundary:
            self.optimizer_step += 1
            self.micro_step = 0
        else:
            self.micro_step += 1
        self._boundary = None
        self._phases_done = set()

    # ---- the end --------------------------------------------------------------------------------
    def finish(self, *, write_report: bool = True, print_table: bool = True) -> dict[str, Any] | None:
        """End the last micro-step, stop tracking, gather every rank into ``memprof.json`` with the
        estimate for the recorded setup (rank 0), write ``report.html`` beside it. A collective:
        every rank calls it. Returns the run document on rank 0, None elsewhere."""
        if self.finished:
            return None
        self.end_micro_step()
        self.detach()
        self.finished = True
        profiler = self.profiler
        if profiler is None:  # no training forward ever ran on this rank
            profiler = self._start(None)
        if self._tracking:
            self._tracking = False
            profiler.__exit__(None, None, None)
        return finish_run(profiler, prog="memprof", owns_process_group=False, write_report=write_report,
                          print_table=print_table)

    # ---- internals ----------------------------------------------------------------------------
    def _start(self, shape: tuple[int, ...] | None) -> StepFieldsProfiler:
        profiler = new_step_profiler(self.out_dir, engine=self.engine, model=self.model, optimizer=self.optimizer,
                                     run=self._describe(shape), memory_budget=self._memory_budget, ddp=self.ddp,
                                     frozen_models=self.frozen_models)
        profiler.__enter__()
        self._tracking = True
        self.profiler = profiler
        return profiler

    def _before_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.profiler is None:
            self._start(batch_shape(args, kwargs))
        if self._step is not None and "forward" in self._phases_done:
            self.end_micro_step()  # the loop moved on to the next micro-batch without telling us
        if self._step is None:
            assert self.profiler is not None
            self._step = self.profiler.step(self._micro_index)
            self._step.__enter__()

    @contextmanager
    def _phase_guard(self, phase: str) -> Iterator[None]:
        """``with step.phase(phase)``; an exception inside stops the recording (see module doc)."""
        step = self._step
        if step is None:
            yield
            return
        try:
            with step.phase(phase):
                yield
        except BaseException as exc:
            self._stop(exc)
            raise
        self._phases_done.add(phase)

    def _fail_open_phase(self, exc: BaseException) -> None:
        if self._open_phase is None:
            return
        _, cm = self._open_phase
        self._open_phase = None
        # writes the oom record when it is one; the generator re-raises exc, already on its way up
        with contextlib.suppress(BaseException):
            cm.__exit__(type(exc), exc, exc.__traceback__)

    def _stop(self, exc: BaseException) -> None:
        """An exception ended training mid-phase: keep what is on disk, stop tracking."""
        if self.stopped:
            return
        self.stopped = True
        step, self._step = self._step, None
        try:
            if step is not None:
                step.__exit__(type(exc), exc, exc.__traceback__)  # writes the oom record when it is one
            if self.profiler is not None and self._tracking:
                self._tracking = False
                self.profiler.__exit__(type(exc), exc, exc.__traceback__)
        finally:
            self.detach()
