"""``estimate()``: per-rank memory by category, at rest and at each phase's peak.

Pure arithmetic over :mod:`model_shapes`, :mod:`optimizers`, :mod:`layout` and
:mod:`activations`; no torch import, so a planner can call it thousands of times.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from memprof.categories import Breakdown, Category, breakdown_total, empty_breakdown
from memprof.dsconfig import ELEMENT_SIZE
from memprof.errors import MemprofError
from memprof.estimate.activations import ActivationQuery, Activations, model_activations
from memprof.estimate.cuda_runtime import ASSUMED_CAPABILITY, blas_workspace_bytes, cublas_workspace_bytes
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.layout import describe_buckets, describe_layout, describe_modelled_ranks, model_state_layout
from memprof.estimate.layout.partition import stage12_rank_grads
from memprof.estimate.layout.state import FP32, G, StateLayout
from memprof.estimate.model_shapes import ModelShape, model_shape, shape_of
from memprof.estimate.optimizers import OPTIMIZER_SPECS
from memprof.estimate.overhead import overhead
from memprof.estimate.paper import PAPER_LAYOUT_HAS_NO_ACTIVATIONS, paper_estimate, paper_model_states
from memprof.estimate.quant_terms import quantization_assumptions
from memprof.estimate.result import Estimate, RankEstimate
from memprof.estimate.trainer_terms import (
    FusedHeadBytes,
    ReferenceForward,
    dpo_rows,
    scored_positions,
    trl_fused_head_bytes,
)
from memprof.estimate.trainer_terms import dpo_reference_forward as trainer_dpo_reference_forward
from memprof.families.common import INT64

ACT = Category.ACTIVATIONS.value


def _breakdown(rest: dict[str, dict[str, int]]) -> Breakdown:
    b = empty_breakdown()
    for loc, cats in rest.items():
        for cat, n in cats.items():
            b[loc][cat] += int(n)
    return b


def _with_extra(rest: Breakdown, extra: dict[str, int]) -> Breakdown:
    b = {loc: dict(cats) for loc, cats in rest.items()}
    for cat, n in extra.items():
        b["device"][cat] += int(n)
    return b


def _phase_extras(lay: StateLayout, acts: Activations | None, checkpointing: bool) -> dict[str, list[dict[str, int]]]:
    """For each phase, the candidate moments for its peak as device bytes beyond ``lay.rest``
    (which already holds what the loop keeps between steps: its batch and loss).

    forward: the end of the loss (all saved activations, logits, the loss's upcast copy); with
    checkpointing, possibly inside the first block (``Activations.forward_peak`` picks); where the
    layout has one (``lay.forward_last_block_extra``, FSDP2), the end of the last block.
    backward: its start (the loss gradients beside every saved activation; buckets not yet
    allocated), the first gradient hook (setup_buckets allocates the reduce buckets while
    activations are still alive), or its end (gradients held, activations freed).
    step: the layout's moments (gradient copies DeepSpeed makes, optimizer temporaries).
    """
    held = acts.loop_held if acts else 0

    def act(nbytes: int) -> int:
        return max(0, nbytes - held)  # beyond what ``rest`` already counts

    a_fwd = act(acts.forward_peak) if acts else 0
    a_bwd = act(acts.backward_peak) if acts else 0
    a_hook = act(acts.backward_first_hook) if acts else 0
    start = lay.forward_extra if lay.backward_start_extra is None else lay.backward_start_extra
    backward = [{**start, ACT: a_bwd}, {**lay.backward_extra, ACT: a_hook}, dict(lay.backward_end_extra)]
    if acts and acts.after_mlp_out_hooks and lay.backward_after_mlp_out_hooks_extra:
        # ZeRO-2: a rank whose gradient partition the first reductions already reach holds it here
        backward.append({**lay.backward_after_mlp_out_hooks_extra, ACT: act(acts.after_mlp_out_hooks)})
    # ZeRO-2 + offload: an oversized gradient's clone and fp64 norm copy at two later hooks of that block
    for extra, level in ((lay.backward_mlp_out_weight_hook_extra, acts.mlp_out_weight_hook if acts else 0),
                         (lay.backward_mlp_in_bias_hook_extra, acts.mlp_in_bias_hook if acts else 0)):
        if extra and level:
            backward.append({**extra, ACT: act(level)})
    backward.extend(_block_moments(lay, acts, act))
    if lay.backward_after_head_extra is not None and acts and acts.backward_head_split:
        # ZeRO-3: each moment with its own activations, not every one with the highest of them
        start_level, hook_level, after_head = acts.backward_head_split
        backward[0] = {**start, ACT: act(start_level)}
        backward[1] = {**lay.backward_extra, ACT: act(hook_level)}
        backward.append({**lay.backward_after_head_extra, ACT: act(after_head)})
    # at backward's start only the params gathered for it exist beside the activations; gradients
    # and reduce buckets come with the first hook
    forward = [{**lay.forward_extra, ACT: a_fwd}]
    if lay.forward_in_layer_extra and acts and acts.forward_in_layer:
        forward.append({**lay.forward_in_layer_extra, ACT: act(acts.forward_in_layer)})
    if lay.forward_last_block_extra:
        forward.append({**lay.forward_last_block_extra, ACT: _last_block_activations(acts, checkpointing, act)})
    if lay.forward_copy_out_extra and checkpointing and acts and acts.block_kept:
        # what the family says is alive as the last block's forward starts (GPT-2: every block input,
        # the embeddings' outputs GPT2Model.forward still holds, the RNG stashes); else each block's
        # checkpointed input only (the last block's too: its input exists), a lower bound
        before = (act(acts.forward_before_last_block) if acts.forward_before_last_block
                  else lay.forward_copy_out_blocks * acts.block_kept)
        forward.append({**lay.forward_copy_out_extra, ACT: before})
    if lay.forward_after_model is not None and acts and not checkpointing:
        # after the model's forward returned: its saved tensors, its output and what the engine
        # adds there (DDP's _DDPSink output clones, layout/ddp.py)
        forward.append({**lay.forward_extra, ACT: act(lay.forward_after_model(acts))})
    forward.extend(_block_fetch_moments(lay, acts, act))
    return {
        "forward": forward,
        "backward": backward,
        "step": [dict(m) for m in lay.step_moments] or [{}],
    }


def _block_moments(lay: StateLayout, acts: Activations | None, act: Callable[[int], int]) -> list[dict[str, int]]:
    """Where every param.grad is kept through backward (``lay.backward_blocks_extra``: DeepSpeed
    ZeRO-0, and ZeRO-1 without overlap_comm), backward block by block, i = L-1 down to 0: block
    i's in-block moments (``acts.block_moments``, the last block's) less what the blocks after it
    released (``acts.block_kept`` each: torch.utils.checkpoint's non-reentrant frame drops its
    saved input, or autograd its saved tensors, once that block's backward ran), beside the
    gradients of every parameter after block i (``acts.later_grad_elements[i]``) and of the block's
    own finished ones. The largest of these moments (one dict; none where not modelled): with
    gradients growing faster than the kept tensors shrink it is block 0's, else the last block's.
    ZeRO-2 (``lay.backward_blocks_after``) frees each gradient at its hook instead: the same
    moments beside what the reductions up to then hold (``grads_in_partition`` once one reached
    this rank's partition, an oversized gradient waiting, the bucket). FSDP2
    (``lay.backward_block_state``) says itself what block i's moments hold beside its activations."""
    if acts is not None and acts.block_moments and lay.backward_block_state is not None and lay.backward_block_count:
        state = lay.backward_block_state
        # each block's traced in-block moments, then its post-backward reduce (own None), once autograd
        # has released the block's saved tensors: its lowest traced moment less block_kept (no later
        # moment is traced; errs low, as that moment had already released part of them: an upper bound
        # there made the reduce the peak of a 4-layer Llama, +3.7% beyond its measured backward peak)
        moments = (*acts.block_moments, (min(level for level, _ in acts.block_moments) - acts.block_kept, None))
        fsdp2 = ({**state(done, own), ACT: act(level - done * acts.block_kept)}
                 for done in range(lay.backward_block_count) for level, own in moments)
        return [max(fsdp2, key=lambda m: sum(m.values()))]  # the first highest: the last block's on a tie
    if acts is None or not acts.block_moments or not acts.later_grad_elements:
        return []
    later, L = acts.later_grad_elements, len(acts.later_grad_elements)
    if lay.backward_blocks_after is not None:
        # ZeRO-2: the same moments beside what the hooks fired by then left (later[i] + own elements);
        # a plain loop keeping the first highest (advise asks this of ~10^5 moments for a 70B model)
        best = _stage2_block_moment(lay.backward_blocks_after, acts, act)
        # after the blocks, a tied embedding's gradient shares summed (deepspeed_zero._stage2_tied_sum)
        tied = [dict(lay.backward_tied_sum_extra)] if lay.backward_tied_sum_extra else []
        return ([best] if best is not None else []) + tied
    if lay.backward_blocks_extra is None:
        return []
    extra, size = lay.backward_blocks_extra, lay.backward_blocks_grad_size
    moments = ({**extra, G: extra.get(G, 0) + size * (later[i] + own),
                ACT: act(level - (L - 1 - i) * acts.block_kept)}
               for i in range(L) for level, own in acts.block_moments)
    return [max(moments, key=lambda m: sum(m.values()))]


def _stage2_block_moment(after: Callable[[int], dict[str, int] | None], acts: Activations,
                         act: Callable[[int], int]) -> dict[str, int] | None:
    """ZeRO-2's highest block moment (:func:`_block_moments`): the first highest in block order
    (block 0 first, each block's moments in order). Walked from the last block down: a block's
    activations only shrink with the blocks after it, so once its highest moment beside the most
    the hooks can leave (``after.most``, where the layout gives it) is below the best so far, no
    earlier block can be the peak (advise asks this of ~10^5 moments for a 70B model)."""
    later, L = acts.later_grad_elements, len(acts.later_grad_elements)
    most = getattr(after, "most", None)
    top_level = max(level for level, _ in acts.block_moments)
    best, best_total = None, -1
    for i in reversed(range(L)):
        kept = (L - 1 - i) * acts.block_kept
        if most is not None and act(top_level - kept) + most < best_total:
            break
        block_best, block_total = None, -1
        for level, own in acts.block_moments:
            m = after(later[i] + own)
            if m is not None:
                a = act(level - kept)
                total = sum(m.values()) + a
                if total > block_total:  # the first highest within a block
                    block_best, block_total = {**m, ACT: a}, total
        if block_best is not None and block_total >= best_total:  # an earlier block wins a tie
            best, best_total = block_best, block_total
    return best


def _block_fetch_moments(lay: StateLayout, acts: Activations | None, act: Callable[[int], int]) -> list[dict[str, int]]:
    """ZeRO-3 with checkpointing: every block's in-block forward moments (``acts.forward_in_blocks``)
    beside what the parameter coordinator holds at that point of forward (``lay.forward_at_fetch``:
    blocks gathered so far, prefetched all-gather buffers), the highest one (one dict; none where
    not modelled). The loss's moment pairs forward's end state with the most activations; an
    earlier block's pairs fewer kept block inputs with more buffers in flight and can be higher
    (3-rank GPT-2 w96, prefetch 50,000: block 1 of 3's GELU, by 2%)."""
    if lay.forward_at_fetch is None or acts is None or not acts.forward_in_blocks:
        return []
    best: dict[str, int] | None = None
    best_total = -1
    for pos, level in acts.forward_in_blocks:
        m = {**lay.forward_at_fetch(pos), ACT: act(level)}
        total = sum(m.values())
        if total > best_total:  # the first highest: an earlier moment wins a tie
            best, best_total = m, total
    return [best] if best is not None else []


def _last_block_activations(acts: Activations | None, checkpointing: bool, act: Callable[[int], int]) -> int:
    """Activations at the end of the last block's forward: every block's saved tensors and the
    block's own outputs, the head's (final norm, log-softmax) not yet: ``Activations.last_block_end``
    where the family models it (Llama with LoRA), else ``Activations.saved``, which holds the
    head's and not the block's outputs, alike in size in full fine-tuning (within 1% of the measured
    bytes on 2-rank GPT-2, fp32 and bf16, tests/test_fsdp2.py) but not with LoRA, where the head's
    log-softmax outweighs what the blocks save (an upper bound there); under checkpointing the
    forward peak, which is inside the last block or at the loss (an upper bound)."""
    if acts is None:
        return 0
    return act(acts.forward_peak if checkpointing else (acts.last_block_end or acts.saved))


def _device_other(inp: EstimateInputs) -> int:
    """Device bytes that are neither model states nor activations, alive from the second step on.

    CPU: the script's own resident tensors (its tokenised data set lives in the measured memory).
    CUDA: the cuBLAS/cuBLASLt workspaces PyTorch keeps cached per thread (cuda_runtime.py); the
    launcher's data set stays in host memory there, so it is no device byte.
    """
    if inp.device_type != "cuda":
        return inp.script_resident_bytes
    return blas_workspace_bytes(inp.cuda_capability or ASSUMED_CAPABILITY, inp.activation_checkpointing)


def _loop_activations(inp: EstimateInputs, acts: Activations | None) -> int:
    """What the training loop holds between steps as ``activations``: its batch and loss
    (``Activations.loop_held``) and the trainer's other held batches (``_trainer_batches``)."""
    return (acts.loop_held if acts else 0) + _trainer_batches(inp)


def _trainer_batches(inp: EstimateInputs) -> int:
    """DPO under the HF Trainer: the collated batches it holds beyond the one input_ids tensor the
    activation formula counts, ``activations`` as that one is (the model's inputs: the profiler
    names every batch a data loader returned, memprof.measure.regions). transformers 5's
    ``_inner_training_loop`` fetches an optimizer step's ``gradient_accumulation_steps`` batches up
    front (``get_batch_samples``) and keeps the list through its micro-steps; accelerate's
    ``DataLoaderShard.__iter__`` iterates one batch ahead (on the CPU: moved to the device only when
    it becomes current). Each DPO batch is
    ``DataCollatorForPreference``'s input_ids, attention_mask and completion_mask, ``2B x S`` int64
    each (TRL's ``pad``; ``ref_chosen_logps`` / ``ref_rejected_logps``, B fp32 each, when precomputed)."""
    if inp.loss_implementation != "trl_dpo" or inp.seq_len is None:
        return 0
    rows, seq = model_rows(inp), inp.seq_len
    batch = 3 * rows * seq * INT64 + (2 * inp.micro_batch * FP32 if inp.precompute_ref_log_probs else 0)
    held = inp.gradient_accumulation_steps + (1 if inp.device_type != "cuda" else 0)
    return held * batch - rows * seq * INT64


def _rest_with_loop(lay: StateLayout, inp: EstimateInputs, acts: Activations | None) -> Breakdown:
    """Model states at rest plus what the training loop itself keeps alive between steps: its last
    batches and loss (activations: ``_loop_activations``) and what is neither (other: see ``_device_other``)."""
    rest = _breakdown(lay.rest)
    rest["device"][ACT] += _loop_activations(inp, acts)
    rest["device"][Category.OTHER.value] += _device_other(inp)
    return rest


def _buffer_bytes(shape: ModelShape) -> int:
    """Module buffers (the Llama family's rotary inv_freq, original_inv_freq): on the device at
    every stage, fp32 even under bf16/fp16 (DeepSpeed's engine casts parameters only,
    engine._configure_distributed_model); the ownership walk counts them as params. A 4-bit
    base's QuantState tensors likewise (no parameters: no cast, no ZeRO partition; the ownership
    walk counts them as params too): ModelShape.quant_state_bytes."""
    return FP32 * shape.buffer_numel + shape.quant_state_bytes


def reference_shape(inp: EstimateInputs) -> ModelShape | None:
    """The frozen reference model's shape (``inp.reference_model``: a config, or a bare count)."""
    if inp.reference_model is None:
        return None
    cfg = None if set(inp.reference_model) == {"n_params"} else inp.reference_model
    return model_shape(cfg, inp.reference_model.get("n_params") if cfg is None else None)


# DeepSpeed 0.19.8 runtime/zero/config.py: ``param_persistence_threshold`` Field(pp_int(1e5))
DS_DEFAULT_PERSISTENCE_THRESHOLD = 100_000
_HF_AUTO_PERSISTENCE = "zero_optimization.stage3_param_persistence_threshold"


def reference_persistence_threshold(inp: EstimateInputs) -> int:
    """ZeRO-3 persistence threshold of the reference model's engine. TRL 1.16's
    ``prepare_deepspeed`` (trl/models/utils.py, called in ``DPOTrainer.__init__``) deep-copies the
    accelerate plugin's config before the HF Trainer resolves its hidden-size "auto" values
    (``trainer_config_finalize``, in ``train()``), and its overrides are top-level dotted keys
    (``"zero_optimization.stage3_param_persistence_threshold"``) DeepSpeed never reads; DeepSpeed's
    config model drops "auto" (runtime/config_utils.py), so an "auto" threshold becomes its default
    of 100,000 elements for the reference, while the policy gets HF's 10 * hidden. A recorded run
    says it (``inp.reference_persistence_threshold``); otherwise "auto" in the config -> 100,000,
    an explicit value -> that value."""
    if inp.reference_persistence_threshold is not None:
        return inp.reference_persistence_threshold
    if _HF_AUTO_PERSISTENCE in inp.auto_values:
        return DS_DEFAULT_PERSISTENCE_THRESHOLD
    return inp.zero.param_persistence_threshold


def reference_model_bytes(inp: EstimateInputs) -> int:
    """A frozen reference model's bytes on one rank (DPO; TRL 1.16 trl/models/utils.py
    ``prepare_deepspeed``: a second engine, ZeRO-3 when the policy's is, else stage 0 with
    ``bf16``/``fp16`` as the policy's). Frozen, so no gradient, fp32 master or optimizer state
    (is_optimized_parameter): its parameters in the compute dtype, whole at ZeRO 0-2; at ZeRO-3
    each one's partition plus the persistent ones gathered (partition_parameters.py), with the
    reference engine's own threshold (:func:`reference_persistence_threshold`). That engine has no
    optimizer, so nothing ever calls ``partition_all_parameters`` on it: a persistent parameter its
    first forward with a complete trace gathers stays gathered for the run (the steady state from
    the second micro-step on); the non-persistent ones are gathered and released inside its own
    forward, between the policy's phases. Its fp32 module buffers (rotary inv_freq) like the policy's."""
    ref = reference_shape(inp)
    if ref is None:
        return 0
    e = ELEMENT_SIZE[inp.precision]
    if inp.zero_stage == 3:
        n = inp.world_size
        threshold = min(reference_persistence_threshold(inp), inp.zero.model_persistence_threshold)
        numel = ref.stage3_partition_numel(n) + ref.persistent_gathered_numel(threshold, n)
    else:
        numel = ref.n_params
    return e * numel + _buffer_bytes(ref)


def _rank_estimate(
    inp: EstimateInputs, shape: ModelShape, rank: int, acts: Activations | None
) -> tuple[RankEstimate, StateLayout]:
    lay = model_state_layout(inp, shape, rank, inp.device_type)
    rest = _rest_with_loop(lay, inp, acts)
    rest["device"][Category.PARAMS.value] += _buffer_bytes(shape)  # llama helper: module buffers
    rest["device"][Category.PARAMS.value] += reference_model_bytes(inp)
    phases = {
        ph: max((_with_extra(rest, c) for c in cands), key=lambda b: breakdown_total(b, "device"))
        for ph, cands in _phase_extras(lay, acts, inp.activation_checkpointing).items()
    }
    return RankEstimate(rank, rest, phases), lay


def _activations(inputs: EstimateInputs, shape: ModelShape) -> Activations | None:
    if not shape.has_transformer_shape:
        return None
    seq = inputs.seq_len or shape.n_positions
    if seq > shape.n_positions:
        raise MemprofError(f"sequence length {seq} exceeds the model's {shape.family.positions_field} "
                           f"({shape.n_positions}): use --seq-len {shape.n_positions} or less")
    rows = model_rows(inputs)
    acts = model_activations(shape, ActivationQuery(rows, seq, ELEMENT_SIZE[inputs.precision],
                                                    inputs.attn_implementation, inputs.activation_checkpointing,
                                                    inputs.device_type, shape.lora_query,
                                                    _fused_head(inputs, shape, rows, seq),
                                                    checkpoint_reentrant(inputs)))
    if acts is None or inputs.loss_implementation != "trl_dpo":
        return acts
    return _with_reference_forward(inputs, shape, acts, rows, seq)


def model_rows(inputs: EstimateInputs) -> int:
    """Rows one micro-batch puts through the model: ``micro_batch``, or DPO's chosen and rejected
    row per pair (trainer_terms.dpo_rows)."""
    return dpo_rows(inputs.micro_batch) if inputs.loss_implementation == "trl_dpo" else inputs.micro_batch


def checkpoint_reentrant(inputs: EstimateInputs) -> bool:
    """Whether checkpointing is the reentrant kind: as stated (a run's gradient_checkpointing_kwargs),
    else TRL's DPOTrainer rule (trl/trainer/dpo_trainer.py ``__init__``: PEFT + DeepSpeed ZeRO-3 +
    gradient checkpointing forces ``use_reentrant=True``); otherwise the non-reentrant checkpoint
    (transformers 5's default, memprof's launcher)."""
    if not inputs.activation_checkpointing:
        return False
    if inputs.checkpoint_reentrant is not None:
        return inputs.checkpoint_reentrant
    return inputs.loss_implementation == "trl_dpo" and inputs.peft is not None and inputs.zero_stage == 3


def dpo_reference_forward(inputs: EstimateInputs, shape: ModelShape) -> ReferenceForward | None:
    """DPO's reference forward (trainer_terms.reference_forward_bytes), or None where a training
    step runs none (``precompute_ref_log_probs``, or no reference: neither a model nor PEFT) or its
    model has no layer shapes."""
    if inputs.loss_implementation != "trl_dpo" or inputs.precompute_ref_log_probs or not shape.has_transformer_shape:
        return None
    peft_reference = inputs.reference_model is None and inputs.peft is not None
    ref = shape if peft_reference else reference_shape(inputs)
    if ref is None:
        return None
    seq = inputs.seq_len or shape.n_positions
    return trainer_dpo_reference_forward(model_rows(inputs), seq, ref, e=ELEMENT_SIZE[inputs.precision],
                                         peft_reference=peft_reference, triton=inputs.device_type == "cuda")


def _with_reference_forward(inputs: EstimateInputs, shape: ModelShape, acts: Activations, rows: int,
                            seq: int) -> Activations:
    """The policy's activations with DPO's reference forward as a forward moment: what the policy
    holds once its forward returned (its saved tensors, the loop's batch and loss) beside the
    reference forward's widest moment (trainer_terms)."""
    ref = dpo_reference_forward(inputs, shape)
    if ref is None:
        return acts
    at_reference = acts.saved + acts.loop_held + ref.nbytes
    note = (f"DPO reference forward (no_grad, {rows} rows x seq {seq}): its widest moment, the "
            f"{'fused head' if ref.moment == 'head' else 'last layer SwiGLU'}, {ref.nbytes:,} bytes beside what the "
            f"policy holds after its forward ({at_reference:,} in all against the policy's own forward peak of "
            f"{acts.forward_peak:,}); it runs outside the policy engine's forward, where MemprofCallback's forward "
            "phase ends, so a measurement does not see it")
    return replace(acts, forward_peak=max(acts.forward_peak, at_reference), notes=(*acts.notes, note))


def _fused_head(inputs: EstimateInputs, shape: ModelShape, rows: int, seq: int) -> FusedHeadBytes | None:
    """TRL's fused LM head over the micro-batch's shifted positions (trainer_terms; Triton's
    kernels on CUDA, the torch fallbacks elsewhere), or None for the HF loss."""
    if inputs.loss_implementation not in ("trl_fused_head", "trl_dpo"):
        return None
    triton = inputs.device_type == "cuda"
    e = ELEMENT_SIZE[inputs.precision]
    return trl_fused_head_bytes(scored_positions(rows, seq, triton=triton), shape.hidden, shape.vocab,
                                compute_bytes=e, hidden_bytes=e, triton=triton)


def _why_no_activations(shape: ModelShape) -> str:
    if shape.model_type is None:
        return "activations not estimated for a bare parameter count (--params)"
    return f"activations not estimated for model_type {shape.model_type}"


def activations_not_estimated(inputs: EstimateInputs, shape: ModelShape) -> str | None:
    """Why an estimate of ``inputs`` holds no activations (the planner asks before sweeping), or
    None when it estimates them; ``estimate(inputs).activations_not_estimated`` is the same."""
    if inputs.layout == "zero-paper":
        return PAPER_LAYOUT_HAS_NO_ACTIVATIONS
    return None if _activations(inputs, shape) is not None else _why_no_activations(shape)


ALL_RANKS_UP_TO = 64  # stage 1/2: every rank is modelled up to this world size (estimate())
PLANNER_ALL_RANKS_UP_TO = 4  # the planner's fast path: the deciding ranks only beyond this


def _ranks_to_model(inputs: EstimateInputs, shape: ModelShape, all_ranks_up_to: int = ALL_RANKS_UP_TO) -> list[int]:
    """The ranks whose layout is computed. Stage 0 and 3 ranks are alike except for the last
    one's padding. At stage 1/2 each rank's gradient bookkeeping depends on which parameters touch
    its partition (layout.partition.stage12_rank_grads), so every rank is modelled up to
    ``all_ranks_up_to``; beyond, rank 0, the last and the ranks holding the most gradient elements
    and the largest single piece (the step moments' two rank-dependent terms)."""
    n = inputs.world_size
    if inputs.zero_stage not in (1, 2):
        return sorted({0, n - 1})
    if n <= all_ranks_up_to:
        return list(range(n))
    return list(_deciding_stage12_ranks(shape.trainable.param_numels, n))


@functools.lru_cache(maxsize=1024)
def _deciding_stage12_ranks(param_numels: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Rank 0, the last, and the ranks with the most held gradient and the largest single piece.
    Memoised per (model, world size): a plan sweep asks for the same pair hundreds of times."""
    shape = ModelShape(param_numels=param_numels)
    grads = [stage12_rank_grads(shape, n, r) for r in range(n)]
    most_held = max(range(n), key=lambda r: grads[r].held)
    largest_piece = max(range(n), key=lambda r: grads[r].largest_piece)
    return tuple(sorted({0, n - 1, most_held, largest_piece}))


def peak_device_bytes(inputs: EstimateInputs) -> int:
    """Max over ranks and phases of the device total: ``estimate(inputs).peak_device_bytes``
    without building breakdowns or assumptions (the planner's inner loop). Beyond
    ``PLANNER_ALL_RANKS_UP_TO`` ranks at stage 1/2 it models only the deciding ranks (see
    _ranks_to_model), so it can differ from estimate() by one gradient piece there."""
    return peak_device_and_host_bytes(inputs)[0]


def peak_device_and_host_bytes(inputs: EstimateInputs) -> tuple[int, int]:
    """(``peak_device_bytes``, the largest host bytes of one rank: ``Estimate.host_bytes_per_rank``)."""
    shape = shape_of(inputs)
    acts = _activations(inputs, shape)
    best = host = 0
    for r in _ranks_to_model(inputs, shape, PLANNER_ALL_RANKS_UP_TO):
        lay = model_state_layout(inputs, shape, r, inputs.device_type)
        rest = (sum(lay.rest["device"].values()) + _loop_activations(inputs, acts) + _device_other(inputs)
                + _buffer_bytes(shape))
        for cands in _phase_extras(lay, acts, inputs.activation_checkpointing).values():
            best = max(best, rest + max(sum(c.values()) for c in cands))
        host = max(host, sum(lay.rest["host"].values()))
    return best, host


def estimate(inputs: EstimateInputs) -> Estimate:
    """Per-rank memory of training ``inputs``' model with its engine (``inputs.engine``), by category and phase."""
    shape = shape_of(inputs)
    if inputs.layout == "zero-paper":
        return paper_estimate(inputs, shape)
    assumptions: list[str] = []
    acts = _activations(inputs, shape)
    if acts is not None:
        seq = inputs.seq_len or shape.n_positions
        assumptions.append(
            f"activations of {shape.family.causal_lm_class(shape.model_type)}, {inputs.attn_implementation} attention, "
            f"micro-batch {inputs.micro_batch}"
            f"{f' pairs = {model_rows(inputs)} rows' if inputs.loss_implementation == 'trl_dpo' else ''} x "
            f"seq {seq}, {'with' if inputs.activation_checkpointing else 'without'} activation checkpointing, "
            f"train mode ({shape.family.train_mode}), "
            f"{inputs.device_type} kernels: {acts.formula}"
        )
        assumptions.append("the training loop (memprof.train) keeps only the loss and its input batch between forward and "
                           "the next step; the model output (logits, KV cache) is dropped when forward returns")
        assumptions += acts.notes  # what the family's formula leaves out
    else:
        assumptions.append(f"{_why_no_activations(shape)}: the peaks hold model states only, so whether it fits is unknown")

    ranks, layout_notes = _model_ranks(inputs, shape, acts)
    assumptions += _frozen_assumptions(inputs, shape)
    assumptions += quantization_assumptions(inputs, shape)
    assumptions += _trainer_assumptions(inputs)
    assumptions += _in_layer_assumptions(inputs, shape, acts)
    assumptions += layout_notes
    assumptions += _setup_assumptions(inputs)
    assumptions += _memory_kind_assumptions(inputs)
    assumptions += list(inputs.config_notes)  # what reading the DeepSpeed config decided (memprof.dsconfig)
    est = Estimate(inputs, shape, ranks, acts, assumptions,
                   activations_not_estimated=None if acts is not None else _why_no_activations(shape))
    est.overhead = overhead(inputs, shape)
    est.paper_comparison = _paper_comparison(inputs, shape, ranks)
    return est


def _model_ranks(inputs: EstimateInputs, shape: ModelShape, acts: Activations | None) -> tuple[list[RankEstimate], list[str]]:
    """Each modelled rank's estimate (``_ranks_to_model``), and the layout notes of the last one
    (the notes name the code path and its settings, which every rank shares)."""
    ranks: list[RankEstimate] = []
    notes: list[str] = []
    for r in _ranks_to_model(inputs, shape):
        rank_est, lay = _rank_estimate(inputs, shape, r, acts)
        ranks.append(rank_est)
        notes = lay.notes
    return ranks, notes


def _reference_words(inputs: EstimateInputs) -> str:
    if inputs.zero_stage != 3:
        return "whole: TRL prepares it at ZeRO-0"
    return (f"partitioned, ZeRO-3, its own engine's persistence threshold {reference_persistence_threshold(inputs):,} "
            "elements: persistent parameters stay gathered from its first forward on, nothing releases them")


def _in_layer_assumptions(inputs: EstimateInputs, shape: ModelShape, acts: Activations | None) -> list[str]:
    """ZeRO-3's prefetch buffers inside forward, where the estimate pairs them with an in-layer moment."""
    if acts is None or not acts.forward_in_layer or inputs.zero_stage != 3 or inputs.world_size == 1:
        return []
    z = inputs.zero
    thr = min(z.param_persistence_threshold, z.model_persistence_threshold)
    r = shape.stage3_forward(thr, z.max_reuse_distance, z.prefetch_bucket_size, z.max_live_parameters, inputs.world_size)
    if r is None or r.peak_buffers == 0:
        return []
    return [f"stage 3 inside forward: at most {r.peak_gathered:,} elements gathered beside {r.peak_buffers:,} of "
            "all-gather buffers (comm_buffers) at one module's fetch: a prefetched group is held twice, its flat "
            "all-gather buffer and each parameter's torch.cat copy, until its last parameter's module fetches it "
            "(memprof.estimate.stage3_replay); counted beside the last layer's widest activation moment, an upper bound"]


def _trainer_assumptions(inputs: EstimateInputs) -> list[str]:
    """What the reference model and TRL's loss add (memprof.estimate.trainer_terms)."""
    out: list[str] = []
    if inputs.reference_model is not None:
        out.append(
            f"reference model (DPO): {reference_model_bytes(inputs):,} bytes of frozen parameters per rank in "
            f"{inputs.precision} ({_reference_words(inputs)}), no gradient, master or optimizer state; its forward "
            "(under no_grad) adds no saved activations")
    if inputs.loss_implementation == "trl_fused_head":
        out.append(
            "loss: TRL's add_fused_lm_head (trl/trainer/utils.py, ChunkedLogProbFunction): no B*S*V logits; the "
            "shifted hidden copy saved, a 4096 x 32768 chunk buffer and its tiles at the loss and in its backward "
            "over SFT's B*(S-1) positions (memprof.estimate.trainer_terms)")
    if inputs.loss_implementation == "trl_dpo":
        ref = ("none in a training step (precompute_ref_log_probs)" if inputs.precompute_ref_log_probs else
               "the reference model's" if inputs.reference_model is not None else
               "the policy with its adapters disabled (PEFT, no ref_model)" if inputs.peft is not None else
               "none modelled (no reference model given: TRL would load one, pass --reference-model)")
        out.append(
            f"loss: TRL's DPOTrainer (trl/trainer/dpo_trainer.py): micro-batch {inputs.micro_batch} preference pairs = "
            f"{model_rows(inputs)} rows (chosen, then rejected, padded to seq) through the policy, TRL's "
            "add_fused_lm_head over their shifted positions (memprof.estimate.trainer_terms); reference forward: "
            f"{ref}; DPO's loss over per-sequence sums adds nothing measurable")
    if inputs.activation_checkpointing and checkpoint_reentrant(inputs):
        out.append("gradient checkpointing: reentrant (torch.utils.checkpoint CheckpointFunction"
                   + ("; TRL forces use_reentrant=True with PEFT + ZeRO-3" if inputs.checkpoint_reentrant is None else "")
                   + "): after backward the loss also keeps each layer's kwargs and, on CPU, its stashed RNG state")
    return out


def _frozen_assumptions(inputs: EstimateInputs, shape: ModelShape) -> list[str]:
    """What the adapters make trainable and how DeepSpeed holds the frozen rest."""
    if shape.trainable_mask is None or inputs.peft is None:
        return []
    where = ("partitioned and gathered like every parameter (ZeRO-3), with no gradient, fp32 master or optimizer "
             "state" if inputs.zero_stage == 3 else
             "whole on every rank in the compute dtype, outside DeepSpeed's flat groups (no gradient, fp32 master, "
             "optimizer state or bucket space)")
    cast = (f"adapters cast to {inputs.precision} with the model by DeepSpeed's engine (_configure_distributed_model "
            "casts every parameter; PEFT's fp32 autocast of the adapters does not survive it)")
    frozen = f"frozen parameters {where} (DeepSpeed 0.19.8: optimizers keep is_optimized_parameter ones only)"
    if inputs.engine == "fsdp2":  # FSDP2 casts nothing (layout/fsdp2.py holds its frozen-parameter rule)
        cast = (f"adapters in the model's {inputs.precision} (PEFT's fp32 autocast of a 16-bit model's adapters, "
                "autocast_adapter_dtype, is not modelled)")
        frozen = ("frozen parameters sharded and gathered like every parameter (FSDP2), with no gradient, reduce-scatter "
                  "space or optimizer state (the script's optimizer over the trainable parameters)")
    return [
        f"{inputs.peft.describe()}: {shape.trainable.n_params:,} trainable parameters in {shape.trainable.n_tensors} "
        f"tensors, {shape.frozen_numel:,} frozen; {cast}",
        frozen,
        ("activations with LoRA: derived from PEFT's lora.Linear.forward and autograd's saved tensors with frozen "
         "weights (frozen Linears save no input, frozen norms no normalised copy, adapters their input and B*S*r "
         "intermediate, lora_dropout a copy and mask per target; nothing before the first adapter without "
         "checkpointing; enable_input_require_grads with it); the backward moments after the first adapter "
         "gradient are approximate" if shape.lora_query is not None else
         "activations with LoRA: the full fine-tuning formula (trainable biases, modules_to_save or adapters outside "
         "the decoder layers are not modelled in the activation terms: an upper bound)"),
    ]


def _setup_assumptions(inputs: EstimateInputs) -> list[str]:
    """The layout, optimizer, accumulation, buckets and which ranks were modelled."""
    spec = OPTIMIZER_SPECS[inputs.optimizer]
    return [
        describe_layout(inputs),
        f"optimizer {spec.torch_class}: {spec.note}; peaks are for the steady state (step 2 on), when the "
        + ("state already exists (Adagrad creates it in its constructor)" if not spec.lazy
           else "lazily created state already exists (step 1's step phase allocates it)"),
        (f"gradient_accumulation_steps {inputs.gradient_accumulation_steps}: phase peaks are the worst micro-step of a "
         "steady cycle (the boundary, or a non-boundary step phase), 'at rest' is after the boundary's optimizer step"
         if inputs.gradient_accumulation_steps > 1 else "gradient_accumulation_steps 1: every micro-step is a boundary"),
        describe_buckets(inputs),
        describe_modelled_ranks(inputs) or
        ("ranks other than the first and the last hold the same as the first (only the last rank's partition carries padding)"
         if inputs.zero_stage not in (1, 2) else
         "every rank modelled (stage 1/2: the gradients a rank holds depend on the parameters touching its partition)"
         if inputs.world_size <= ALL_RANKS_UP_TO else
         "modelled: rank 0, the last rank and the ranks holding the most gradient elements; the others hold no more"),
    ]


def _memory_kind_assumptions(inputs: EstimateInputs) -> list[str]:
    """What 'host' (under offload) and 'device' (a CPU, or a CUDA GPU's 'other') hold."""
    assumptions: list[str] = []
    if inputs.zero.offload_optimizer != "none" or inputs.zero.offload_param != "none":
        assumptions.append(
            "host bytes: the offloaded states and DeepSpeed's host buffers, per rank and x ranks per node "
            + (f"({inputs.world_size // inputs.nodes})" if inputs.nodes else "")
            + "; pinned buffers (offload pin_memory, on by default) on CUDA rounded up to a power of two by "
            "PyTorch's host allocator (not measured on a GPU); the processes' own RSS (Python, torch, CUDA context) is not included"
        )
    if inputs.device_type == "cpu":
        assumptions.append("device_type cpu: 'device' is the CPU memory used for compute, not a GPU")
    else:
        cap = inputs.cuda_capability or ASSUMED_CAPABILITY
        assumptions.append(
            f"CUDA compute capability {cap}"
            + ("" if inputs.cuda_capability else " assumed (H100; pass --cuda-capability for another GPU)")
            + f": 'other' holds PyTorch's cached cuBLAS workspaces, 2 x {cublas_workspace_bytes(cap):,} bytes "
            f"(forward and autograd threads) + cuBLASLt {'2 x ' if inputs.activation_checkpointing else ''}1 MiB, "
            "at the default CUBLAS_WORKSPACE_CONFIG / CUBLASLT_WORKSPACE_SIZE; the training script's data set stays "
            "on the host; caching-allocator rounding (< 1 MiB per block) is not modelled"
        )
    return assumptions


def _paper_comparison(inputs: EstimateInputs, shape: ModelShape, ranks: list[RankEstimate]) -> dict[str, Any]:
    """The ZeRO paper's model-state bytes beside this layout's largest (``Estimate.paper_comparison``)."""
    return paper_model_states(inputs, shape.n_params) | {
        "deepspeed_model_states_bytes": max(
            sum(r.rest["device"][c] for c in ("params", "master_params", "grads", "optimizer_state"))
            for r in ranks
        ),
    }
