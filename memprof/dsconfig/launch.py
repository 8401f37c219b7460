"""DeepSpeed's own launch-time refusals: what ``deepspeed.initialize`` would reject in a config
handed to it as is (the launcher's case; the strict mode of :func:`memprof.dsconfig.read_deepspeed_config`).

* an ``"auto"`` anywhere: DeepSpeed drops one inside its sub-configs and fails on a top-level one;
  only HF's Trainer / accelerate fill them (transformers/integrations/deepspeed.py);
* no micro-batch: ``runtime/config.py`` ``_batch_assertion`` needs one of the batch keys;
* no ``optimizer`` block: launch/train.py hands DeepSpeed no optimizer of its own;
* a torch type in the wrong case: ``engine._configure_basic_optimizer`` lower-cases only the
  DEEPSPEED_OPTIMIZERS types and hands the rest to ``getattr(torch.optim, type)``;
* AMSGrad without ``torch_adam``: FusedAdam raises on it;
* an optimizer outside ZERO_SUPPORTED_OPTIMIZERS at ZeRO stage 1-3 without
  ``zero_allow_untested_optimizer`` (``engine._do_optimizer_sanity_check``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memprof.dsconfig.optimizer_block import optimizer_name_from_block
from memprof.dsconfig.schema import AUTO, DeepSpeedSettings
from memprof.errors import MemprofError
from memprof.optimizers import (
    CASE_FREE_DEEPSPEED_TYPES,
    TORCH_DEEPSPEED_TYPES,
    ZERO_TESTED_DEEPSPEED_TYPES,
    ZOO,
    deepspeed_types_text,
)


def refuse_what_deepspeed_refuses_at_launch(settings: DeepSpeedSettings) -> None:
    """MemprofError, one line naming the config and the key, for a config DeepSpeed would refuse."""
    where = settings.source
    autos = find_auto(settings.config)
    if autos:
        raise MemprofError(
            f'{where}: {autos[0]} is "auto": launch/train.py hands the JSON to DeepSpeed as is, and only HF\'s '
            "Trainer or accelerate fill in \"auto\": write a value (memprof estimate shows what HF would choose)"
        )
    if settings.micro_batch is None:
        raise MemprofError(f"{where} sets neither train_micro_batch_size_per_gpu nor train_batch_size: add train_micro_batch_size_per_gpu")
    launchable_optimizer_name(settings.config.get("optimizer"), settings.zero_stage, settings.config, where)


def launchable_optimizer_name(block: Any, stage: int, config: Mapping[str, Any], where: str = "DeepSpeed config") -> str:
    """The zoo name of a DeepSpeed "optimizer" block, checking that DeepSpeed will accept it at this
    ZeRO stage on any accelerator."""
    supported = deepspeed_types_text()
    if block is None:
        raise MemprofError(f'{where} has no "optimizer" block: add one, e.g. {{"type": "AdamW", "params": {{"lr": 1e-4}}}}')
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise MemprofError(f'{where}: "optimizer" must be an object with a string "type" ({supported})')
    opt_type: str = block["type"]
    params = block.get("params", {})
    if not isinstance(params, dict):
        raise MemprofError(f'{where}: optimizer.params must be an object')
    lower = opt_type.lower()
    if lower not in CASE_FREE_DEEPSPEED_TYPES and opt_type not in TORCH_DEEPSPEED_TYPES:
        hint = next((t for t in TORCH_DEEPSPEED_TYPES if t.lower() == lower), None)
        did_you_mean = f" (DeepSpeed passes it to torch.optim, which is case-sensitive: write {hint!r})" if hint else ""
        raise MemprofError(f"{where}: unknown optimizer type {opt_type!r}{did_you_mean}: use one of {supported}")
    if params.get("amsgrad") and not params.get("torch_adam", False) and any(
            o.deepspeed_builds_its_own and o.deepspeed_type.lower() == lower for o in ZOO.values()):
        # DeepSpeed's FusedAdam (used unless torch_adam is set) raises on amsgrad.
        raise MemprofError(f'{where}: amsgrad needs "torch_adam": true in optimizer.params (FusedAdam has no AMSGrad)')
    # the estimator's reader: launcher and estimate name every block the same way
    name = optimizer_name_from_block(block, where)
    if stage > 0 and lower not in ZERO_TESTED_DEEPSPEED_TYPES and not config.get("zero_allow_untested_optimizer", False):
        raise MemprofError(
            f'{where}: DeepSpeed refuses {opt_type} under ZeRO stage {stage} unless the config sets "zero_allow_untested_optimizer": true'
        )
    return name


def find_auto(value: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every ``"auto"`` value anywhere in a config."""
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += find_auto(v, f"{prefix}{k}.")
    elif value == AUTO:
        out.append(prefix.rstrip("."))
    return out
