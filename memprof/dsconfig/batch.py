"""Batch sizes: ``train_batch_size``, ``train_micro_batch_size_per_gpu`` and
``gradient_accumulation_steps`` as ``runtime/config.py`` ``_set_batch_related_parameters`` /
``_batch_assertion`` read them, with the caller's values (the estimator's ``--micro-batch`` and
``--gradient-accumulation-steps``) laid over them here, once.

The rule: a flag's value is the value that applies. An "auto" it meets is filled with it, as HF's
Trainer fills it from ``TrainingArguments``. DeepSpeed's derivation of a missing micro-batch or
accumulation from ``train_batch_size`` runs on the config's own values, and only for the value no
flag gives. A stated ``train_batch_size`` gives way to the flags (they change what it multiplies
out of); DeepSpeed's assertion that it equals micro x accumulation x world size holds it to the
config's own values only, and names the values that apply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memprof.dsconfig.reading import Reading
from memprof.dsconfig.schema import AUTO, AutoValue

MICRO_KEY, GAS_KEY, TOTAL_KEY = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"


def read_batch(ds: Mapping[str, Any], reading: Reading, world: int, micro_flag: int | None,
               gas_flag: int | None) -> tuple[int | None, int, int | None]:
    """``(micro-batch or None, accumulation, train batch size or None)`` that apply."""
    micro = _config_value(ds, reading, MICRO_KEY, micro_flag, "--micro-batch")
    gas = _config_value(ds, reading, GAS_KEY, gas_flag, "--gradient-accumulation-steps")
    total_raw = ds.get(TOTAL_KEY)
    stated_total = None if total_raw is None or total_raw == AUTO else reading.whole(total_raw, TOTAL_KEY, positive=True)
    unresolved = any(a.key in (MICRO_KEY, GAS_KEY) and not a.resolved for a in reading.auto)
    if stated_total is not None:
        # _set_batch_related_parameters: derive the one that is missing, unless a flag gives it
        if micro is not None and gas is None and gas_flag is None:
            gas = _derived_gas(stated_total, micro, world, reading, _whose(ds, MICRO_KEY, micro_flag))
        elif micro is None and not unresolved and micro_flag is None:
            micro = _derived_micro(stated_total, gas or 1, world, reading, _whose(ds, GAS_KEY, gas_flag))
    micro = micro_flag if micro_flag is not None else micro
    gas = gas_flag if gas_flag is not None else (gas or 1)
    if stated_total is not None and micro is not None and not unresolved and stated_total != micro * gas * world:
        if micro_flag is None and gas_flag is None:
            raise reading.fail(
                f"train_batch_size {stated_total} != micro-batch {micro} x gradient_accumulation_steps {gas} x world size "
                f"{world} (DeepSpeed asserts it): fix one of them, or drop train_batch_size and DeepSpeed derives it")
        reading.derived.append(f"train_batch_size {stated_total} not used: the flags give micro-batch {micro} x "
                               f"gradient_accumulation_steps {gas} x world size {world} = {micro * gas * world}")
    total = micro * gas * world if micro is not None else stated_total
    if total_raw == AUTO:
        # HF: train_batch_size = world_size x per_device_train_batch_size x gradient_accumulation_steps
        reading.auto.append(AutoValue(TOTAL_KEY, total, f"micro-batch {micro} x accumulation {gas} x world size {world}")
                            if total is not None else
                            AutoValue(TOTAL_KEY, None, "follows the micro-batch", changes_memory=False))
    return micro, gas, total


def _config_value(ds: Mapping[str, Any], reading: Reading, key: str, flag: int | None, flag_name: str) -> int | None:
    """The config's value of ``key``: a whole number, an "auto" filled with the flag (None and
    noted as unresolved without one), or None when absent."""
    value = ds.get(key)
    if value is None:
        return None
    if value == AUTO:
        if flag is not None:
            reading.auto.append(AutoValue(key, flag, f"{flag_name} {flag}"))
            return flag
        reading.auto.append(AutoValue(key, None, f"pass {flag_name}"))
        return None
    return reading.whole(value, key, positive=True)


def _whose(ds: Mapping[str, Any], key: str, flag: int | None) -> str:
    """How a derivation's message names the config value it reads: "the config's " when a flag
    replaces that value in the estimate (the derivation still reads the config's own)."""
    return "the config's " if flag is not None and ds.get(key) != AUTO else ""


def _derived_gas(total: int, micro: int, world: int, reading: Reading, whose: str) -> int:
    if total % (micro * world):
        raise reading.fail(f"train_batch_size {total} is not divisible by {whose}micro-batch {micro} x world size {world}: "
                           "set gradient_accumulation_steps, or drop train_batch_size")
    gas = total // micro // world
    reading.derived.append(f"gradient_accumulation_steps {gas} derived as DeepSpeed does: train_batch_size {total} / "
                           f"{whose}micro-batch {micro} / world size {world}")
    return gas


def _derived_micro(total: int, gas: int, world: int, reading: Reading, whose: str) -> int:
    if total % (gas * world):
        raise reading.fail(f"train_batch_size {total} is not divisible by {whose}gradient_accumulation_steps {gas} "
                           f"x world size {world}: set train_micro_batch_size_per_gpu instead")
    micro = total // world // gas
    reading.derived.append(f"micro-batch {micro} derived as DeepSpeed does: train_batch_size {total} / "
                           f"{whose}gradient_accumulation_steps {gas} / world size {world}")
    return micro
