"""The training precision (``fp16`` / ``bf16`` and the legacy ``bfloat16`` blocks, as
``runtime/precision_config.py`` reads them: ``bfloat16`` only when ``bf16`` is absent or null) and
``data_types.grad_accum_dtype`` (``runtime/config.py`` ``DtypeEnum`` spellings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memprof.dsconfig.reading import Reading
from memprof.dsconfig.schema import AUTO, DTYPE_SPELLINGS, AutoValue
from memprof.errors import MemprofError


def read_precision(ds: Mapping[str, Any], reading: Reading, flag: str | None) -> str | None:
    """``fp32``, ``bf16`` or ``fp16``. ``flag`` (the estimator's ``--precision``) wins over the
    blocks and settles their "auto" switches as HF's Trainer does (``fp16.enabled <- args.fp16``,
    ``bf16.enabled <- args.bf16``); None when an "auto" is left unsettled."""
    bf16_key = "bf16" if ds.get("bf16") is not None else "bfloat16"  # get_bfloat16_config
    fp16, bf16 = _enabled(ds, "fp16", reading), _enabled(ds, bf16_key, reading)
    if fp16 is None or bf16 is None:
        if flag is None:
            for key, value in (("fp16", fp16), (bf16_key, bf16)):
                if value is None:
                    reading.auto.append(AutoValue(f"{key}.enabled", None, "pass --precision fp32, bf16 or fp16"))
            return None
        if fp16 is None:
            fp16 = flag == "fp16"
            reading.auto.append(AutoValue("fp16.enabled", fp16, f"--precision {flag}"))
        if bf16 is None:
            bf16 = flag == "bf16"
            reading.auto.append(AutoValue(f"{bf16_key}.enabled", bf16, f"--precision {flag}"))
    if flag is not None:
        return flag  # the flag replaces the blocks' choice (and whether they agree)
    if fp16 and bf16:
        raise MemprofError(f"{reading.where} enables both bf16 and fp16: DeepSpeed accepts only one, enable one of them")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _enabled(ds: Mapping[str, Any], key: str, reading: Reading) -> bool | None:
    """``<key>.enabled``: a JSON boolean; None for "auto". A missing block or key is off."""
    block = ds.get(key)
    if block is None:
        return False
    if not isinstance(block, dict):
        raise reading.fail(f"{key} must be an object like {{\"enabled\": true}}")
    value = block.get("enabled", False)
    if value == AUTO:
        return None
    if not isinstance(value, bool):
        # DeepSpeed's pydantic would turn the string "false" into off, but memprof would not
        # know which reading the user meant
        raise reading.fail(f"{key}.enabled is {value!r}: use true or false (a JSON boolean, not a string or number)")
    return value


def read_grad_accum_dtype(ds: Mapping[str, Any], reading: Reading) -> str | None:
    types = ds.get("data_types")
    if types is None:
        return None
    if not isinstance(types, dict):
        raise reading.fail("data_types must be an object like {\"grad_accum_dtype\": \"fp32\"}")
    acc = types.get("grad_accum_dtype")
    if acc is None:
        return None
    name = DTYPE_SPELLINGS.get(str(acc).lower())
    if name is None:
        raise reading.fail(f"data_types.grad_accum_dtype {acc!r} is not fp32, bf16 or fp16")
    return name
