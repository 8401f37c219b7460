"""Model states per rank under torch ``DistributedDataParallel`` without DeepSpeed (HF Trainer /
accelerate under torchrun): whole model states on every rank, plus DDP's gradient buckets.

torch/nn/parallel/distributed.py: the C++ ``Reducer`` allocates flat buckets holding every
trainable parameter's gradient once (shared parameters deduplicated,
``DistributedDataParallel._build_params_for_reducer``) when DDP is built, and keeps them for the
run; with ``gradient_as_bucket_view`` False (the default) each ``param.grad`` is copied in,
all-reduced and copied back. The optimizer is the script's own torch optimizer: no fp32 master
copy, no DeepSpeed all-reduce copy.

With ``find_unused_parameters=True`` (the HF Trainer's choice without checkpointing) DDP's
``_post_forward`` passes the model's outputs through ``_DDPSink``, which clones each one that has
a grad_fn (the loss and the logits): a forward moment after the model's forward returned
(:func:`ddp_sink_after_model`).
"""

from __future__ import annotations

from collections.abc import Callable

from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.layout.deepspeed_zero import describe_zero_buckets
from memprof.estimate.layout.state import (
    FP32,
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
from memprof.families.common import Activations


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
        f"({total * e:,} bytes, comm_buffers); no DeepSpeed all-reduce copy; " + _sink_words(s)
        + ("; gradient_as_bucket_view=True modelled as False, an upper bound (gradients are then views "
           "of the buckets, one copy fewer)" if inp.ddp_gradient_as_bucket_view else ""))
    out.forward_after_model = ddp_sink_after_model(s)
    out.add("device", O, optimizer_state_bytes(inp.optimizer, total, len(s.numels), step_tensors=s.step_tensors))
    # backward: param.grad for every param, all-reduced through the buckets that exist already
    out.backward_end_extra = {G: total * e}
    # step: param.grad and the optimizer's temporaries
    out.step_moments = [{G: total * e, O: optimizer_temporaries(inp, s.t_largest, total, s.device_type, s.numels)}]
    # gradients accumulate in param.grad in place (DDP's no_sync, or reducing every micro-step:
    # either way every param.grad, e*P, is alive between micro-steps)
    accumulate_between_microsteps(s, out, {G: total * e}, same_at_end=(G,), how="every param.grad (e*P)")


def _sink_applies(s: LayoutSetup) -> bool:
    """Whether DDP's _DDPSink clones the outputs: ``find_unused_parameters`` taken as the HF
    Trainer sets it (transformers/trainer.py:749-756, ``ddp_find_unused_parameters`` unset and a
    PreTrainedModel: ``not`` gradient checkpointing; the run does not record DDP's flag), with the
    HF loss (TRL's fused head and DPO return other outputs: not modelled) and a known vocabulary."""
    return not s.inp.activation_checkpointing and s.inp.loss_implementation == "hf" and bool(s.shape.vocab)


def ddp_sink_after_model(s: LayoutSetup) -> Callable[[Activations], int] | None:
    """The activation bytes at DDP's _DDPSink, after the model's forward returned, from the
    family's Activations; None where the sink does not clone.

    torch 2.13 torch/nn/parallel/distributed.py: ``forward`` (1884-1892) hands the model's output
    to ``_post_forward``, which with ``find_unused_parameters and not static_graph`` (1845-1847)
    flattens it and calls ``_DDPSink.apply`` on every tensor with a grad_fn (1856-1870);
    ``_DDPSink.forward`` (381-391) clones each (``_ddp_sink_clone`` is True from __init__, 1155).
    The HF causal LM's output (CausalLMOutputWithCrossAttentions / CausalLMOutputWithPast) holds
    the loss (fp32 scalar) and the logits (B*S*V*e); past_key_values is a Cache object, not a
    pytree node in training, so not cloned. While the clones are made the original output is still
    referenced by ``forward``'s local, so both copies are alive beside every saved activation; the
    original dies when ``forward`` returns (log_softmax saved its own output, not the logits) and
    the Trainer drops the clones when compute_loss returns the loss alone (transformers/trainer.py
    2209, 2242, 2254), before backward. The model's locals are gone by then, and ForCausalLMLoss
    (transformers/loss/loss_utils.py:62-67) has freed the logits' fp32 upcast and the padded labels.

    Without a KV cache: every saved tensor (Activations.saved, logits excluded), the output and
    its clone, 2 x (B*S*V*e + 4). With one (config.use_cache) its per-layer copies live in the
    output too, which only the family's loss's end counts: that moment (Activations.forward_peak)
    less the upcast (B*S*V*4 when e < 4) and the padded labels (B*(S+1) int64; none at B = 1,
    where ``contiguous()`` returns the view, the storage nll_loss saves), plus the clones; an
    upper bound where a moment inside the last layer is higher than the loss's end."""
    if not _sink_applies(s):
        return None
    B, S, V, e = s.inp.micro_batch, s.inp.seq_len or s.shape.n_positions, s.shape.vocab, s.e
    output = B * S * V * e + FP32  # the logits and the loss; the sink clones each once
    if not s.shape.use_cache:
        return lambda acts: acts.saved + 2 * output
    freed = (B * S * V * FP32 if e < FP32 else 0) + (B * (S + 1) * 8 if B > 1 else 0)
    return lambda acts: acts.forward_peak - freed + output


def _sink_words(s: LayoutSetup) -> str:
    if _sink_applies(s):
        return ("find_unused_parameters=True taken (the HF Trainer's choice without checkpointing): DDP's _DDPSink "
                "clones the outputs (the logits and the loss) after the model's forward, a forward moment "
                "(an upper bound where find_unused_parameters is False, torch's and accelerate's default)")
    return ("DDP's _DDPSink output clones not modelled (find_unused_parameters taken False under checkpointing, "
            "as the HF Trainer sets it, or a TRL loss)")


def describe_ddp(inp: EstimateInputs) -> str:
    return (f"torch DDP without DeepSpeed (the stage-0 layout less DeepSpeed's own optimizer wrappers), world size "
            f"{inp.world_size}, {inp.precision}")


# the buckets line names DeepSpeed's zero_optimization knobs, which a DDP run does not use; kept
# word for word so DDP estimates stay as they were (DDP's own bucket_cap_mb would say more)
DDP_LAYOUT = EngineLayout(ddp_layout, describe_ddp, describe_zero_buckets)
