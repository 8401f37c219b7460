"""The one reader of DeepSpeed configs: a JSON file or dict in, one typed, frozen
:class:`DeepSpeedSettings` out, with the caller's values laid over the config once.

What each block means is read where the block is named: ``zero_block`` (``zero_optimization``),
``precision`` (``fp16`` / ``bf16`` / ``bfloat16``, ``data_types``), ``batch`` (the three batch
keys), ``optimizer_block`` (``optimizer``), ``unmodelled`` (what memprof refuses), ``launch``
(what DeepSpeed itself refuses at launch: ``strict=True``). Here: the order they are read in,
``activation_checkpointing`` (memprof's rule, docs/launcher.md: the block's presence means one
checkpoint per transformer block, for the launcher and the estimator alike) and the "auto" values
that change nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memprof.dsconfig.batch import read_batch
from memprof.dsconfig.files import load_config_file
from memprof.dsconfig.launch import refuse_what_deepspeed_refuses_at_launch
from memprof.dsconfig.optimizer_block import read_optimizer_block
from memprof.dsconfig.precision import read_grad_accum_dtype, read_precision
from memprof.dsconfig.reading import Reading
from memprof.dsconfig.schema import AUTO, AutoValue, DeepSpeedSettings
from memprof.dsconfig.unmodelled import refuse_unmodelled
from memprof.dsconfig.zero_block import read_zero_block


def read_deepspeed_config(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    source: str | None = None,
    world_size: int = 1,
    hidden_size: int | None = None,
    micro_batch: int | None = None,
    gradient_accumulation_steps: int | None = None,
    precision: str | None = None,
    fix_missing: str = "check the path",
    strict: bool = False,
) -> DeepSpeedSettings:
    """Read a DeepSpeed config (a path or a dict) into :class:`DeepSpeedSettings`.

    ``world_size`` is the data-parallel size DeepSpeed will see (for ``train_batch_size``);
    ``hidden_size`` the model's, which HF's Trainer fills the bucket-size "auto" values from.
    ``micro_batch``, ``gradient_accumulation_steps`` and ``precision`` are the caller's own values
    (the estimator's flags, standing in for HF's ``TrainingArguments``): each is the value that
    applies, fills the config's "auto" for it, and sets aside the config's consistency checks over
    the value it replaces (see :mod:`memprof.dsconfig.batch`). ``strict`` adds what DeepSpeed itself
    refuses when handed the config as is (:mod:`memprof.dsconfig.launch`): the launcher's mode.
    MemprofError, one line naming the key and the fix, for anything DeepSpeed would refuse or
    memprof does not model.
    """
    path: Path | None = None
    if isinstance(config, Mapping):
        ds = dict(config)
        where = source or "DeepSpeed config"
    else:
        path = Path(config)
        ds = load_config_file(path, fix_missing)
        where = source or str(path)
    reading = Reading(where)
    refuse_unmodelled(ds, reading)
    stage, zero = read_zero_block(ds, reading, hidden_size)
    applied_precision = read_precision(ds, reading, precision)
    name, opt_type, opt_params, torch_adam = read_optimizer_block(ds, reading)
    micro, gas, total = read_batch(ds, reading, world_size, micro_batch, gradient_accumulation_steps)
    checkpointing = _activation_checkpointing(ds, reading)
    _inert_autos(ds, reading)
    settings = DeepSpeedSettings(
        source=where, config=ds, zero_stage=stage, zero=zero, precision=applied_precision,
        optimizer=name, optimizer_type=opt_type, optimizer_params=opt_params, torch_adam=torch_adam,
        zero_allow_untested_optimizer=ds.get("zero_allow_untested_optimizer", False) is True,
        micro_batch=micro, gradient_accumulation_steps=gas, train_batch_size=total,
        activation_checkpointing=checkpointing, grad_accum_dtype=read_grad_accum_dtype(ds, reading),
        auto=tuple(reading.auto), ignored=tuple(reading.ignored), derived=tuple(reading.derived), path=path,
    )
    if strict:
        refuse_what_deepspeed_refuses_at_launch(settings)
    return settings


def _activation_checkpointing(ds: Mapping[str, Any], reading: Reading) -> bool:
    if "activation_checkpointing" not in ds:
        return False
    block = ds["activation_checkpointing"]
    if block is None:
        return False
    if not isinstance(block, dict):
        raise reading.fail("activation_checkpointing must be an object")
    # transformers' models checkpoint through torch.utils.checkpoint (PreTrainedModel
    # ._set_gradient_checkpointing); only Megatron-style code calling deepspeed.checkpointing
    # (runtime/activation_checkpointing/checkpointing.py: configure / checkpoint) reads these keys,
    # so for an HF model (the launcher's, the Trainer's) they change nothing: named, not refused
    inert = [k for k, v in block.items() if v not in (None, False, 0) and k != "number_checkpoints"]
    if inert:
        reading.ignored.append(f"activation_checkpointing.{', .'.join(inert)}: inert for HF models (transformers "
                               "checkpoints with torch.utils.checkpoint and never reads them; only code calling "
                               "deepspeed.checkpointing does)")
    return True


def _inert_autos(ds: Mapping[str, Any], reading: Reading) -> None:
    """The "auto" values HF fills that change no memory memprof models: noted, left as they are."""
    if ds.get("gradient_clipping") == AUTO:
        reading.auto.append(AutoValue("gradient_clipping", None, "HF fills it from TrainingArguments.max_grad_norm; "
                                      "clipping's temporaries are not modelled", changes_memory=False))
    sched = ds.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("params"), dict):
        for key, value in sched["params"].items():
            if value == AUTO:
                reading.auto.append(AutoValue(f"scheduler.params.{key}", None, "HF fills it from TrainingArguments; "
                                              "no effect on memory", changes_memory=False))
