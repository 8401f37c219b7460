"""Reading an accelerate config YAML (``accelerate config`` / ``accelerate launch --config_file``)
into what memprof needs: the DeepSpeed config accelerate would hand DeepSpeed, the world size and
the node count.

Two forms, as accelerate 1.x reads them (``accelerate/utils/dataclasses.py`` ``DeepSpeedPlugin``):

* ``deepspeed_config.deepspeed_config_file``: a DeepSpeed JSON, read as is. A relative path is
  taken relative to the YAML's folder (then the current folder).
* inline ``deepspeed_config`` keys (``zero_stage``, ``offload_optimizer_device``,
  ``offload_param_device``, ``gradient_accumulation_steps``, ``gradient_clipping``,
  ``zero3_init_flag``, ``zero3_save_16bit_model``): the DeepSpeed config is built as
  ``DeepSpeedPlugin.__post_init__`` builds it, micro-batch and train batch "auto" (the script's
  data loader sets them), ZeRO stage 2 when unstated.

``mixed_precision`` then goes in as ``DeepSpeedPlugin.set_mixed_precision`` puts it: an ``fp16`` or
``bf16`` block enabled when the config has none, ``"auto"`` ``enabled`` values filled, both off for
``no``. ``num_processes`` is the world size (all machines), ``num_machines`` the node count.

``distributed_type: FSDP`` with ``fsdp_config.fsdp_version: 2`` is torch FSDP2 (accelerate's
``FullyShardedDataParallelPlugin``): ``fsdp_reshard_after_forward`` (default true),
``fsdp_offload_params`` (``CPUOffloadPolicy``) and ``mixed_precision``, which accelerate turns into
``MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)`` (``set_mixed_precision``), land in
``AccelerateSettings.fsdp2``; FSDP version 1 is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memprof.dsconfig import AUTO, load_config_file
from memprof.errors import MemprofError
from memprof.jsonfile import read_user_text
from memprof.units import is_positive_int

MIXED_PRECISIONS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class AccelerateSettings:
    path: Path
    deepspeed_config: dict[str, Any]
    """The DeepSpeed config accelerate would use (file contents, or built from the inline keys),
    with mixed_precision applied."""
    deepspeed_source: str
    """How messages name that DeepSpeed config."""
    num_processes: int | None = None
    num_machines: int | None = None
    mixed_precision: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    fsdp2: dict[str, Any] | None = None
    """FSDP2's settings (``distributed_type: FSDP``, ``fsdp_version: 2``): reshard_after_forward,
    param_dtype, reduce_dtype (memprof precision names or None), offload_params; None otherwise."""


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML ships with accelerate and transformers
        raise MemprofError("reading an accelerate config needs PyYAML: pip install pyyaml") from None
    text = read_user_text(path, "accelerate config", "check the path")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise MemprofError(f"accelerate config {path} is not valid YAML{at}: fix the file") from None
    if not isinstance(data, dict):
        raise MemprofError(f"accelerate config {path} must be a YAML mapping (key: value lines)")
    return data


def _count(data: dict[str, Any], key: str, path: Path) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not is_positive_int(value):
        raise MemprofError(f"accelerate config {path}: {key} is {value!r}: it must be a whole number of at least 1")
    return value


def read_accelerate_config(path: str | os.PathLike) -> AccelerateSettings:
    """Read an accelerate YAML; MemprofError (one line naming the key) on anything unusable."""
    path = Path(path)
    data = _load_yaml(path)
    where = f"accelerate config {path}"
    kind = data.get("distributed_type")
    if kind is not None and str(kind).upper() == "FSDP":
        return _read_fsdp2(data, path, where)
    if kind is not None and str(kind).upper() != "DEEPSPEED":
        raise MemprofError(f"{where}: distributed_type is {kind!r}: memprof models DeepSpeed (distributed_type: "
                           "DEEPSPEED) and FSDP2 (FSDP with fsdp_version: 2) only")
    block = data.get("deepspeed_config")
    if block is None:
        raise MemprofError(f"{where} has no deepspeed_config section: run `accelerate config` with DeepSpeed, "
                           "or pass the DeepSpeed JSON with --deepspeed-config")
    if not isinstance(block, dict):
        raise MemprofError(f"{where}: deepspeed_config must be a mapping")
    mixed = data.get("mixed_precision")
    if mixed is not None:
        mixed = str(mixed).lower()
        if mixed == "fp8":
            raise MemprofError(f"{where}: mixed_precision fp8 is not modelled by memprof: use bf16, fp16 or no")
        if mixed not in MIXED_PRECISIONS:
            raise MemprofError(f"{where}: mixed_precision {mixed!r} is not one of no, fp16, bf16")
    notes: list[str] = []
    file_key = block.get("deepspeed_config_file")
    if file_key not in (None, "none", ""):
        inline = [k for k in ("zero_stage", "offload_optimizer_device", "offload_param_device", "gradient_accumulation_steps",
                              "gradient_clipping", "zero3_save_16bit_model") if k in block]
        if inline:
            # DeepSpeedPlugin._deepspeed_config_checks refuses the same mix
            raise MemprofError(f"{where}: deepspeed_config sets both deepspeed_config_file and {inline[0]}: "
                               "accelerate refuses that; set it in the JSON file")
        json_path = Path(str(file_key))
        if not json_path.is_absolute():
            beside = path.parent / json_path
            json_path = beside if beside.exists() or not json_path.exists() else json_path
        ds = load_config_file(json_path, f"fix deepspeed_config_file in {path} (a relative path is taken relative to the YAML)")
        source = f"DeepSpeed config {json_path} (from {path})"
        notes.append(f"DeepSpeed config from {path}: deepspeed_config_file {json_path}")
    else:
        ds, built = _inline_deepspeed_config(block, where)
        source = f"{where} (inline deepspeed_config)"
        notes.append(f"DeepSpeed config built from {path}'s inline deepspeed_config as accelerate's DeepSpeedPlugin builds it: "
                     f"{built}")
    init = block.get("zero3_init_flag")
    if init is not None:
        notes.append(f"zero3_init_flag {init}: changes only how the model is built (partitioned at construction), "
                     "not the training memory estimated here")
    if mixed is not None:
        ds = _with_mixed_precision(ds, mixed, where)
        notes.append(f"mixed_precision {mixed} from {path} (applied as accelerate's DeepSpeedPlugin.set_mixed_precision)")
    return AccelerateSettings(path=path, deepspeed_config=ds, deepspeed_source=source,
                              num_processes=_count(data, "num_processes", path), num_machines=_count(data, "num_machines", path),
                              mixed_precision=mixed, notes=tuple(notes))


def _flag(block: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = block.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise MemprofError(f"{where}: fsdp_config.{key} is {value!r}: use true or false")
    return value


def _read_fsdp2(data: dict[str, Any], path: Path, where: str) -> AccelerateSettings:
    """accelerate's FSDP plugin at ``fsdp_version: 2`` (FullyShardedDataParallelPlugin): its
    reshard/offload keys and the MixedPrecisionPolicy ``set_mixed_precision`` builds."""
    block = data.get("fsdp_config") or {}
    if not isinstance(block, dict):
        raise MemprofError(f"{where}: fsdp_config must be a mapping")
    version = block.get("fsdp_version", 1)
    if str(version) != "2":
        raise MemprofError(f"{where}: fsdp_version {version!r} (FSDP1) is not modelled by memprof: use fsdp_version: 2 "
                           "(FSDP2, fully_shard) or DeepSpeed")
    mixed = str(data.get("mixed_precision") or "no").lower()
    if mixed not in MIXED_PRECISIONS:
        raise MemprofError(f"{where}: mixed_precision {mixed!r} is not one of no, fp16, bf16")
    dtype = None if mixed == "no" else MIXED_PRECISIONS[mixed]
    fsdp2 = {"reshard_after_forward": _flag(block, "fsdp_reshard_after_forward", True, where),
             "param_dtype": dtype, "reduce_dtype": dtype,
             "offload_params": _flag(block, "fsdp_offload_params", False, where)}
    note = (f"FSDP2 from {path} (accelerate's FullyShardedDataParallelPlugin, fsdp_version 2): reshard_after_forward "
            f"{fsdp2['reshard_after_forward']}, offload_params {fsdp2['offload_params']}, mixed_precision {mixed}"
            + (f" (MixedPrecisionPolicy param_dtype and reduce_dtype {dtype})" if dtype else ""))
    return AccelerateSettings(path=path, deepspeed_config={}, deepspeed_source=where,
                              num_processes=_count(data, "num_processes", path), num_machines=_count(data, "num_machines", path),
                              mixed_precision=mixed, notes=(note,), fsdp2=fsdp2)


def _inline_deepspeed_config(block: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    """DeepSpeedPlugin.__post_init__'s config for the inline keys (zero_stage default 2, as
    ACCELERATE_DEEPSPEED_ZERO_STAGE's default; gradient_accumulation_steps "auto" when unstated),
    and what it sets, for the notes (memprof.dsconfig reads the config itself)."""
    def device(key: str) -> str:
        value = str(block.get(key, "none")).lower()
        if value not in ("none", "cpu", "nvme"):
            raise MemprofError(f"{where}: deepspeed_config.{key} is {value!r}: use none or cpu")
        return value

    stage = block.get("zero_stage", 2)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise MemprofError(f"{where}: deepspeed_config.zero_stage is {stage!r}: ZeRO stages are 0, 1, 2 or 3")
    gas = block.get("gradient_accumulation_steps", AUTO)
    if gas != AUTO and not is_positive_int(gas):
        raise MemprofError(f"{where}: deepspeed_config.gradient_accumulation_steps is {gas!r}: it must be a whole number of at least 1")
    offload_optimizer, offload_param = device("offload_optimizer_device"), device("offload_param_device")
    config: dict[str, Any] = {
        "train_batch_size": AUTO,
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {
            "stage": stage,
            "offload_optimizer": {"device": offload_optimizer},
            "offload_param": {"device": offload_param},
            "stage3_gather_16bit_weights_on_model_save": bool(block.get("zero3_save_16bit_model", False)),
        },
    }
    clipping = block.get("gradient_clipping")
    if clipping:
        config["gradient_clipping"] = clipping
    return config, f"ZeRO stage {stage}, offload_optimizer {offload_optimizer}, offload_param {offload_param}"


def _with_mixed_precision(ds: dict[str, Any], mixed: str, where: str) -> dict[str, Any]:
    """DeepSpeedPlugin.set_mixed_precision: add the enabled block when absent, fill "auto"s."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ds.items()}
    if mixed == "fp16" and "fp16" not in out:
        out["fp16"] = {"enabled": True, "auto_cast": True}
    elif mixed == "bf16" and "bf16" not in out:
        out["bf16"] = {"enabled": True}
    if mixed != "no":
        other = "bf16" if mixed == "fp16" else "fp16"
        if str((out.get(other) or {}).get("enabled", "False")).lower() == "true":
            raise MemprofError(f"{where}: mixed_precision {mixed} while the DeepSpeed config enables {other}: "
                               "accelerate refuses that; make them agree")
    for key in ("fp16", "bf16"):
        if key not in out:
            out[key] = {"enabled": False}
        elif isinstance(out[key], dict) and out[key].get("enabled") == AUTO:
            out[key]["enabled"] = (mixed == key)
    return out
