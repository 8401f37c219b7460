"""Model states per rank, one module per engine over shared rules.

``state`` (what a layout writes and reads; optimizer temporaries; gradient accumulation),
``partition`` (flat-buffer partitioning: alignment, padding, per-rank partition numels),
``deepspeed_zero`` (DeepSpeed 0.19.8, ZeRO stage 0-3), ``ddp`` (torch DDP without DeepSpeed),
``fsdp2`` (torch FSDP2, ``fully_shard``).
:func:`model_state_layout` picks the engine's module through ``LAYOUT_BY_ENGINE``: a new
parallelism (a member of ``memprof.engines.Engine``) is one module here, exporting its
``EngineLayout``, and one line in that dict (README, "Add a parallelism").
"""

from __future__ import annotations

from memprof.engines import Engine
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.layout.ddp import DDP_LAYOUT
from memprof.estimate.layout.deepspeed_zero import DEEPSPEED_ZERO_LAYOUT
from memprof.estimate.layout.fsdp2 import FSDP2_LAYOUT
from memprof.estimate.layout.state import EngineLayout, StateLayout, layout_setup
from memprof.estimate.model_shapes import ModelShape
from memprof.estimate.optimizers import uses_deepspeed_adam

LAYOUT_BY_ENGINE: dict[Engine, EngineLayout] = {
    Engine.DEEPSPEED: DEEPSPEED_ZERO_LAYOUT,
    Engine.DDP: DDP_LAYOUT,
    Engine.FSDP2: FSDP2_LAYOUT,
}
"""Engine -> how it lays out one rank's model states, and the assumptions naming that layout."""


def engine_layout(inp: EstimateInputs) -> EngineLayout:
    """The layout of ``inp.engine`` (an ``Engine`` or its string value, which hashes alike;
    ``EstimateInputs`` refused any other)."""
    return LAYOUT_BY_ENGINE[inp.engine]


def describe_layout(inp: EstimateInputs) -> str:
    """The estimate's assumption naming the layout, e.g. "DeepSpeed 0.19.8 layout, ... ZeRO stage 2"."""
    return engine_layout(inp).layout_assumption(inp)


def describe_buckets(inp: EstimateInputs) -> str:
    """The estimate's assumption naming the gradient buckets the layout was given."""
    return engine_layout(inp).buckets_assumption(inp)


def describe_modelled_ranks(inp: EstimateInputs) -> str | None:
    """The engine's assumption naming the ranks modelled, or None for the DeepSpeed wording."""
    describe = engine_layout(inp).ranks_assumption
    return describe(inp) if describe is not None else None


def model_state_layout(inp: EstimateInputs, shape: ModelShape, rank: int, device_type: str) -> StateLayout:
    """The model states of ``rank`` as ``inp.engine`` lays them out (see the engine's module)."""
    out = StateLayout()
    # notes every engine's layout starts with, in this order: the optimizer note describes how the
    # estimate models Adam without "torch_adam" (no step tensors, no temporaries) whatever the engine
    if shape.n_tensors == 1:
        out.notes.append("bare parameter count: per-tensor sizes unknown, so buffers sized by the largest "
                         "parameter (stage-3 gathers, offload staging) are left out")
    if uses_deepspeed_adam(inp.optimizer, inp.torch_adam):
        out.notes.append("Adam/AdamW without \"torch_adam\": DeepSpeed's FusedAdam (DeepSpeedCPUAdam under optimizer "
                         "offload) keeps its step count in a Python int and updates in one kernel (no temporaries)")
    engine_layout(inp).lay_out(layout_setup(inp, shape, rank, device_type), out)
    return out
