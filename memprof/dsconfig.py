"""The one reader of DeepSpeed configs: a JSON file or dict in, one typed, frozen
:class:`DeepSpeedSettings` out.

Both users read configs through :func:`read_deepspeed_config`: the launcher (``memprof.train.config``,
which adds only what DeepSpeed needs to *run*: an optimizer block, a known batch size, torch's
case-sensitive type names, ZeRO's tested optimizers) and the estimator (``memprof.estimate.inputs``,
which layers the command-line flags over the result). Plain Python: no torch, no deepspeed import.

What is read, and the DeepSpeed 0.19.8 code that reads it the same way:

* ``zero_optimization`` -- ``runtime/zero/config.py`` ``DeepSpeedZeroConfig``: its defaults, its
  ``stage3_*`` aliases, the deprecated ``cpu_offload`` / ``cpu_offload_param`` booleans, the
  deprecated ``"zero_optimization": true`` (``read_zero_config_deprecated``: stage 1), and float
  sizes such as ``5e8`` (pydantic turns a whole float into an int). Knobs that the given stage never
  reads (stage-3 knobs at stage 0-2, every knob at stage 0) are accepted and listed in
  :attr:`DeepSpeedSettings.ignored`.
* ``fp16`` / ``bf16`` and the legacy ``bfloat16`` block -- ``runtime/precision_config.py``
  (``get_bfloat16_config`` reads ``bfloat16`` only when ``bf16`` is absent or null).
* ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` / ``gradient_accumulation_steps`` --
  ``runtime/config.py`` ``_set_batch_related_parameters`` and ``_batch_assertion``.
* ``optimizer`` -- ``runtime/engine.py`` ``_configure_basic_optimizer`` (DeepSpeed's "Adam" is
  AdamW unless ``adam_w_mode`` is false; other types go to ``torch.optim``).
* ``data_types.grad_accum_dtype`` -- ``runtime/config.py`` ``DtypeEnum`` spellings.
* ``activation_checkpointing`` -- memprof's rule (docs/launcher.md): the block's presence means
  one checkpoint per transformer block (HF gradient checkpointing), for the launcher and the
  estimator alike.

HF-style ``"auto"`` values are resolved as ``transformers/integrations/deepspeed.py``
``HfTrainerDeepSpeedConfig`` does (``trainer_config_process`` / ``trainer_config_finalize``):
micro-batch, gradient accumulation and fp16/bf16 from the caller's values (the estimator's flags,
standing in for ``TrainingArguments``), ``train_batch_size`` = micro x accumulation x world size,
``reduce_bucket_size`` = hidden², and at ZeRO-3 ``stage3_prefetch_bucket_size`` = int(0.9 x
hidden²) and ``stage3_param_persistence_threshold`` = 10 x hidden. An "auto" the caller cannot
settle stays unresolved (:meth:`DeepSpeedSettings.unresolved`), with the flag that would settle it.

What memprof does not model (ZeRO++, MiCS, NVMe offload, partial offload, pipeline/tensor/sequence
parallelism, optimizers outside :data:`OPTIMIZERS`) is refused with one line naming the feature.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memprof.errors import MemprofError
from memprof.jsonfile import read_user_text

# ---- vocabularies and element sizes: defined here only -----------------------------------------

OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam", "adamw", "amsgrad")
"""The optimizer "zoo" memprof models (memprof.estimate.optimizers); run metadata uses these names."""
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
OFFLOAD_DEVICES: tuple[str, ...] = ("none", "cpu")
ELEMENT_SIZE: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of each precision's tensors."""

# runtime/config.py DtypeEnum: every spelling DeepSpeed accepts for a data type
DTYPE_SPELLINGS: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
}

AUTO = "auto"


@dataclass(frozen=True)
class ZeroKnobs:
    """The DeepSpeed ``zero_optimization`` knobs that change memory, with DeepSpeed's defaults."""

    reduce_bucket_size: int = 500_000_000  # elements, DeepSpeedZeroConfig.reduce_bucket_size
    allgather_bucket_size: int = 500_000_000  # elements
    overlap_comm: bool | None = None  # None: DeepSpeed's dynamic default, True only at stage 3
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000  # stage3_prefetch_bucket_size, elements
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters, elements
    # stage3_max_reuse_distance, elements: a gathered parameter whose next use comes within this
    # many traversed elements is not released (partitioned_param_coordinator.py __params_to_release)
    max_reuse_distance: int = 1_000_000_000
    param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold, elements
    model_persistence_threshold: int = 2**63 - 1  # stage3_model_persistence_threshold (sys.maxsize)
    sub_group_size: int = 1_000_000_000  # elements per stage-3 optimizer sub-group
    offload_optimizer: str = "none"
    offload_param: str = "none"
    # offload_optimizer.pin_memory / offload_param.pin_memory (offload_config.py: default true):
    # DeepSpeed page-locks its host buffers (zero_layout._host_bytes)
    offload_optimizer_pin_memory: bool = True
    offload_param_pin_memory: bool = True

    def overlap_comm_for(self, stage: int) -> bool:
        # DeepSpeedZeroConfig.overlap_comm_valid: None becomes (stage == 3)
        return (stage == 3) if self.overlap_comm is None else bool(self.overlap_comm)


@dataclass(frozen=True)
class AutoValue:
    """One ``"auto"`` in the config and what it became."""

    key: str
    """Dotted key, e.g. ``zero_optimization.reduce_bucket_size``."""
    value: Any
    """What it resolved to; None while unresolved."""
    how: str
    """Where the value came from, or (unresolved) the flag that settles it."""
    changes_memory: bool = True

    @property
    def resolved(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class DeepSpeedSettings:
    """A DeepSpeed config, read once: what DeepSpeed 0.19.8 will do with it, in memprof's terms."""

    source: str
    """How messages name the config: its path, or a label such as "the run's deepspeed_config"."""
    config: dict[str, Any]
    """The object exactly as loaded (the launcher hands it unchanged to ``deepspeed.initialize``)."""
    zero_stage: int
    zero: ZeroKnobs
    precision: str | None
    """``fp32``, ``bf16`` or ``fp16``; None only while an ``"auto"`` precision is unresolved."""
    optimizer: str | None
    """Zoo name (:data:`OPTIMIZERS`) of the "optimizer" block; None when there is no block."""
    optimizer_type: str | None = None
    """The block's "type" exactly as written (DeepSpeed matches some case-sensitively)."""
    optimizer_params: dict[str, Any] = field(default_factory=dict)
    torch_adam: bool = False
    """``optimizer.params.torch_adam``: torch.optim Adam/AdamW instead of FusedAdam/CPUAdam."""
    zero_allow_untested_optimizer: bool = False
    micro_batch: int | None = None
    """Samples per rank per micro-step; None when the config neither states nor implies it."""
    gradient_accumulation_steps: int = 1
    train_batch_size: int | None = None
    """micro-batch x accumulation x world size, as DeepSpeed derives it (None without a micro-batch)."""
    activation_checkpointing: bool = False
    """True when the config has an ``activation_checkpointing`` block: one checkpoint per transformer
    block, as the launcher trains it (docs/launcher.md)."""
    grad_accum_dtype: str | None = None
    """``data_types.grad_accum_dtype`` (None: the model dtype)."""
    auto: tuple[AutoValue, ...] = ()
    """Every ``"auto"`` value found, with what it became."""
    ignored: tuple[str, ...] = ()
    """Keys present in the config that DeepSpeed does not read at this stage, as notes."""
    derived: tuple[str, ...] = ()
    """Values DeepSpeed derives or renames (batch sizes from train_batch_size, deprecated aliases), as notes."""
    path: Path | None = None

    @property
    def offload_optimizer(self) -> str:
        return self.zero.offload_optimizer

    @property
    def offload_params(self) -> str:
        return self.zero.offload_param

    def unresolved(self) -> list[AutoValue]:
        """The memory-changing ``"auto"`` values nothing settled (each names its flag)."""
        return [a for a in self.auto if not a.resolved and a.changes_memory]

    def notes(self) -> list[str]:
        """One line per resolved "auto", ignored key and the checkpointing rule, for an estimate's assumptions."""
        out = [f'{a.key} "auto" -> {a.value!r} ({a.how})' for a in self.auto if a.resolved]
        inert: dict[str, list[str]] = {}
        for a in self.auto:
            if not a.resolved and not a.changes_memory:
                inert.setdefault(a.how, []).append(a.key)
        out += [f'"auto" left as is ({how}): {", ".join(keys)}' for how, keys in inert.items()]
        out += list(self.derived) + list(self.ignored)
        if self.activation_checkpointing:
            out.append("activation checkpointing on: the DeepSpeed config has an activation_checkpointing block, "
                       "which memprof reads as one checkpoint per transformer block (HF gradient checkpointing, "
                       "as launch/train.py trains it)")
        return out

    def auto_values(self) -> dict[str, Any]:
        """``{dotted key: value}`` for every resolved "auto" (for ``--json`` inputs)."""
        return {a.key: a.value for a in self.auto if a.resolved}


# ---- reading -----------------------------------------------------------------------------------


def load_config_file(path: str | os.PathLike, fix: str = "check the path") -> dict[str, Any]:
    """A DeepSpeed config file as a dict. JSON, or the Hjson DeepSpeed itself also reads
    (``DeepSpeedConfig.__init__``: ``hjson.load``; comments, trailing commas). A YAML file or a
    template with placeholders is one MemprofError line."""
    path = Path(path)
    what = "DeepSpeed config"
    text = read_user_text(path, what, fix)
    if path.suffix.lower() in (".yaml", ".yml"):
        raise MemprofError(f"{what} {path} is a YAML file, not DeepSpeed JSON: if it is an accelerate config, "
                           "pass it with --accelerate-config")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data = _hjson_or_none(text)
        if data is None:
            hint = " (it looks like a template: fill in its placeholders)" if ("{{" in text or "${" in text) else ""
            raise MemprofError(
                f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}){hint}: fix the file"
            ) from None
    if not isinstance(data, dict):
        raise MemprofError(f"{what} {path} must be a JSON object")
    return data


def _hjson_or_none(text: str) -> dict[str, Any] | None:
    """The object Hjson reads from ``text`` when the text is brace-delimited Hjson (comments,
    trailing commas); None otherwise. A bare ``key: value`` text (YAML) is not accepted, though
    Hjson would read it: no DeepSpeed config is written that way."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        import hjson  # a DeepSpeed dependency
    except ImportError:
        return None
    try:
        data = hjson.loads(text)
    except (ValueError, TypeError, RecursionError):  # hjson.HjsonDecodeError is a ValueError
        return None
    return _plain(data) if isinstance(data, dict) else None


def _plain(value: Any) -> Any:
    """hjson's OrderedDicts as plain dicts/lists (JSON-serialisable, compare equal to json.loads)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


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
) -> DeepSpeedSettings:
    """Read a DeepSpeed config (a path or a dict) into :class:`DeepSpeedSettings`.

    ``world_size`` is the data-parallel size DeepSpeed will see (for ``train_batch_size``).
    ``hidden_size``, ``micro_batch``, ``gradient_accumulation_steps`` and ``precision`` settle
    ``"auto"`` values the way HF's Trainer does with its model and ``TrainingArguments``; they do not
    override stated values (the estimator's flags do that afterwards). MemprofError, one line
    naming the key and the fix, for anything DeepSpeed would refuse or memprof does not model.
    """
    path: Path | None = None
    if isinstance(config, Mapping):
        ds = dict(config)
        where = source or "DeepSpeed config"
    else:
        path = Path(config)
        ds = load_config_file(path, fix_missing)
        where = source or str(path)
    return _Reader(ds, where, world_size, hidden_size, micro_batch, gradient_accumulation_steps, precision, path).read()


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
# optimizer types DeepSpeed knows that memprof's zoo does not model
_UNMODELLED_OPTIMIZERS = {"lamb": "Lamb", "onebitadam": "1-bit Adam", "zerooneadam": "0/1 Adam", "onebitlamb": "1-bit Lamb",
                          "lion": "Lion", "muon": "Muon", "muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD",
                          "adamax": "Adamax", "adadelta": "Adadelta", "nadam": "NAdam", "radam": "RAdam", "lbfgs": "LBFGS"}


class _Reader:
    def __init__(self, ds: dict[str, Any], where: str, world_size: int, hidden: int | None, micro: int | None,
                 gas: int | None, precision: str | None, path: Path | None):
        self.ds, self.where, self.world_size, self.path = ds, where, world_size, path
        self.hidden, self.micro_flag, self.gas_flag, self.precision_flag = hidden, micro, gas, precision
        self.auto: list[AutoValue] = []
        self.ignored: list[str] = []
        self.derived: list[str] = []

    def fail(self, message: str) -> MemprofError:
        return MemprofError(f"{self.where}: {message}")

    def read(self) -> DeepSpeedSettings:
        ds = self.ds
        self._refuse_unmodelled()
        stage, zero = self._zero()
        precision = self._precision()
        opt = self._optimizer()
        micro, gas, total = self._batch()
        ckpt = self._activation_checkpointing()
        self._other_autos()
        return DeepSpeedSettings(
            source=self.where, config=ds, zero_stage=stage, zero=zero, precision=precision,
            optimizer=opt[0], optimizer_type=opt[1], optimizer_params=opt[2], torch_adam=opt[3],
            zero_allow_untested_optimizer=ds.get("zero_allow_untested_optimizer", False) is True,
            micro_batch=micro, gradient_accumulation_steps=gas, train_batch_size=total,
            activation_checkpointing=ckpt, grad_accum_dtype=self._grad_accum_dtype(),
            auto=tuple(self.auto), ignored=tuple(self.ignored), derived=tuple(self.derived), path=self.path,
        )

    # -- what memprof does not model
    def _refuse_unmodelled(self) -> None:
        ds = self.ds
        zero = ds.get("zero_optimization")
        zero = zero if isinstance(zero, dict) else {}
        for key, feature in (("zero_quantized_weights", "ZeRO++ quantized weights"),
                             ("zero_quantized_nontrainable_weights", "ZeRO++ quantized non-trainable weights"),
                             ("zero_quantized_gradients", "ZeRO++ quantized gradients")):
            if zero.get(key) not in (None, False, AUTO):
                raise self.fail(f"zero_optimization.{key} ({feature}) is not modelled by memprof: remove it or set it to false")
        hpz = zero.get("zero_hpz_partition_size")
        if hpz not in (None, 0, 1, AUTO):
            raise self.fail(f"zero_optimization.zero_hpz_partition_size {hpz!r} (ZeRO++ hierarchical partitioning) is not "
                            "modelled by memprof: remove it or set it to 1")
        for key in ("mics_shard_size", "mics_hierarchical_params_gather"):
            if key in zero:
                raise self.fail(f"zero_optimization.{key} (MiCS) is not modelled by memprof, and DeepSpeed 0.19.8 removed "
                                "MiCS: remove it")
        if zero.get("zenflow") is not None:
            raise self.fail("zero_optimization.zenflow (ZenFlow) is not modelled by memprof: remove it")
        for key in ("offload_optimizer", "offload_param"):
            block = zero.get(key)
            if isinstance(block, dict):
                if str(block.get("device", "none")).lower() == "nvme":
                    raise self.fail(f"zero_optimization.{key}.device 'nvme' is not supported by memprof (NVMe offload "
                                    "is not modelled): use 'cpu' or 'none'")
                ratio = block.get("ratio", 1.0)
                if ratio not in (1, 1.0, AUTO):
                    raise self.fail(f"zero_optimization.{key}.ratio {ratio!r} (partial offload) is not modelled by "
                                    "memprof: remove it (offload everything) or use 'device': 'none'")
                if block.get("super_offload"):
                    raise self.fail(f"zero_optimization.{key}.super_offload is not modelled by memprof: remove it")
        pipe = ds.get("pipeline")
        if isinstance(pipe, dict) and pipe.get("stages", 1) not in (1, AUTO):
            raise self.fail(f"pipeline.stages {pipe.get('stages')!r} (pipeline parallelism) is not modelled by memprof: "
                            "remove the pipeline block")
        tp = ds.get("tensor_parallel")
        if isinstance(tp, dict) and tp.get("autotp_size", 1) not in (0, 1, AUTO):
            raise self.fail(f"tensor_parallel.autotp_size {tp.get('autotp_size')!r} (tensor parallelism) is not modelled "
                            "by memprof: remove the tensor_parallel block")
        sp = ds.get("sequence_parallel_size", 1)
        if sp not in (1, AUTO):
            raise self.fail(f"sequence_parallel_size {sp!r} (sequence parallelism) is not modelled by memprof: remove it")
        for block_key in ("bf16", "bfloat16", "fp16"):
            block = ds.get(block_key)
            if isinstance(block, dict):
                for key in ("bf16_master_weights_and_grads", "bf16_optimizer_states", "fp16_master_weights_and_grads"):
                    if block.get(key) not in (None, False):
                        raise self.fail(f"{block_key}.{key} (low-precision master weights) is not modelled by memprof: remove it")
        if isinstance(ds.get("torch_autocast"), dict) and ds["torch_autocast"].get("enabled") not in (None, False):
            raise self.fail("torch_autocast is not modelled by memprof: use the bf16 or fp16 block instead")

    # -- zero_optimization
    def _zero(self) -> tuple[int, ZeroKnobs]:
        zero = self.ds.get("zero_optimization")
        if zero is None:
            return 0, ZeroKnobs()
        if isinstance(zero, bool):  # deprecated form: true means stage 1 (read_zero_config_deprecated)
            return (1 if zero else 0), ZeroKnobs()
        if not isinstance(zero, dict):
            raise self.fail("zero_optimization must be an object")
        stage = zero.get("stage", 0)
        if stage == AUTO:
            raise self.fail('zero_optimization.stage is "auto": write 0, 1, 2 or 3 (or pass --zero-stage to memprof estimate)')
        if isinstance(stage, bool) or not isinstance(stage, (int, float)) or stage not in (0, 1, 2, 3):
            raise self.fail(f"zero_optimization.stage is {stage!r}: ZeRO stages are 0, 1, 2 or 3")
        stage = int(stage)
        kw: dict[str, Any] = {}
        for key, name in _KNOB_KEYS.items():
            if key not in zero:
                continue
            dotted = f"zero_optimization.{key}"
            value = zero[key]
            used = stage == 3 if name in _STAGE3_ONLY else stage > 0
            if value == AUTO:
                hf = _HIDDEN_AUTO.get(key)
                # HF fills reduce_bucket_size at every stage, the stage-3 two at stage 3 only; DeepSpeed
                # drops any "auto" left (DeepSpeedConfigModel, strict=False) and keeps its default.
                if hf is not None and (key == "reduce_bucket_size" or stage == 3):
                    if self.hidden is not None:
                        kw[name] = hf[1](self.hidden)
                        how = f"{hf[0].strip()}, hidden size {self.hidden}, as HF's Trainer fills it"
                        self.auto.append(AutoValue(dotted, kw[name], how))
                    elif used:
                        self.auto.append(AutoValue(dotted, None, "pass --model or --model-config (HF fills it from the "
                                                   "model's hidden size) or write a number"))
                    else:
                        self.auto.append(AutoValue(dotted, None, f"not read at ZeRO stage {stage}", changes_memory=False))
                else:
                    self.auto.append(AutoValue(dotted, None, "DeepSpeed drops it and keeps its default"
                                               + ("" if used else f"; not read at ZeRO stage {stage}"), changes_memory=False))
                continue
            kw[name] = _whole(value, dotted, self.where)
            if name == "reduce_bucket_size" and kw[name] == 0:
                raise self.fail(f"{dotted} = 0 must be a positive whole number of elements (DeepSpeedZeroConfig: gt=0)")
            if not used:
                self.ignored.append(f"{dotted} ignored: DeepSpeed does not read it at ZeRO stage {stage}")
        if stage < 3:
            for key in zero:
                if key.startswith("stage3_") and key not in _KNOB_KEYS:
                    self.ignored.append(f"zero_optimization.{key} ignored: DeepSpeed does not read it at ZeRO stage {stage}")
        for key in ("overlap_comm", "contiguous_gradients"):
            value = zero.get(key)
            if value is None or value == AUTO:
                continue
            if not isinstance(value, bool):
                raise self.fail(f"zero_optimization.{key} must be true or false")
            kw[key] = value
            if stage == 0:
                self.ignored.append(f"zero_optimization.{key} ignored: DeepSpeed does not read it at ZeRO stage 0")
        for key in ("offload_optimizer", "offload_param"):
            block = zero.get(key)
            if block is None:
                continue
            if not isinstance(block, dict):
                raise self.fail(f"zero_optimization.{key} must be an object like {{\"device\": \"cpu\"}}")
            device = str(block.get("device", "none")).lower()
            if device not in OFFLOAD_DEVICES:
                raise self.fail(f"zero_optimization.{key}.device {device!r} is not supported by memprof: use 'cpu' or 'none'")
            kw[key] = device
            pin = block.get("pin_memory")
            if pin is not None:
                if not isinstance(pin, bool):
                    raise self.fail(f"zero_optimization.{key}.pin_memory must be true or false")
                kw[f"{key}_pin_memory"] = pin
        # deprecated booleans (DeepSpeedZeroConfig cpu_offload / cpu_offload_param -> offload_* cpu)
        for old, new in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
            if zero.get(old) is True:
                if new in zero:  # DeepSpeed: "Cannot provide deprecated parameter ... and replacing parameter ... together"
                    raise self.fail(f"zero_optimization sets both {old} and {new}: DeepSpeed refuses that; keep {new}")
                kw[new] = "cpu"
                self.derived.append(f"zero_optimization.{old}: true read as {new}.device cpu (DeepSpeed's deprecated alias)")
        knobs = ZeroKnobs(**kw)
        if knobs.offload_optimizer != "none" and stage == 0:
            raise self.fail("offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
        if knobs.offload_param != "none" and stage != 3:
            # only ZeRO-3 (stage3.py / partition_parameters.py) reads offload_param; DeepSpeed's
            # stage 0-2 engines train with the parameters on the device whatever it says
            self.ignored.append(f"zero_optimization.offload_param ignored: DeepSpeed offloads parameters only at "
                                f"ZeRO stage 3 (stage is {stage}); parameters stay on the device")
            knobs = replace(knobs, offload_param="none")
        return stage, knobs

    # -- precision
    def _enabled(self, key: str) -> bool | None:
        """``<key>.enabled``: a JSON boolean; None for "auto". A missing block or key is off."""
        block = self.ds.get(key)
        if block is None:
            return False
        if not isinstance(block, dict):
            raise self.fail(f"{key} must be an object like {{\"enabled\": true}}")
        value = block.get("enabled", False)
        if value == AUTO:
            return None
        if not isinstance(value, bool):
            # DeepSpeed's pydantic would turn the string "false" into off, but memprof would not
            # know which reading the user meant
            raise self.fail(f"{key}.enabled is {value!r}: use true or false (a JSON boolean, not a string or number)")
        return value

    def _precision(self) -> str | None:
        bf16_key = "bf16" if self.ds.get("bf16") is not None else "bfloat16"  # get_bfloat16_config
        fp16, bf16 = self._enabled("fp16"), self._enabled(bf16_key)
        flag = self.precision_flag
        if fp16 is None or bf16 is None:
            if flag is None:
                for key, value in (("fp16", fp16), (bf16_key, bf16)):
                    if value is None:
                        self.auto.append(AutoValue(f"{key}.enabled", None, "pass --precision fp32, bf16 or fp16"))
                return None
            # HF: fp16.enabled <- args.fp16, bf16.enabled <- args.bf16
            if fp16 is None:
                fp16 = flag == "fp16"
                self.auto.append(AutoValue("fp16.enabled", fp16, f"--precision {flag}"))
            if bf16 is None:
                bf16 = flag == "bf16"
                self.auto.append(AutoValue(f"{bf16_key}.enabled", bf16, f"--precision {flag}"))
        if fp16 and bf16:
            raise MemprofError(f"{self.where} enables both bf16 and fp16: DeepSpeed accepts only one, enable one of them")
        return "fp16" if fp16 else "bf16" if bf16 else "fp32"

    # -- optimizer
    def _optimizer(self) -> tuple[str | None, str | None, dict[str, Any], bool]:
        block = self.ds.get("optimizer")
        if block is None:
            return None, None, {}, False
        name = optimizer_name_from_block(block, self.where)
        params = block.get("params") or {}
        for key, value in params.items():
            if value == AUTO:
                self.auto.append(AutoValue(f"optimizer.params.{key}", None, "HF fills it from TrainingArguments; "
                                           "no effect on memory", changes_memory=False))
        return name, block["type"], dict(params), params.get("torch_adam") is True

    # -- batch sizes
    def _batch(self) -> tuple[int | None, int, int | None]:
        ds, world = self.ds, self.world_size

        def stated(key: str, flag: int | None, flag_name: str) -> int | None:
            value = ds.get(key)
            if value is None:
                return None
            if value == AUTO:
                if flag is not None:
                    self.auto.append(AutoValue(key, flag, f"{flag_name} {flag}"))
                    return flag
                self.auto.append(AutoValue(key, None, f"pass {flag_name}"))
                return None
            return _whole(value, key, self.where, positive=True)

        micro = stated("train_micro_batch_size_per_gpu", self.micro_flag, "--micro-batch")
        gas = stated("gradient_accumulation_steps", self.gas_flag, "--gradient-accumulation-steps")
        total_raw = ds.get("train_batch_size")
        total: int | None = None
        if total_raw == AUTO:
            # HF: train_batch_size = world_size x per_device_train_batch_size x gradient_accumulation_steps
            if micro is not None:
                total = micro * (gas or 1) * world
                self.auto.append(AutoValue("train_batch_size", total, f"micro-batch {micro} x accumulation {gas or 1} "
                                           f"x world size {world}"))
            else:
                self.auto.append(AutoValue("train_batch_size", None, "follows the micro-batch", changes_memory=False))
        elif total_raw is not None:
            total = _whole(total_raw, "train_batch_size", self.where, positive=True)
        unresolved_auto = any(a.key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps") and not a.resolved
                              for a in self.auto)
        # runtime/config.py _set_batch_related_parameters: derive the one that is missing
        if total is not None and micro is not None and gas is None:
            if total % (micro * world):
                raise self.fail(f"train_batch_size {total} is not divisible by micro-batch {micro} x world size {world}: "
                                "set gradient_accumulation_steps, or drop train_batch_size")
            gas = total // micro // world
            self.derived.append(f"gradient_accumulation_steps {gas} derived as DeepSpeed does: train_batch_size {total} / "
                                f"micro-batch {micro} / world size {world}")
        elif total is not None and micro is None and not unresolved_auto:
            if total % ((gas or 1) * world):
                raise self.fail(f"train_batch_size {total} is not divisible by gradient_accumulation_steps {gas or 1} "
                                f"x world size {world}: set train_micro_batch_size_per_gpu instead")
            micro = total // world // (gas or 1)
            self.derived.append(f"micro-batch {micro} derived as DeepSpeed does: train_batch_size {total} / "
                                f"gradient_accumulation_steps {gas or 1} / world size {world}")
        gas = gas or 1
        if total is not None and micro is not None and not unresolved_auto and total != micro * gas * world:
            raise self.fail(
                f"train_batch_size {total} != micro-batch {micro} x gradient_accumulation_steps {gas} x world size {world} "
                "(DeepSpeed asserts it): fix one of them, or drop train_batch_size and DeepSpeed derives it"
            )
        if micro is not None and micro < 1:
            raise self.fail(f"train_batch_size {total} is smaller than gradient_accumulation_steps {gas} x world size {world}: "
                            "raise it or set train_micro_batch_size_per_gpu")
        if total is None and micro is not None:
            total = micro * gas * world
        return micro, gas, total

    # -- activation checkpointing
    def _activation_checkpointing(self) -> bool:
        if "activation_checkpointing" not in self.ds:
            return False
        block = self.ds["activation_checkpointing"]
        if block is None:
            return False
        if not isinstance(block, dict):
            raise self.fail("activation_checkpointing must be an object")
        # The HF model checkpoints through torch.utils.checkpoint, which has no DeepSpeed extras.
        unsupported = [k for k in ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization") if block.get(k)]
        if unsupported:
            raise self.fail(f"activation_checkpointing.{unsupported[0]} is not supported by memprof (the launcher "
                            "checkpoints with torch.utils.checkpoint, and the estimate models that): remove it")
        return True

    def _grad_accum_dtype(self) -> str | None:
        types = self.ds.get("data_types")
        if types is None:
            return None
        if not isinstance(types, dict):
            raise self.fail("data_types must be an object like {\"grad_accum_dtype\": \"fp32\"}")
        acc = types.get("grad_accum_dtype")
        if acc is None:
            return None
        name = DTYPE_SPELLINGS.get(str(acc).lower())
        if name is None:
            raise self.fail(f"data_types.grad_accum_dtype {acc!r} is not fp32, bf16 or fp16")
        return name

    def _other_autos(self) -> None:
        if self.ds.get("gradient_clipping") == AUTO:
            self.auto.append(AutoValue("gradient_clipping", None, "HF fills it from TrainingArguments.max_grad_norm; "
                                       "clipping's temporaries are not modelled", changes_memory=False))
        sched = self.ds.get("scheduler")
        if isinstance(sched, dict) and isinstance(sched.get("params"), dict):
            for key, value in sched["params"].items():
                if value == AUTO:
                    self.auto.append(AutoValue(f"scheduler.params.{key}", None, "HF fills it from TrainingArguments; "
                                               "no effect on memory", changes_memory=False))


def _whole(value: Any, key: str, where: str, positive: bool = False) -> int:
    """A whole number as DeepSpeed's pydantic int fields take it (``5e8`` included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MemprofError(f"{where}: {key} = {value!r} must be a non-negative whole number")
    if value < 0 or (positive and value < 1):
        kind = "an integer of at least 1" if positive else "a non-negative whole number"
        raise MemprofError(f"{where}: {key} is {value!r}: it must be {kind}")
    if float(value) != int(value):
        raise MemprofError(f"{where}: {key} = {value!r} must be a whole number")
    return int(value)


# ---- the optimizer block -----------------------------------------------------------------------


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
    if kind in ("adam", "adamw"):
        # DeepSpeed's "Adam" means AdamW unless adam_w_mode is false (engine._configure_basic_optimizer)
        adam_w = kind == "adamw" or bool(params.get("adam_w_mode", True))
        return "amsgrad" if params.get("amsgrad") else ("adamw" if adam_w else "adam")
    if kind in ("sgd", "rmsprop"):
        return torch_optimizer_name(kind, params, source)
    if kind == "adagrad":
        return "adagrad"
    feature = _UNMODELLED_OPTIMIZERS.get(kind.replace("_", "").replace("-", ""))
    if feature is not None:
        raise MemprofError(f"{source}: optimizer type {opt['type']!r} ({feature}) is not modelled by memprof: "
                           "use Adam, AdamW, SGD, RMSprop or Adagrad")
    raise MemprofError(
        f"{source}: unknown optimizer type {opt['type']!r}, not modelled by memprof: use Adam, AdamW, SGD, RMSprop or Adagrad"
    )


def find_auto(value: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every ``"auto"`` value anywhere in a config."""
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += find_auto(v, f"{prefix}{k}.")
    elif value == AUTO:
        out.append(prefix.rstrip("."))
    return out
