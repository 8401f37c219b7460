"""EstimateInputs for a run's own setup, from the ``run`` metadata the launcher or the integrations
recorded (memprof/run/files.py keys): the run's record over its DeepSpeed config."""

from __future__ import annotations

import math
from typing import Any

from memprof.engines import Engine, Fsdp2Settings
from memprof.errors import MemprofError
from memprof.estimate.inputs import ATTN_IMPLEMENTATIONS, EstimateInputs
from memprof.estimate.settings import settings_from_deepspeed_config
from memprof.peft_config import lora_setup_from_dict
from memprof.units import is_positive_int


def _run_int(value: Any, key: str, positive: bool = False) -> int:
    """An integer field of a run's metadata (the launcher writes ints; a JSON writer may emit 2.0)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and float(value) == int(value) and (value > 0 if positive else value >= 0))
    if not ok:
        kind = "a positive whole number" if positive else "a whole number of at least 0"
        raise MemprofError(f"the run's {key} is {value!r}, not {kind}: the run file is corrupted; re-run or re-gather it")
    return int(value)


# TRL 1.16's trainers whose compute_loss runs add_fused_lm_head (memprof.estimate.trainer_terms)
TRL_FUSED_HEAD_TRAINERS = ("SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "RLOOTrainer")

_TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _fsdp2_dtype(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if value not in _TORCH_DTYPES:
        raise MemprofError(f"the run's fsdp2.{key} is {value!r}: memprof models float32, bfloat16 and float16")
    return _TORCH_DTYPES[value]


def _fsdp2_fields(record: dict[str, Any]) -> dict[str, Any]:
    """EstimateInputs fields for the run's ``fsdp2`` record (memprof.measure.ownership.fsdp2_record):
    the engine, its knobs, the script's torch optimizer, the compute dtype (param_dtype, else the
    sharded parameters' own)."""
    param_dtype = _fsdp2_dtype(record, "param_dtype")
    settings = Fsdp2Settings(reshard_after_forward=record.get("reshard_after_forward") is not False,
                             param_dtype=param_dtype, reduce_dtype=_fsdp2_dtype(record, "reduce_dtype"),
                             offload_params=record.get("offload_params") == "cpu")
    out: dict[str, Any] = {"engine": Engine.FSDP2, "fsdp2": settings, "torch_adam": True, "zero_stage": 0}
    precision = param_dtype or _fsdp2_dtype(record, "sharded_dtype")
    if precision is not None:
        out["precision"] = precision
    return out


def recorded_engine(run: dict[str, Any]) -> Engine:
    """The engine a run trained under, from its record: FSDP2 where MemoryProfiler recorded
    ``fully_shard`` modules (``run["fsdp2"]``), DDP where the integrations recorded a DDP wrapper
    (``run["ddp"]``), each only without a DeepSpeed config; DeepSpeed otherwise."""
    if not run.get("deepspeed_config"):
        if isinstance(run.get("fsdp2"), dict):
            return Engine.FSDP2
        if isinstance(run.get("ddp"), dict):
            return Engine.DDP
    return Engine.DEEPSPEED


def inputs_from_run(run: dict[str, Any]) -> EstimateInputs:
    """EstimateInputs for a run's own setup, from the launcher's ``run`` metadata (memprof/run/files.py)."""
    if not isinstance(run, dict):
        raise MemprofError("run metadata must be an object")
    ds = run.get("deepspeed_config") or {}
    world = run.get("world_size")
    world = world if is_positive_int(world) else 1
    settings = settings_from_deepspeed_config(ds, "the run's deepspeed_config", world_size=world) if ds else {}
    model_config = run.get("model_config")
    kw: dict[str, Any] = dict(settings)
    for key in ("world_size", "nodes", "zero_stage", "micro_batch", "seq_len"):
        if run.get(key) is not None:
            kw[key] = _run_int(run[key], key)
    for key in ("optimizer", "precision"):
        if run.get(key) is not None:
            kw[key] = str(run[key])
    if run.get("gradient_accumulation_steps") is not None:
        kw["gradient_accumulation_steps"] = _run_int(run["gradient_accumulation_steps"], "gradient_accumulation_steps", positive=True)
    if run.get("activation_checkpointing") is not None:
        kw["activation_checkpointing"] = bool(run["activation_checkpointing"])
    engine = recorded_engine(run)
    if engine is Engine.DDP:
        kw.update(engine=Engine.DDP, ddp_gradient_as_bucket_view=bool(run["ddp"].get("gradient_as_bucket_view", False)))
    elif engine is Engine.FSDP2:
        kw.update(_fsdp2_fields(run["fsdp2"]))
    # a torch.optim Adam the framework built itself (HF Trainer, accelerate: memprof.integrations)
    # keeps a step tensor per parameter, which its DeepSpeed config cannot say
    if run.get("torch_adam") is True:
        kw["torch_adam"] = True
    if isinstance(model_config, dict):
        kw["model_config"] = model_config
        attn = model_config.get("_attn_implementation") or model_config.get("attn_implementation")
        if attn in ATTN_IMPLEMENTATIONS:
            kw["attn_implementation"] = attn
    elif run.get("n_params") is not None:
        kw["n_params"] = _run_int(run["n_params"], "n_params", positive=True)
    else:
        raise MemprofError(
            "the run records neither model_config nor n_params, so it cannot be re-estimated: "
            "re-run it with a newer memprof launcher"
        )
    if isinstance(run.get("peft_config"), dict):  # memprof.run.facts.peft_facts: the adapter config
        kw["peft"] = lora_setup_from_dict(run["peft_config"], "the run's peft_config")
    kw.update(_reference_fields(run.get("reference_model"), model_config))
    kw.update(_trainer_fields(run.get("trainer")))
    if run.get("model") is not None:
        kw["model_name"] = str(run["model"])
    if run.get("device_type") is not None:
        kw["device_type"] = str(run["device_type"])
    # recorded by the launcher on CUDA runs (run_meta.cuda_device_facts), e.g. "9.0"
    if kw.get("device_type") == "cuda" and isinstance(run.get("cuda_capability"), str):
        kw["cuda_capability"] = run["cuda_capability"]
    # what the launcher's own data set tensors hold for the whole run, when the run records it
    data_bytes = run.get("data_tensor_bytes")
    if isinstance(data_bytes, int) and not isinstance(data_bytes, bool) and data_bytes >= 0:
        kw["script_resident_bytes"] = data_bytes
    return EstimateInputs(**kw)


def _reference_fields(reference: Any, model_config: Any) -> dict[str, Any]:
    """EstimateInputs fields for the run's ``reference_model`` record
    (memprof.integrations.transformers.describe_reference_model)."""
    kw: dict[str, Any] = {}
    if not isinstance(reference, dict):
        return kw
    if reference.get("same_config_as_policy") and isinstance(model_config, dict):
        kw["reference_model"] = model_config
    elif isinstance(reference.get("model_config"), dict):
        kw["reference_model"] = reference["model_config"]
    elif is_positive_int(reference.get("n_params")):
        kw["reference_model"] = {"n_params": reference["n_params"]}
    threshold = reference.get("param_persistence_threshold")  # the reference engine's own (ZeRO-3)
    if threshold is not None:
        kw["reference_persistence_threshold"] = _run_int(threshold, "reference_model.param_persistence_threshold")
    return kw


def _trainer_fields(trainer: Any) -> dict[str, Any]:
    """EstimateInputs fields for the run's ``trainer`` record (memprof.integrations.transformers):
    TRL's loss from the trainer class, DPO's precomputed reference log-probs, and the checkpoint
    kind from ``gradient_checkpointing_kwargs`` (the trainer's final choice: TRL rewrites it)."""
    kw: dict[str, Any] = {}
    if not isinstance(trainer, dict):
        return kw
    cls = trainer.get("trainer_class")
    if cls == "DPOTrainer":
        kw["loss_implementation"] = "trl_dpo"
        kw["precompute_ref_log_probs"] = trainer.get("precompute_ref_log_probs") is True
    elif cls in TRL_FUSED_HEAD_TRAINERS:
        kw["loss_implementation"] = "trl_fused_head"
    ckpt = trainer.get("gradient_checkpointing_kwargs")
    if trainer.get("gradient_checkpointing") and isinstance(ckpt, dict) and isinstance(ckpt.get("use_reentrant"), bool):
        kw["checkpoint_reentrant"] = ckpt["use_reentrant"]
    return kw
