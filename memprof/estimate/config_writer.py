"""The recommended setup as a DeepSpeed JSON that ``launch/train.py`` (and DeepSpeed) run as it is.

Starts from the user's own config when there is one, so everything the advisor did not change
(optimizer block, learning rate, logging, other keys) is kept; an HF-style config keeps its "auto"
values, and the TrainingArguments that settle them are returned for the user to set.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from memprof.dsconfig import AUTO, load_config_file
from memprof.estimate.inputs import EstimateInputs

# The "optimizer" block DeepSpeed 0.19.8 builds each zoo optimizer from (runtime/engine.py
# _configure_basic_optimizer: Adam/AdamW/Adagrad by name, anything else getattr(torch.optim, type));
# AMSGrad is torch's Adam, which DeepSpeed only builds with "torch_adam": true.
_OPTIMIZER_BLOCKS: dict[str, dict[str, Any]] = {
    "sgd": {"type": "SGD", "params": {"lr": 1e-3}},
    "momentum": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}},
    "nesterov": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9, "nesterov": True}},
    "rmsprop": {"type": "RMSprop", "params": {"lr": 1e-3}},
    "adagrad": {"type": "Adagrad", "params": {"lr": 1e-3}},
    "adam": {"type": "Adam", "params": {"lr": 1e-4}},
    "adamw": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    "amsgrad": {"type": "Adam", "params": {"lr": 1e-4, "amsgrad": True, "torch_adam": True}},
}


def recommended_config(source: str | os.PathLike | None, base: EstimateInputs,
                       best: EstimateInputs) -> tuple[dict[str, Any], list[str]]:
    """(the DeepSpeed config dict for ``best``, the TrainingArguments to set for its "auto" values)."""
    ds = copy.deepcopy(load_config_file(source)) if source is not None else _fresh(base)
    training_args: list[str] = []
    _set_batch(ds, best, training_args)
    _set_precision(ds, best, training_args)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = best.zero_stage
    for key, device in (("offload_optimizer", best.zero.offload_optimizer), ("offload_param", best.zero.offload_param)):
        if device == "none":
            zero.pop(key, None)
        else:
            zero[key] = {**(zero.get(key) or {}), "device": device}
    if best.activation_checkpointing and not base.activation_checkpointing:
        if _has_auto(ds):  # an HF config: the Trainer checkpoints when TrainingArguments say so
            training_args.append("gradient_checkpointing=True")
        else:  # the launcher checkpoints each block when the config has this block
            ds["activation_checkpointing"] = {}
    return ds, training_args


def _fresh(base: EstimateInputs) -> dict[str, Any]:
    block = copy.deepcopy(_OPTIMIZER_BLOCKS[base.optimizer])
    if base.torch_adam and base.optimizer in ("adam", "adamw"):
        block["params"]["torch_adam"] = True
    return {"train_micro_batch_size_per_gpu": base.micro_batch, "gradient_accumulation_steps": 1,
            "steps_per_print": 1000000, "optimizer": block, "zero_optimization": {"stage": base.zero_stage}}


def _has_auto(ds: dict[str, Any]) -> bool:
    return AUTO in (ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps"),
                    ds.get("train_batch_size"))


def _set_batch(ds: dict[str, Any], best: EstimateInputs, training_args: list[str]) -> None:
    for key, value, arg in (("train_micro_batch_size_per_gpu", best.micro_batch, "per_device_train_batch_size"),
                            ("gradient_accumulation_steps", best.gradient_accumulation_steps, "gradient_accumulation_steps")):
        if ds.get(key) == AUTO:
            training_args.append(f"{arg}={value}")
        else:
            ds[key] = value
    if "train_batch_size" in ds and ds["train_batch_size"] != AUTO:
        ds["train_batch_size"] = best.micro_batch * best.gradient_accumulation_steps * best.world_size


def _set_precision(ds: dict[str, Any], best: EstimateInputs, training_args: list[str]) -> None:
    for key in ("bf16", "fp16"):
        block = ds.get(key)
        want = best.precision == key
        if isinstance(block, dict) and block.get("enabled") == AUTO:
            if want:
                training_args.append(f"{key}=True")
            continue
        if want:
            ds[key] = {**(block if isinstance(block, dict) else {}), "enabled": True}
        elif isinstance(block, dict):
            block["enabled"] = False
