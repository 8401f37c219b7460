"""The ``optimizer`` block: its shape, its "auto" params, and the zoo name DeepSpeed's type and
params stand for (the mapping itself is the zoo's, memprof.optimizers ``zoo_name_of_deepspeed_type``,
after ``runtime/engine.py`` ``_configure_basic_optimizer``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memprof.dsconfig.reading import Reading
from memprof.dsconfig.schema import AUTO, AutoValue
from memprof.errors import MemprofError
from memprof.optimizers import config_number, zoo_name_of_deepspeed_type

__all__ = ["config_number", "optimizer_name_from_block", "read_optimizer_block"]


def read_optimizer_block(ds: Mapping[str, Any], reading: Reading) -> tuple[str | None, str | None, dict[str, Any], bool]:
    """``(zoo name, "type" as written, params, torch_adam)``; ``(None, None, {}, False)`` without a block."""
    block = ds.get("optimizer")
    if block is None:
        return None, None, {}, False
    name = optimizer_name_from_block(block, reading.where)
    params = block.get("params") or {}
    for key, value in params.items():
        if value == AUTO:
            reading.auto.append(AutoValue(f"optimizer.params.{key}", None, "HF fills it from TrainingArguments; "
                                          "no effect on memory", changes_memory=False))
    return name, block["type"], dict(params), params.get("torch_adam") is True


def optimizer_name_from_block(opt: Any, source: str) -> str:
    """Map DeepSpeed's optimizer block to a zoo name (engine._configure_basic_optimizer)."""
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        raise MemprofError(f"{source}: optimizer must be an object with a \"type\", e.g. {{\"type\": \"AdamW\"}}")
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise MemprofError(f"{source}: optimizer.params must be an object")
    return zoo_name_of_deepspeed_type(opt["type"], params, source)
