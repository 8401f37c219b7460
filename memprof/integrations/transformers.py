"""memprof in HF Trainer runs: ``Trainer(..., callbacks=[MemprofCallback(out_dir="runs/x")])``.

Works under ``deepspeed``, ``torchrun``, ``accelerate launch`` or plain ``python``, on CPU (gloo) and
GPUs (nccl), with or without DeepSpeed. Per rank, per micro-step (one profiler step each, with its
optimizer step, its index in the accumulation and whether the optimizer stepped in it) the
``forward``, ``backward`` and ``step`` phases, each with its end and its real peak split into
memprof's categories; ``rank<R>.jsonl`` as it goes; at the end of training ``memprof.json`` (with
the estimate for the setup the engine resolved) and ``report.html`` on rank 0.

Where the phases come from (transformers 5.x ``Trainer._run_epoch`` / ``training_step``,
accelerate ``DeepSpeedEngineWrapper.backward``):

* The Trainer calls ``model_wrapped(**inputs)`` inside ``compute_loss``; ``model_wrapped`` is the
  DeepSpeed engine, the DDP wrapper or the model. Its ``forward`` is the ``forward`` phase, the
  same call memprof's launcher measures (``engine(input_ids=..., labels=...)``).
* Under DeepSpeed, ``Accelerator.backward`` runs ``engine.backward(loss)`` and, on the last
  micro-batch of the accumulation only, ``engine.step()``; both happen inside ``training_step``,
  before any callback (``on_pre_optimizer_step`` comes after ``engine.step`` returned, and the
  Trainer's own ``optimizer.step()`` is accelerate's no-op ``DeepSpeedOptimizerWrapper.step``).
  No callback separates them, so ``engine.backward`` and ``engine.step`` are wrapped: ``backward``
  and ``step`` are exactly those two calls, as in the launcher.
* Without DeepSpeed, ``backward`` is ``Accelerator.backward`` (``loss.backward()``; DDP's gradient
  all-reduce runs inside it), and ``step`` runs from ``on_pre_optimizer_step`` to ``on_step_end``:
  ``optimizer.step()``, ``lr_scheduler.step()`` and ``model.zero_grad()``. Gradient clipping
  (``_clip_grad_norm``, before ``on_pre_optimizer_step``) falls between backward and step, outside
  every phase: its few per-tensor norms are not in any phase peak.
* ``on_step_begin`` (first micro-batch of an optimizer step), ``on_substep_end`` (a micro-batch
  that did not step) and ``on_step_end`` (the one that did) delimit the micro-steps.

The engine, the accelerator and the wrapped model are the Trainer's own attributes; the callback
API passes only the unwrapped model and optimizer, so ``on_train_begin`` finds the Trainer that
called it on the call stack (the Trainer whose callback handler holds this callback).

TRL's trainers (``SFTTrainer``, ``DPOTrainer``, trl 1.16) are Trainers and need nothing more, with
one addition: DPOTrainer's ``ref_model`` (trl/trainer/dpo_trainer.py ``__init__``: the model passed
as ``ref_model``, or one built from the policy's config; under DeepSpeed a second engine from
trl/models/utils.py ``prepare_deepspeed``, ZeRO-3 partitioned or stage 0 otherwise) is walked as
``params`` and described under ``run["reference_model"]``. With PEFT and no ``ref_model``, DPO takes
its reference from the policy with the adapters disabled (``use_adapter`` in
``DPOTrainer._compute_loss``): there is no second model then, and nothing is added.

``on_log`` adds the per-category peak bytes of the last optimizer step to the Trainer's logs
(memprof.integrations.log_values); the callback moves itself first among the Trainer's callbacks
so the ``report_to`` callbacks see those keys, and adds them to the ``state.log_history`` entry the
Trainer appended just before (``Trainer.log`` appends before calling ``on_log``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from memprof.errors import MemprofError
from memprof.integrations.log_values import peak_log_values
from memprof.integrations.observed_run import describe_observed_run, device_type_of
from memprof.integrations.recorder import MicroStepRecorder
from memprof.run.deepspeed_shm import release_cpu_shm_segment

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - transformers is a dependency of memprof
    raise ImportError("memprof.integrations.transformers needs the transformers package") from e

# TrainingArguments fields that change memory, recorded verbatim under run["trainer"]
TRAINER_MEMORY_ARGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "bf16", "fp16", "tf32", "max_grad_norm", "optim", "torch_compile",
    "use_cpu", "deepspeed", "ddp_bucket_cap_mb", "torch_empty_cache_steps",
    "precompute_ref_log_probs",  # TRL's DPOConfig (None for other trainers): no reference forward in training
)


class MemprofCallback(TrainerCallback):
    """Profile a Trainer run's memory per rank, micro-step and phase (module docstring).

    ``out_dir``: where ``rank<R>.jsonl``, ``memprof.json`` and ``report.html`` go (every rank must
    be able to write there for its own rank file; no shared filesystem is needed for memprof.json).
    ``report``: write ``report.html`` at the end (rank 0). ``memory_budget``: simulated device
    capacity in bytes (memprof.measure.MemoryProfiler), or None.
    """

    def __init__(self, out_dir: str | os.PathLike, *, report: bool = True, memory_budget: int | None = None) -> None:
        self.out_dir = out_dir
        self.report = report
        self.memory_budget = memory_budget
        self.recorder: MicroStepRecorder | None = None
        self.run_doc: dict[str, Any] | None = None
        self._engine: Any = None

    # ---- Trainer events ----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = find_calling_trainer(self)
        engine = deepspeed_engine_of(trainer)
        self._engine = engine
        wrapped = trainer.model_wrapped if isinstance(trainer.model_wrapped, torch.nn.Module) else trainer.model
        if device_type_of(engine, trainer.model) == "cpu":
            release_cpu_shm_segment()  # every rank is here: the barrier inside is safe

        settings = {name: _jsonable(getattr(args, name, None)) for name in TRAINER_MEMORY_ARGS}
        settings["trainer_class"] = type(trainer).__name__
        settings["wrapped_model_class"] = type(wrapped).__name__
        ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
        reference = reference_model_of(trainer)
        move_callback_first(trainer, self)

        def describe(batch_shape: tuple[int, ...] | None) -> dict[str, Any]:
            run = describe_observed_run(
                engine=engine, model=trainer.model, optimizer=trainer.optimizer, batch_shape=batch_shape,
                integration="trainer", framework_settings=settings, ddp=ddp,
            )
            if engine is None:
                # no DeepSpeed config: the micro-batch and accumulation are the Trainer's own
                run["gradient_accumulation_steps"] = int(args.gradient_accumulation_steps)
                run.setdefault("micro_batch", int(args.per_device_train_batch_size))
            run["steps"] = int(state.max_steps) if getattr(state, "max_steps", None) else None
            if reference is not None:
                run["reference_model"] = describe_reference_model(reference, trainer.model)
            return run

        recorder = MicroStepRecorder(
            self.out_dir, engine=engine, model=trainer.model, optimizer=trainer.optimizer,
            describe=describe, memory_budget=self.memory_budget, ddp=ddp,
            frozen_models=(reference.module,) if reference is not None else (),
        )
        recorder.wrap_forward(wrapped)
        if engine is not None:
            recorder.wrap_phase(engine, "backward", "backward")
            recorder.wrap_phase(engine, "step", "step")
        else:
            recorder.wrap_phase(trainer.accelerator, "backward", "backward")
            recorder.guard(trainer.optimizer, "step")  # inside the step phase opened by hand
        self.recorder = recorder

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.begin_optimizer_step(state.global_step)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.set_boundary(False)
            self.recorder.end_micro_step()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None and self._engine is None:
            self.recorder.open_phase("step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.set_boundary(True)
            self.recorder.end_micro_step()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the last optimizer step's peak bytes (memprof.integrations.log_values) to ``logs``,
        which the report_to callbacks after this one read, and to the log_history entry of them."""
        profiler = self.recorder.profiler if self.recorder is not None else None
        if logs is None or profiler is None:
            return
        values = peak_log_values(profiler.last_optimizer_step)
        if not values:
            return
        logs.update(values)
        history = getattr(state, "log_history", None)
        # Trainer.log appended {**logs, "step": ...} just before on_log: the same log if its keys agree
        if history and all(history[-1].get(k) == v for k, v in logs.items() if k not in values):
            history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is None:
            return
        recorder, self.recorder = self.recorder, None
        self.run_doc = recorder.finish(write_report=self.report)


def find_calling_trainer(callback: TrainerCallback) -> Any:
    """The ``transformers.Trainer`` on the call stack whose callback handler holds ``callback``."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in getattr(candidate.callback_handler, "callbacks", ()):
            return candidate
        frame = frame.f_back
    raise MemprofError(
        "MemprofCallback was called outside a transformers Trainer: pass it as Trainer(..., callbacks=[MemprofCallback(...)])"
    )


def move_callback_first(trainer: Any, callback: TrainerCallback) -> None:
    """Put ``callback`` first in the Trainer's callback list, so its ``on_log`` runs before the
    report_to integrations' (added before the user's callbacks, transformers trainer.py ``__init__``)."""
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
    if isinstance(callbacks, list) and callback in callbacks:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


class ReferenceModel:
    """A frozen model the trainer holds beside the policy: ``module`` (the torch module whose
    parameters are walked) and ``engine`` (its DeepSpeed engine, or None)."""

    def __init__(self, module: torch.nn.Module, engine: Any) -> None:
        self.module, self.engine = module, engine


def reference_model_of(trainer: Any) -> ReferenceModel | None:
    """TRL's ``ref_model`` (DPOTrainer, KTOTrainer, ...), unwrapped from its DeepSpeed engine; None
    when the trainer has none (PEFT: the reference is the adapter-disabled policy) or it is the
    policy itself."""
    ref = getattr(trainer, "ref_model", None)
    if not isinstance(ref, torch.nn.Module):
        return None
    module = getattr(ref, "module", None)
    engine = ref if isinstance(module, torch.nn.Module) and hasattr(ref, "zero_optimization_stage") else None
    module = module if engine is not None else ref
    if module is trainer.model or module is getattr(trainer.model, "module", None):
        return None
    return ReferenceModel(module, engine)


def describe_reference_model(reference: ReferenceModel, policy: torch.nn.Module) -> dict[str, Any]:
    """``run["reference_model"]``: what the estimator needs to add it (memprof estimate
    --reference-model): its class, config (null when it is the policy's), parameter count, dtype and
    how DeepSpeed holds it (trl/models/utils.py ``prepare_deepspeed``: ZeRO-3 when the policy is,
    else stage 0, whole on every rank, no optimizer)."""
    from memprof.integrations.observed_run import model_config_dict
    from memprof.run.facts import count_parameters

    config = model_config_dict(reference.module)
    base = getattr(policy, "get_base_model", None)
    policy_config = model_config_dict(base() if callable(base) else policy)
    same = config is not None and policy_config is not None and _without_private(config) == _without_private(policy_config)
    first = next(reference.module.parameters(), None)
    engine = reference.engine
    stage = int(engine.zero_optimization_stage()) if engine is not None else None
    out = {
        "model_class": type(reference.module).__name__,
        "same_config_as_policy": same,
        "model_config": None if same else config,
        "n_params": count_parameters(reference.module),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "zero_stage": stage,
        "trainable": any(p.requires_grad for p in reference.module.parameters()),
    }
    if stage == 3:
        # the reference engine's own threshold: TRL prepares it before HF resolves the config's
        # hidden-size "auto" values, so it can differ from the policy's (memprof.estimate.core)
        out["param_persistence_threshold"] = int(engine.zero_param_persistence_threshold())
    return out


# keys that differ between two models of one config for reasons that do not change its shapes
# (TRL sets the policy's use_cache=False for gradient checkpointing; DeepSpeed casts the dtype)
_INCIDENTAL_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "use_cache")


def _without_private(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _INCIDENTAL_CONFIG_KEYS}


def deepspeed_engine_of(trainer: Any) -> Any:
    """The DeepSpeed engine the Trainer built (``trainer.model_wrapped``, also ``trainer.deepspeed``),
    or None when the run does not use DeepSpeed."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover
        return None
    for candidate in (getattr(trainer, "model_wrapped", None), getattr(trainer, "deepspeed", None)):
        if isinstance(candidate, DeepSpeedEngine):
            return candidate
    return None


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)
