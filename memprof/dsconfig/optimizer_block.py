"""The ``optimizer`` block: which optimizer of the zoo (memprof.optimizers) DeepSpeed builds from
it, as ``runtime/engine.py`` ``_configure_basic_optimizer`` does (DeepSpeed's "Adam" is AdamW unless
``adam_w_mode`` is false; FusedAdam unless ``torch_adam``; SGD / RMSprop go to torch.optim, whose
kwargs pick the row). Refuses what torch refuses and what the zoo does not model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from memprof.dsconfig.reading import Reading
from memprof.dsconfig.schema import AUTO, AutoValue
from memprof.errors import MemprofError
from memprof.optimizers import TORCH_DEEPSPEED_TYPES, UNMODELLED_DEEPSPEED_TYPES, ZOO, deepspeed_types_text

# the types DeepSpeed builds its own Adam for (ADAM_OPTIMIZER, ADAMW_OPTIMIZER in engine.py)
_ADAM_TYPES = frozenset(o.deepspeed_type.lower() for o in ZOO.values() if o.deepspeed_builds_its_own)
# the types DeepSpeed hands to getattr(torch.optim, type), lower-cased as this reader matches them
_TORCH_TYPES = frozenset(t.lower() for t in TORCH_DEEPSPEED_TYPES)


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


def config_number(params: Mapping[str, Any], key: str, source: str, default: float = 0.0) -> float:
    """A numeric optimizer setting (``momentum``, ``dampening``, ...) of ``optimizer.params``;
    MemprofError naming the field when it is not a finite number."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MemprofError(f"{source}: optimizer.params.{key} is {value!r}: it must be a number, e.g. 0.9")
    return float(value)


def torch_optimizer_name(kind: str, params: Mapping[str, Any], source: str) -> str:
    """The zoo name of DeepSpeed's torch.optim ``SGD`` / ``RMSprop`` block (``kind`` lower-cased),
    refusing what torch refuses or what memprof does not model."""
    momentum = config_number(params, "momentum", source)
    if momentum < 0:
        raise MemprofError(f"{source}: optimizer.params.momentum is {params.get('momentum')!r}: it must be 0 or more")
    if kind == "sgd":
        nesterov = bool(params.get("nesterov", False))  # torch.optim.SGD tests its truth value
        if nesterov and (momentum <= 0 or config_number(params, "dampening", source) != 0):
            # torch.optim.SGD: "Nesterov momentum requires a momentum and zero dampening"
            raise MemprofError(f"{source}: SGD with nesterov needs momentum > 0 and dampening 0 in optimizer.params")
        return "nesterov" if nesterov else ("momentum" if momentum > 0 else "sgd")
    if kind == "rmsprop":
        # momentum and centered add buffers (momentum_buffer, grad_avg) the zoo does not model.
        if momentum > 0 or params.get("centered", False):
            raise MemprofError(f"{source}: RMSprop with momentum or centered=true is not supported by memprof: drop them")
        return "rmsprop"
    raise ValueError(f"not a torch.optim type memprof maps: {kind!r}")


def optimizer_name_from_block(opt: Any, source: str) -> str:
    """Map DeepSpeed's optimizer block to a zoo name (engine._configure_basic_optimizer)."""
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        raise MemprofError(f"{source}: optimizer must be an object with a \"type\", e.g. {{\"type\": \"AdamW\"}}")
    kind = opt["type"].lower()
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise MemprofError(f"{source}: optimizer.params must be an object")
    if kind in _ADAM_TYPES:
        # DeepSpeed's "Adam" means AdamW unless adam_w_mode is false (engine._configure_basic_optimizer)
        adam_w = kind == "adamw" or bool(params.get("adam_w_mode", True))
        return "amsgrad" if params.get("amsgrad") else ("adamw" if adam_w else "adam")
    if kind in _TORCH_TYPES:
        return torch_optimizer_name(kind, params, source)
    if kind in ZOO and ZOO[kind].deepspeed_type.lower() == kind:  # a type with one row (Adagrad)
        return kind
    supported = deepspeed_types_text(" or ")
    feature = UNMODELLED_DEEPSPEED_TYPES.get(kind.replace("_", "").replace("-", ""))
    if feature is not None:
        raise MemprofError(f"{source}: optimizer type {opt['type']!r} ({feature}) is not modelled by memprof: use {supported}")
    raise MemprofError(f"{source}: unknown optimizer type {opt['type']!r}, not modelled by memprof: use {supported}")
