"""Model states per rank under torch ``DistributedDataParallel`` without DeepSpeed (HF Trainer /
accelerate under torchrun): whole model states on every rank, plus DDP's gradient buckets.

torch/nn/parallel/distributed.py: the C++ ``Reducer`` allocates flat buckets holding every
trainable parameter's gradient once (shared parameters deduplicated,
``DistributedDataParallel._build_params_for_reducer``) when DDP is built, and keeps them for the
run; with ``gradient_as_bucket_view`` False (the default) each ``param.grad`` is copied in,
all-reduced and copied back. The optimizer is the script's own torch optimizer: no fp32 master
copy, no DeepSpeed all-reduce copy.
"""

from __future__ import annotations

from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.layout.deepspeed_zero import describe_zero_buckets
from memprof.estimate.layout.state import (
    C,
    EngineLayout,
    G,
    LayoutSetup,
    O,
    P,
    StateLayout,
    accumulate_between_microsteps,
    optimizer_temporaries,
)
from memprof.estimate.optimizers import optimizer_state_bytes


def ddp_layout(s: LayoutSetup, out: StateLayout) -> None:
    """The model states of ``s.rank`` under DDP (every rank alike): parameters, the gradient
    buckets, the optimizer's state; ``param.grad`` from backward's end through the step."""
    inp, e, total = s.inp, s.e, s.t_total  # total: the trainable parameters (all, in full fine-tuning)
    out.add("device", P, total * e + s.frozen_bytes)  # every parameter, frozen ones too (4-bit ones packed)
    # the Reducer's buckets: one element per trainable parameter (DistributedDataParallel
    # _build_params_for_reducer keeps parameters with requires_grad only)
    out.add("device", C, total * e)
    out.notes.append(
        "torch DDP, no DeepSpeed: its gradient buckets hold a copy of every gradient for the run "
        f"({total * e:,} bytes, comm_buffers); no DeepSpeed all-reduce copy; not modelled: with "
        "find_unused_parameters=True DDP's _DDPSink clones the forward outputs (the logits), above the forward peak here"
        + ("; gradient_as_bucket_view=True modelled as False, an upper bound (gradients are then views "
           "of the buckets, one copy fewer)" if inp.ddp_gradient_as_bucket_view else ""))
    out.add("device", O, optimizer_state_bytes(inp.optimizer, total, len(s.numels), step_tensors=s.step_tensors))
    # backward: param.grad for every param, all-reduced through the buckets that exist already
    out.backward_end_extra = {G: total * e}
    # step: param.grad and the optimizer's temporaries
    out.step_moments = [{G: total * e, O: optimizer_temporaries(inp, s.t_largest, total, s.device_type, s.numels)}]
    # gradients accumulate in param.grad in place (DDP's no_sync, or reducing every micro-step:
    # either way every param.grad, e*P, is alive between micro-steps)
    accumulate_between_microsteps(s, out, {G: total * e}, same_at_end=(G,), how="every param.grad (e*P)")


def describe_ddp(inp: EstimateInputs) -> str:
    return (f"torch DDP without DeepSpeed (the stage-0 layout less DeepSpeed's own optimizer wrappers), world size "
            f"{inp.world_size}, {inp.precision}")


# the buckets line names DeepSpeed's zero_optimization knobs, which a DDP run does not use; kept
# word for word so DDP estimates stay as they were (DDP's own bucket_cap_mb would say more)
DDP_LAYOUT = EngineLayout(ddp_layout, describe_ddp, describe_zero_buckets)
