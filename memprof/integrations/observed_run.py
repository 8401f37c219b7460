"""What an integration records about a run memprof did not start: the ``run`` dict, read from the
objects the framework built.

The launcher writes ``run`` from its own flags (memprof/train/launched_run.py). Under HF Trainer or
accelerate the truth is what the framework resolved: the DeepSpeed engine's own config dict (after
HF filled in every ``"auto"``: ``HfTrainerDeepSpeedConfig.trainer_config_process`` /
``trainer_config_finalize`` in transformers/integrations/deepspeed.py, and accelerate's
``Accelerator._prepare_deepspeed``), the engine's stage / precision / micro-batch / accumulation,
the model's own config and the batch shape seen in the first forward. The keys are the launcher's
(memprof/run/files.py), so ``memprof.estimate.inputs_from_run``, ``memprof compare`` and the report
read both alike.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch

from memprof.dsconfig import optimizer_name_from_block, read_deepspeed_config
from memprof.errors import MemprofError
from memprof.optimizers import torch_optimizer_facts
from memprof.run.facts import count_nodes, count_parameters, cuda_device_facts, package_version, package_versions, peft_facts


def resolved_deepspeed_config(engine: Any) -> dict[str, Any]:
    """The config dict the engine was built from, as JSON (DeepSpeedConfig keeps it as
    ``_param_dict``, deepspeed/runtime/config.py). A deep copy: nothing DeepSpeed changes later
    leaks in, and nothing here changes the engine's."""
    raw = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if not isinstance(raw, dict):
        return {}
    return strict_json(copy.deepcopy(raw))


def strict_json(obj: Any) -> Any:
    """``obj`` as strict JSON values: run files are read by browsers too, whose JSON has no
    Infinity or NaN (accelerate sets ``steps_per_print`` to ``float("inf")``, utils/dataclasses.py
    DeepSpeedPlugin); those become the strings "inf" / "nan", anything not JSON its repr."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def optimizer_facts(optimizer: Any, ds_config: dict[str, Any]) -> dict[str, Any]:
    """``optimizer`` (a zoo name the estimator knows, or the class name) and ``torch_adam``.

    A DeepSpeed ``optimizer`` block decides (engine._configure_basic_optimizer); otherwise the
    optimizer object the framework passed (HF Trainer without a block creates torch.optim.AdamW,
    transformers trainer.py ``create_optimizer``), unwrapped from accelerate's and DeepSpeed's wrappers.
    """
    block = ds_config.get("optimizer") if ds_config else None
    if isinstance(block, dict) and isinstance(block.get("type"), str):
        try:
            name = optimizer_name_from_block(block, "the engine's DeepSpeed config")
        except MemprofError:
            name = block["type"].lower()
        params = block.get("params") if isinstance(block.get("params"), dict) else {}
        return {"optimizer": name, "torch_adam": bool(params.get("torch_adam", False)) or name == "amsgrad"}
    inner = _innermost_optimizer(optimizer)
    if inner is None:
        return {"optimizer": None, "torch_adam": False}
    # the zoo's own table names it (memprof.optimizers): torch's Adam/AdamW (fused or not: HF
    # Trainer's default "adamw_torch_fused" keeps no temporaries), SGD and its momentum variants,
    # RMSprop, Adagrad, DeepSpeed's FusedAdam / DeepSpeedCPUAdam
    return torch_optimizer_facts(inner)


def _innermost_optimizer(optimizer: Any) -> Any:
    """accelerate's AcceleratedOptimizer / DeepSpeedOptimizerWrapper and ZeRO's wrappers all keep
    the wrapped one as ``.optimizer``; the innermost is the algorithm."""
    seen = 0
    while optimizer is not None and hasattr(optimizer, "optimizer") and seen < 5:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def model_config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    """The HF model's config as a dict (``PretrainedConfig.to_dict``), with its attention
    implementation under ``_attn_implementation`` (to_dict leaves private attributes out; the
    estimator reads that key, memprof.estimate.inputs.inputs_from_run)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    out = strict_json(config.to_dict())
    attn = getattr(config, "_attn_implementation", None)
    if isinstance(attn, str):
        out["_attn_implementation"] = attn
    return out


def activation_checkpointing_on(model: torch.nn.Module) -> bool:
    """HF gradient checkpointing: a submodule with ``gradient_checkpointing`` set (transformers
    modeling_utils.py ``is_activation_checkpointing``)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def describe_observed_run(
    *,
    engine: Any,
    model: torch.nn.Module,
    optimizer: Any,
    batch_shape: tuple[int, ...] | None,
    integration: str,
    framework_settings: dict[str, Any] | None = None,
    precision_without_deepspeed: str = "fp32",
    ddp: Any = None,
) -> dict[str, Any]:
    """The ``run`` dict (memprof/run/files.py keys) for this rank's view of the run.

    ``engine``: the DeepSpeed engine, or None (plain / DDP). ``batch_shape``: the first training
    batch's ``input_ids`` shape (micro-batch, sequence length). ``framework_settings``: the
    Trainer's or accelerate's own settings that change memory, kept verbatim under ``trainer`` /
    ``accelerate``. ``ddp``: the ``DistributedDataParallel`` wrapper, if any: ``run["ddp"]`` records
    what sizes its gradient buckets (``gradient_as_bucket_view``, the bucket cap).
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    device_type = device_type_of(engine, model)
    ds_config = resolved_deepspeed_config(engine) if engine is not None else {}
    run: dict[str, Any] = {
        "model": getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__,
        "model_class": type(model).__name__,
        "model_config": model_config_dict(model),
        "n_params": count_parameters(model),
        "world_size": world,
        "nodes": count_nodes(os.environ, world),
        "integration": integration,
    }
    if engine is not None:
        run.update(
            zero_stage=int(engine.zero_optimization_stage()),
            precision="bf16" if engine.bfloat16_enabled() else ("fp16" if engine.fp16_enabled() else "fp32"),
            micro_batch=int(engine.train_micro_batch_size_per_gpu()),
            gradient_accumulation_steps=int(engine.gradient_accumulation_steps()),
            **offload_devices(ds_config, world),
        )
    else:
        run.update(zero_stage=0, precision=precision_without_deepspeed, offload_optimizer="none", offload_param="none")
        if batch_shape:
            run["micro_batch"] = int(batch_shape[0])
    run.update(optimizer_facts(optimizer, ds_config))
    if batch_shape and len(batch_shape) >= 2:
        run["seq_len"] = int(batch_shape[1])
    run["activation_checkpointing"] = activation_checkpointing_on(model)
    # PEFT adapters (peft_config, what inputs_from_run re-estimates) and the trainable / frozen counts
    run.update(peft_facts(model))
    run.update(device_type=device_type, backend=backend, versions=package_versions())
    run["versions"]["accelerate"] = package_version("accelerate")
    run["deepspeed_config"] = ds_config or None
    if ddp is not None and engine is None:
        run["ddp"] = {"gradient_as_bucket_view": bool(getattr(ddp, "gradient_as_bucket_view", False)),
                      "bucket_cap_bytes": int(getattr(ddp, "bucket_bytes_cap", 0))}
    if framework_settings:
        run[integration.split(".")[0]] = framework_settings
    run.update(cuda_device_facts(device_type))
    return run


def offload_devices(ds_config: dict[str, Any], world_size: int) -> dict[str, str | None]:
    """``offload_optimizer`` / ``offload_param`` as memprof's one DeepSpeed-config reader settles
    them (deprecated ``cpu_offload`` booleans, ``offload_param`` ignored below ZeRO-3 as DeepSpeed
    ignores it). A config the reader refuses (a feature memprof does not model: its estimate is
    then null too) records None for both: the run is still profiled, and ``deepspeed_config``
    holds what was asked."""
    try:
        settings = read_deepspeed_config(ds_config, source="the engine's DeepSpeed config", world_size=world_size)
    except MemprofError:
        return {"offload_optimizer": None, "offload_param": None}
    return {"offload_optimizer": settings.offload_optimizer, "offload_param": settings.offload_param}


def device_type_of(engine: Any, model: torch.nn.Module) -> str:
    """The device the model computes on: the engine's, else the first parameter's."""
    device = getattr(engine, "device", None) if engine is not None else None
    if isinstance(device, (torch.device, str)):
        return torch.device(device).type
    for p in model.parameters():
        return p.device.type
    return "cpu"
