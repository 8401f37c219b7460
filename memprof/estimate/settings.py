"""The settings an estimate takes from the user's setup: command-line flags over the DeepSpeed config
over DeepSpeed's defaults, applied here, once.

:func:`settings_from_setup` is that one place. The DeepSpeed config (a file, or the one an
accelerate YAML names or builds) is read by :func:`memprof.dsconfig.read_deepspeed_config`, which
takes the flags that meet the config's own arithmetic (micro-batch, accumulation, precision: they
fill its "auto" values and replace its stated ones there); the flags that only replace a value
(world size, nodes, ZeRO stage, optimizer, torch Adam, checkpointing, offload) are laid over the
result here. Without a config the reader reads an empty one: DeepSpeed 0.19.8's own defaults
(``runtime/zero/config.py`` ``DeepSpeedZeroConfig``), so an estimate without a config describes
what DeepSpeed would do with an empty ``zero_optimization`` block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from memprof.dsconfig import DeepSpeedSettings, ZeroKnobs, read_deepspeed_config
from memprof.errors import MemprofError
from memprof.peft_config import lora_setup_from_flags, read_peft_config
from memprof.quant_config import quantization_config_from_flags
from memprof.units import is_positive_int


@dataclass(frozen=True)
class SetupFlags:
    """What the user stated on the command line about the training setup; None (or False) where
    they stated nothing, so the config or the default applies."""

    world_size: int | None = None
    nodes: int | None = None
    zero_stage: int | None = None
    optimizer: str | None = None
    torch_adam: bool = False
    precision: str | None = None
    micro_batch: int | None = None
    gradient_accumulation_steps: int | None = None
    activation_checkpointing: bool = False
    offload_optimizer: str | None = None
    offload_param: str | None = None
    peft_config: str | os.PathLike | None = None  # PEFT adapter_config.json
    lora_r: int | None = None  # --lora-r, over the file's r
    lora_target_modules: str | None = None  # --lora-target-modules a,b, over the file's
    loss_implementation: str = "hf"  # --loss / --trl: EstimateInputs.loss_implementation
    # --engine and FSDP2's knobs (memprof.engines.Fsdp2Settings); None where not stated
    engine: str | None = None
    reshard_after_forward: bool | None = None
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    # --load-in-4bit and its --bnb-4bit-* flags: a quantization_config laid over the model config's
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str | None = None
    bnb_4bit_double_quant: bool = False
    bnb_4bit_quant_storage: str | None = None
    bnb_4bit_compute_dtype: str | None = None


def settings_from_setup(
    flags: SetupFlags,
    *,
    deepspeed_config: str | os.PathLike | None = None,
    accelerate_config: str | os.PathLike | None = None,
    model_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``EstimateInputs`` fields for ``memprof estimate`` / ``plan``: ``flags`` over the setup files
    over DeepSpeed's defaults.

    The accelerate YAML gives the world size, the nodes and (unless ``deepspeed_config`` is also
    given, which wins) the DeepSpeed config; the model's hidden size settles the bucket-size "auto"
    values as HF's Trainer would."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    config: str | os.PathLike | dict[str, Any] | None = None
    source = "DeepSpeed config"
    fsdp2_from_yaml: dict[str, Any] | None = None
    if accelerate_config is not None:
        from memprof.accelerate_config import read_accelerate_config

        acc = read_accelerate_config(accelerate_config)
        fsdp2_from_yaml = acc.fsdp2
        if acc.num_processes is not None:
            out["world_size"] = acc.num_processes
        if acc.num_machines is not None:
            out["nodes"] = acc.num_machines
        if deepspeed_config is None:
            config, source = acc.deepspeed_config, acc.deepspeed_source
            notes += acc.notes
        else:
            notes.append(f"--deepspeed-config {deepspeed_config} used instead of {accelerate_config}'s deepspeed_config")
    if deepspeed_config is not None:
        config, source = deepspeed_config, f"DeepSpeed config {deepspeed_config}"
    settings = read_deepspeed_config(
        {} if config is None else config, source=source, world_size=flags.world_size or out.get("world_size") or 1,
        hidden_size=hidden_size_of(model_config), micro_batch=flags.micro_batch,
        gradient_accumulation_steps=flags.gradient_accumulation_steps, precision=flags.precision)
    out.update(settings_from_ds(settings))
    if config is not None and settings.optimizer is None:
        notes.append("the DeepSpeed config has no optimizer block (the training script brings its own, e.g. HF "
                     "Trainer's torch.optim.AdamW): estimated with --optimizer's choice, default adamw (add "
                     "--torch-adam for torch's AdamW)")
    out["config_notes"] = tuple(notes) + out["config_notes"]
    _with_quantization(out, flags, model_config)
    return _with_fsdp2(_with_flags(out, flags), flags, fsdp2_from_yaml, deepspeed_config)


def _with_quantization(fields: dict[str, Any], flags: SetupFlags, model_config: dict[str, Any] | None) -> None:
    """``--load-in-4bit`` (and ``--bnb-4bit-*``): the ``quantization_config`` BitsAndBytesConfig
    would write, laid into the model config (over one the config.json carries), so the model's
    shape reads it where it reads a config file's (memprof.estimate.model_shapes)."""
    qc = quantization_config_from_flags(flags.load_in_4bit, flags.bnb_4bit_quant_type, flags.bnb_4bit_double_quant,
                                        flags.bnb_4bit_quant_storage, flags.bnb_4bit_compute_dtype)
    if qc is None:
        return
    if not isinstance(model_config, dict):
        raise MemprofError("--load-in-4bit needs the model's shape: pass --model PRESET or --model-config PATH, not --params")
    fields["model_config"] = {**model_config, "quantization_config": qc}


_FSDP2_FLAGS = (("reshard_after_forward", "--reshard-after-forward"), ("param_dtype", "--param-dtype"),
                ("reduce_dtype", "--reduce-dtype"))


def _with_fsdp2(fields: dict[str, Any], flags: SetupFlags, from_yaml: dict[str, Any] | None,
                deepspeed_config: str | os.PathLike | None) -> dict[str, Any]:
    """``--engine fsdp2`` (or an accelerate YAML with ``fsdp_version: 2``): the engine, its knobs
    (flags over the YAML over fully_shard's defaults), the script's own torch optimizer (a step
    tensor per parameter), no ZeRO stage; the compute precision is ``param_dtype`` when given."""
    from memprof.engines import Engine, Fsdp2Settings

    engine = flags.engine or ("fsdp2" if from_yaml is not None else "deepspeed")
    stated = [flag for attr, flag in _FSDP2_FLAGS if getattr(flags, attr) is not None]
    if engine != "fsdp2":
        if stated:
            raise MemprofError(f"{stated[0]} applies to --engine fsdp2 only: add --engine fsdp2 or drop it")
        return fields
    if deepspeed_config is not None or fields["zero_stage"] != 0:
        raise MemprofError("--engine fsdp2 takes no DeepSpeed config or ZeRO stage (FSDP2 shards every state itself): "
                           "drop --deepspeed-config / --zero-stage")
    if flags.offload_optimizer not in (None, "none"):
        raise MemprofError("FSDP2 offloads the optimizer step with its parameters (CPUOffloadPolicy): use --offload-params "
                           "cpu instead of --offload-optimizer")
    base = from_yaml or {}
    param_dtype = flags.param_dtype or base.get("param_dtype")
    settings = Fsdp2Settings(
        reshard_after_forward=(flags.reshard_after_forward if flags.reshard_after_forward is not None
                               else bool(base.get("reshard_after_forward", True))),
        # fp32 is no cast from an fp32 model (FSDPParam.init_dtype_attrs clamps it to None)
        param_dtype=None if param_dtype == "fp32" else param_dtype,
        reduce_dtype=flags.reduce_dtype or base.get("reduce_dtype"),
        offload_params=(flags.offload_param == "cpu") if flags.offload_param is not None
        else bool(base.get("offload_params", False)))
    fields.update(engine=Engine.FSDP2, fsdp2=settings, torch_adam=True,
                  zero=replace(fields["zero"], offload_param="none", offload_optimizer="none"))
    if settings.param_dtype:
        fields["precision"] = settings.param_dtype
    return fields


def _with_flags(fields: dict[str, Any], flags: SetupFlags) -> dict[str, Any]:
    """The flags the reader does not take, laid over what the setup files gave."""
    for key in ("world_size", "nodes", "zero_stage", "optimizer"):
        value = getattr(flags, key)
        if value is not None:
            fields[key] = value
    if flags.torch_adam:
        fields["torch_adam"] = True
    if flags.activation_checkpointing:
        fields["activation_checkpointing"] = True
    zero: ZeroKnobs = fields["zero"]
    if flags.offload_optimizer is not None:
        zero = replace(zero, offload_optimizer=flags.offload_optimizer)
    if flags.offload_param is not None:
        zero = replace(zero, offload_param=flags.offload_param)
    fields["zero"] = zero
    lora = lora_setup_from_flags(flags.lora_r, flags.lora_target_modules,
                                 read_peft_config(flags.peft_config) if flags.peft_config is not None else None)
    if lora is not None:
        fields["peft"] = lora
    if flags.loss_implementation != "hf":
        fields["loss_implementation"] = flags.loss_implementation
    return fields


def settings_from_setup_files(
    *,
    deepspeed_config: str | os.PathLike | None = None,
    accelerate_config: str | os.PathLike | None = None,
    model_config: dict[str, Any] | None = None,
    world_size: int | None = None,
    micro_batch: int | None = None,
    gradient_accumulation_steps: int | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """:func:`settings_from_setup` with its flags as keywords (the older spelling)."""
    flags = SetupFlags(world_size=world_size, micro_batch=micro_batch,
                       gradient_accumulation_steps=gradient_accumulation_steps, precision=precision)
    return settings_from_setup(flags, deepspeed_config=deepspeed_config, accelerate_config=accelerate_config,
                               model_config=model_config)


def settings_from_ds(settings: DeepSpeedSettings) -> dict[str, Any]:
    """The ``EstimateInputs`` fields a read DeepSpeed config fixes.

    An "auto" that changes memory and that nothing settled is a MemprofError naming the flag."""
    missing = settings.unresolved()
    if missing:
        by_fix: dict[str, list[str]] = {}
        for a in missing:
            by_fix.setdefault(a.how, []).append(a.key)
        what = "; ".join(f"{' and '.join(keys)}: {fix}" for fix, keys in by_fix.items())
        raise MemprofError(f'{settings.source} leaves "auto" values that change memory and that nothing settles: {what}')
    out: dict[str, Any] = {"zero_stage": settings.zero_stage, "zero": settings.zero,
                           "gradient_accumulation_steps": settings.gradient_accumulation_steps,
                           "config_notes": tuple(settings.notes()), "auto_values": settings.auto_values()}
    if settings.precision is not None:
        out["precision"] = settings.precision
    if settings.optimizer is not None:
        out["optimizer"] = settings.optimizer
        # engine.get_optimizer_configuration: torch.optim Adam/AdamW only with "torch_adam": true
        if settings.torch_adam:
            out["torch_adam"] = True
    if settings.micro_batch is not None:
        out["micro_batch"] = settings.micro_batch
    if settings.grad_accum_dtype is not None:
        out["grad_accum_dtype"] = settings.grad_accum_dtype
    if settings.activation_checkpointing:
        out["activation_checkpointing"] = True
    return out


def settings_from_deepspeed_config(ds: dict[str, Any], source: str = "DeepSpeed config", **resolve: Any) -> dict[str, Any]:
    """The estimate settings a DeepSpeed config dict fixes, as ``EstimateInputs`` field names.

    ``resolve`` (world_size, hidden_size, micro_batch, gradient_accumulation_steps, precision) goes
    to :func:`memprof.dsconfig.read_deepspeed_config`. Bad values raise MemprofError naming the key.
    """
    if not isinstance(ds, dict):
        raise MemprofError(f"{source} must be a JSON object")
    return settings_from_ds(read_deepspeed_config(ds, source=source, **resolve))


def hidden_size_of(model_config: dict[str, Any] | None) -> int | None:
    """The hidden size HF's Trainer reads (``model.config.hidden_size``; GPT-2's maps to ``n_embd``)."""
    if not isinstance(model_config, dict):
        return None
    for key in ("hidden_size", "n_embd", "d_model"):
        value = model_config.get(key)
        if is_positive_int(value):
            return value
    return None
