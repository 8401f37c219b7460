"""Which engine lays a run's model states out across its ranks: the seam parallelisms plug into.

Torch-free (it imports only ``memprof.errors``), so the estimator, the run files and the
integrations can all name an engine without pulling each other in. Each engine has one layout
module in ``memprof.estimate.layout`` (registered in ``LAYOUT_BY_ENGINE`` there); the README's
"Add a parallelism" lists the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from memprof.errors import MemprofError


class Engine(str, Enum):
    """The training engine that owns the model states (parameters, gradients, optimizer state).

    A ``str`` enum: it compares equal to its value (``"deepspeed"``) and ``json.dumps`` writes the
    value; ``EstimateInputs.to_json`` writes ``.value`` (``str()`` of a member is its name).
    """

    DEEPSPEED = "deepspeed"
    """DeepSpeed's engine, ZeRO stage 0-3 (``deepspeed.initialize``): the launcher's runs and the
    integrations' DeepSpeed runs."""
    DDP = "ddp"
    """torch ``DistributedDataParallel`` without DeepSpeed (HF Trainer / accelerate under torchrun):
    every rank keeps whole model states plus DDP's flat gradient buckets; no ZeRO stage."""
    FSDP2 = "fsdp2"
    """torch FSDP2 (``torch.distributed.fsdp.fully_shard`` on each transformer block and the root,
    or accelerate with ``fsdp_version: 2``): dim-0 shards of every parameter, gradient and optimizer
    state, blocks gathered for their forward and backward; no ZeRO stage."""


@dataclass(frozen=True)
class Fsdp2Settings:
    """FSDP2's knobs an estimate follows (``fully_shard``'s ``reshard_after_forward``,
    ``MixedPrecisionPolicy``, ``CPUOffloadPolicy``); meaningful only with ``Engine.FSDP2``.

    ``param_dtype`` / ``reduce_dtype``: ``"fp32" | "bf16" | "fp16"`` or None (no cast). With a
    ``param_dtype`` the sharded parameters stay fp32 and only the gathered copies are cast
    (``_fsdp_param.py``: ``FSDPParam.init_dtype_attrs``); the estimate's ``precision`` is then the
    compute dtype, ``param_dtype``."""

    reshard_after_forward: bool = True
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    offload_params: bool = False  # CPUOffloadPolicy: shards, their gradients and the optimizer step on the host


_ENGINES = frozenset(Engine)  # a member and its string value hash alike: "ddp" in _ENGINES


def check_engine(engine: object, zero_stage: int) -> None:
    """MemprofError, one line, for an engine memprof does not know or a ZeRO stage it cannot run.

    Either an ``Engine`` or its string value passes (a planner builds thousands of inputs: no
    conversion here)."""
    if not isinstance(engine, str) or engine not in _ENGINES:
        raise MemprofError(f"unknown engine {engine!r}: choose one of {', '.join(e.value for e in Engine)}")
    if engine == Engine.DDP and zero_stage != 0:
        raise MemprofError(f"torch DDP has no ZeRO stage (got zero_stage {zero_stage}): use zero_stage 0 with engine ddp, "
                           "or engine deepspeed")
    if engine == Engine.FSDP2 and zero_stage != 0:
        raise MemprofError(f"FSDP2 has no ZeRO stage (got zero_stage {zero_stage}): it shards like ZeRO-3 on its own; "
                           "drop --zero-stage with --engine fsdp2")
