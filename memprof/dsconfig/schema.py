"""What reading a DeepSpeed config yields: the vocabularies, :class:`ZeroKnobs` (the memory-changing
``zero_optimization`` knobs with DeepSpeed 0.19.8's defaults), :class:`AutoValue` (one HF-style
``"auto"`` and what it became) and :class:`DeepSpeedSettings` (the whole config, read once).
Defined here only; everything else imports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """A DeepSpeed config, read once: what DeepSpeed 0.19.8 will do with it, in memprof's terms,
    with the caller's values (the estimator's flags) laid over it where the caller gave them."""

    source: str
    """How messages name the config: its path, or a label such as "the run's deepspeed_config"."""
    config: dict[str, Any]
    """The object exactly as loaded (the launcher hands it unchanged to ``deepspeed.initialize``)."""
    zero_stage: int
    zero: ZeroKnobs
    precision: str | None
    """``fp32``, ``bf16`` or ``fp16``; None only while an ``"auto"`` precision is unresolved."""
    optimizer: str | None
    """Zoo name (:data:`memprof.optimizers.OPTIMIZERS`) of the "optimizer" block; None when there is no block."""
    optimizer_type: str | None = None
    """The block's "type" exactly as written (DeepSpeed matches some case-sensitively)."""
    optimizer_params: dict[str, Any] = field(default_factory=dict)
    torch_adam: bool = False
    """``optimizer.params.torch_adam``: torch.optim Adam/AdamW instead of FusedAdam/CPUAdam."""
    zero_allow_untested_optimizer: bool = False
    micro_batch: int | None = None
    """Samples per rank per micro-step; None when neither the caller nor the config states or implies it."""
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
    def offload_param(self) -> str:
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
