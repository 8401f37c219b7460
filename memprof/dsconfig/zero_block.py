"""The ``zero_optimization`` block: its stage and the knobs that change memory, read as DeepSpeed
0.19.8's ``runtime/zero/config.py`` ``DeepSpeedZeroConfig`` reads them (defaults, ``stage3_*``
aliases, the deprecated ``cpu_offload`` / ``cpu_offload_param`` booleans and ``"zero_optimization":
true``, float sizes such as ``5e8``). Knobs the stage never reads are kept and named as ignored;
HF's hidden-size ``"auto"`` values are filled as ``trainer_config_finalize`` fills them.

Nothing else in memprof reads this block: callers that only need the offload devices of a config
DeepSpeed already ran use :func:`offload_devices`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from memprof.dsconfig.reading import Reading
from memprof.dsconfig.schema import AUTO, OFFLOAD_DEVICES, AutoValue, ZeroKnobs

_KNOB_KEYS = {
    # DeepSpeed key (and its pydantic alias) -> ZeroKnobs field
    "reduce_bucket_size": "reduce_bucket_size",
    "allgather_bucket_size": "allgather_bucket_size",
    "stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "prefetch_bucket_size": "prefetch_bucket_size",
    "stage3_max_live_parameters": "max_live_parameters",
    "max_live_parameters": "max_live_parameters",
    "stage3_max_reuse_distance": "max_reuse_distance",
    "max_reuse_distance": "max_reuse_distance",
    "stage3_param_persistence_threshold": "param_persistence_threshold",
    "param_persistence_threshold": "param_persistence_threshold",
    "stage3_model_persistence_threshold": "model_persistence_threshold",
    "model_persistence_threshold": "model_persistence_threshold",
    "sub_group_size": "sub_group_size",
}
# ZeroKnobs fields only ZeRO-3 reads (stage3.py, partitioned_param_coordinator.py)
_STAGE3_ONLY = {"prefetch_bucket_size", "max_live_parameters", "max_reuse_distance", "param_persistence_threshold",
                "model_persistence_threshold", "sub_group_size"}
# the keys HF fills from the model's hidden size (trainer_config_finalize)
_HIDDEN_AUTO = {
    "reduce_bucket_size": ("hidden_size² ", lambda h: h * h),
    "stage3_prefetch_bucket_size": ("int(0.9 x hidden_size²)", lambda h: int(0.9 * h * h)),
    "stage3_param_persistence_threshold": ("10 x hidden_size", lambda h: 10 * h),
}
_OFFLOAD_BLOCKS = ("offload_optimizer", "offload_param")
# DeepSpeedZeroConfig's deprecated booleans and the block each stands for
_DEPRECATED_OFFLOAD = (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param"))


def read_zero_block(ds: Mapping[str, Any], reading: Reading, hidden: int | None) -> tuple[int, ZeroKnobs]:
    """``(stage, knobs)`` of the config's ``zero_optimization`` block (stage 0 and DeepSpeed's
    defaults without one)."""
    zero = ds.get("zero_optimization")
    if zero is None:
        return 0, ZeroKnobs()
    if isinstance(zero, bool):  # deprecated form: true means stage 1 (read_zero_config_deprecated)
        return (1 if zero else 0), ZeroKnobs()
    if not isinstance(zero, dict):
        raise reading.fail("zero_optimization must be an object")
    stage = _stage(zero, reading)
    kw = _sizes(zero, stage, reading, hidden)
    kw.update(_switches(zero, stage, reading))
    kw.update(_offload(zero, reading))
    knobs = ZeroKnobs(**kw)
    if knobs.offload_optimizer != "none" and stage == 0:
        raise reading.fail("offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
    if knobs.offload_param != "none" and stage != 3:
        # only ZeRO-3 (stage3.py / partition_parameters.py) reads offload_param; DeepSpeed's
        # stage 0-2 engines train with the parameters on the device whatever it says
        reading.ignored.append(f"zero_optimization.offload_param ignored: DeepSpeed offloads parameters only at "
                               f"ZeRO stage 3 (stage is {stage}); parameters stay on the device")
        knobs = replace(knobs, offload_param="none")
    return stage, knobs


def written_zero_block(ds: Any) -> dict[str, Any]:
    """A config's ``zero_optimization`` block as written (an empty dict where it has none, or where it
    is the legacy ``true``), refusing nothing: for describing the settings of a run DeepSpeed
    already made (the report's engine rows), not for estimating (that is :func:`read_zero_block`)."""
    zero = ds.get("zero_optimization") if isinstance(ds, Mapping) else None
    return dict(zero) if isinstance(zero, dict) else {}


def offload_devices(ds: Mapping[str, Any]) -> tuple[str, str]:
    """``(offload_optimizer, offload_param)`` devices of a config as DeepSpeed reads them
    (``"none"``, ``"cpu"`` or ``"nvme"``; the deprecated booleans; ``offload_param`` only at stage 3),
    refusing nothing memprof does not model: for describing a run DeepSpeed already made."""
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return "none", "none"
    devices = {key: str(block.get("device", "none")).lower() for key in _OFFLOAD_BLOCKS
               if isinstance(block := zero.get(key), dict)}
    for old, new in _DEPRECATED_OFFLOAD:
        if zero.get(old) is True and new not in zero:
            devices[new] = "cpu"
    stage = zero.get("stage", 0)
    param = devices.get("offload_param", "none") if stage == 3 else "none"
    return devices.get("offload_optimizer", "none"), param


def _stage(zero: dict[str, Any], reading: Reading) -> int:
    stage = zero.get("stage", 0)
    if stage == AUTO:
        raise reading.fail('zero_optimization.stage is "auto": write 0, 1, 2 or 3 (or pass --zero-stage to memprof estimate)')
    if isinstance(stage, bool) or not isinstance(stage, (int, float)) or stage not in (0, 1, 2, 3):
        raise reading.fail(f"zero_optimization.stage is {stage!r}: ZeRO stages are 0, 1, 2 or 3")
    return int(stage)


def _sizes(zero: dict[str, Any], stage: int, reading: Reading, hidden: int | None) -> dict[str, Any]:
    """The bucket sizes and thresholds (elements), "auto" filled as HF fills it or left to DeepSpeed."""
    kw: dict[str, Any] = {}
    for key, name in _KNOB_KEYS.items():
        if key not in zero:
            continue
        dotted = f"zero_optimization.{key}"
        used = stage == 3 if name in _STAGE3_ONLY else stage > 0
        if zero[key] == AUTO:
            value = _hidden_auto(key, dotted, stage, used, reading, hidden)
            if value is not None:
                kw[name] = value
            continue
        kw[name] = reading.whole(zero[key], dotted)
        if name == "reduce_bucket_size" and kw[name] == 0:
            raise reading.fail(f"{dotted} = 0 must be a positive whole number of elements (DeepSpeedZeroConfig: gt=0)")
        if not used:
            reading.ignored.append(f"{dotted} ignored: DeepSpeed does not read it at ZeRO stage {stage}")
    if stage < 3:
        for key in zero:
            if key.startswith("stage3_") and key not in _KNOB_KEYS:
                reading.ignored.append(f"zero_optimization.{key} ignored: DeepSpeed does not read it at ZeRO stage {stage}")
    return kw


def _hidden_auto(key: str, dotted: str, stage: int, used: bool, reading: Reading, hidden: int | None) -> int | None:
    """What an "auto" size becomes: HF fills reduce_bucket_size at every stage and the stage-3 two at
    stage 3 only, from the model's hidden size; DeepSpeed drops any "auto" left (DeepSpeedConfigModel,
    strict=False) and keeps its default (None here)."""
    hf = _HIDDEN_AUTO.get(key)
    if hf is None or not (key == "reduce_bucket_size" or stage == 3):
        reading.auto.append(AutoValue(dotted, None, "DeepSpeed drops it and keeps its default"
                                      + ("" if used else f"; not read at ZeRO stage {stage}"), changes_memory=False))
        return None
    if hidden is not None:
        value = hf[1](hidden)
        reading.auto.append(AutoValue(dotted, value, f"{hf[0].strip()}, hidden size {hidden}, as HF's Trainer fills it"))
        return value
    if used:
        reading.auto.append(AutoValue(dotted, None, "pass --model or --model-config (HF fills it from the "
                                      "model's hidden size) or write a number"))
    else:
        reading.auto.append(AutoValue(dotted, None, f"not read at ZeRO stage {stage}", changes_memory=False))
    return None


def _switches(zero: dict[str, Any], stage: int, reading: Reading) -> dict[str, bool]:
    kw: dict[str, bool] = {}
    for key in ("overlap_comm", "contiguous_gradients"):
        value = zero.get(key)
        if value is None or value == AUTO:
            continue
        if not isinstance(value, bool):
            raise reading.fail(f"zero_optimization.{key} must be true or false")
        kw[key] = value
        if stage == 0:
            reading.ignored.append(f"zero_optimization.{key} ignored: DeepSpeed does not read it at ZeRO stage 0")
    return kw


def _offload(zero: dict[str, Any], reading: Reading) -> dict[str, Any]:
    """The offload devices and pin_memory of ``offload_optimizer`` / ``offload_param``."""
    kw: dict[str, Any] = {}
    for key in _OFFLOAD_BLOCKS:
        block = zero.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise reading.fail(f"zero_optimization.{key} must be an object like {{\"device\": \"cpu\"}}")
        device = str(block.get("device", "none")).lower()
        if device not in OFFLOAD_DEVICES:
            raise reading.fail(f"zero_optimization.{key}.device {device!r} is not supported by memprof: use 'cpu' or 'none'")
        kw[key] = device
        pin = block.get("pin_memory")
        if pin is not None:
            if not isinstance(pin, bool):
                raise reading.fail(f"zero_optimization.{key}.pin_memory must be true or false")
            kw[f"{key}_pin_memory"] = pin
    for old, new in _DEPRECATED_OFFLOAD:
        if zero.get(old) is True:
            if new in zero:  # DeepSpeed: "Cannot provide deprecated parameter ... and replacing parameter ... together"
                raise reading.fail(f"zero_optimization sets both {old} and {new}: DeepSpeed refuses that; keep {new}")
            kw[new] = "cpu"
            reading.derived.append(f"zero_optimization.{old}: true read as {new}.device cpu (DeepSpeed's deprecated alias)")
    return kw
