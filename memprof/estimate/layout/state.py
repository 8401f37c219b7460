"""What every engine's layout writes (``StateLayout``) and reads (``LayoutSetup``), and the rules
that hold whatever the engine: the torch optimizer's step temporaries and what gradient
accumulation keeps alive between micro-steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from memprof.categories import Category
from memprof.dsconfig import ELEMENT_SIZE  # bytes per element, defined once (memprof.dsconfig)
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import ModelShape
from memprof.estimate.optimizers import (
    keeps_step_tensors,
    single_tensor_temporaries,
    temporary_outlives_its_tensor,
)
from memprof.families.common import Activations

FP32 = 4

P, M, G, O, C = (Category.PARAMS.value, Category.MASTER_PARAMS.value, Category.GRADS.value,
                 Category.OPTIMIZER_STATE.value, Category.COMM_BUFFERS.value)


@dataclass
class StateLayout:
    """Model states of one rank: at rest by location, and what each phase adds on the device."""

    rest: dict[str, dict[str, int]] = field(default_factory=lambda: {"device": {}, "host": {}})
    # extra model-state bytes alive at each phase's peak, beyond ``rest`` (device only)
    forward_extra: dict[str, int] = field(default_factory=dict)
    # a second forward moment inside the last block, beside the activations saved so far
    # (Activations.saved; under checkpointing its forward_peak): FSDP2's last block, gathered with
    # its flat all-gather output; empty where the engine has none (DeepSpeed, DDP)
    forward_last_block_extra: dict[str, int] = field(default_factory=dict)
    # FSDP2, under checkpointing: the last block's all-gather copy-out, beside every earlier block's
    # checkpointed input and the last block's input (L x Activations.block_kept): two flat
    # all-gather outputs alive (the previous block's, kept in comm_ctx.all_gather_state, and this
    # one's); empty where the engine has none
    forward_copy_out_extra: dict[str, int] = field(default_factory=dict)
    forward_copy_out_blocks: int = 0  # L: the blocks whose checkpointed inputs exist at that copy-out
    # a forward moment inside the last layer beside the family's in-layer activation moment
    # (Activations.forward_in_layer): ZeRO-3's most gathered parameters and all-gather buffers at
    # any module's fetch (memprof.estimate.stage3_replay); empty where not modelled
    forward_in_layer_extra: dict[str, int] = field(default_factory=dict)
    # ZeRO-3: beyond ``rest`` from a module's fetch (by its position in ModelShape.module_order) to
    # the next one's: the gathered parameters and all-gather buffers the replay
    # (memprof.estimate.stage3_replay, Stage3Forward.after) finds then, paired with
    # Activations.forward_in_blocks; None where not modelled
    forward_at_fetch: Callable[[int], dict[str, int]] | None = None
    # a forward moment after the model's forward returned (without checkpointing), beside
    # ``forward_extra``: its activation bytes from the family's Activations. torch DDP's _DDPSink
    # clones of the outputs (layout/ddp.py); None where the engine has none
    forward_after_model: Callable[[Activations], int] | None = None
    # backward's start (the loss gradients beside every saved activation), where it differs from
    # ``forward_extra`` (FSDP2: the root's post-forward freed the last all-gather output); None:
    # the same as forward_extra (DeepSpeed, DDP)
    backward_start_extra: dict[str, int] | None = None
    backward_extra: dict[str, int] = field(default_factory=dict)
    backward_end_extra: dict[str, int] = field(default_factory=dict)  # at the end of backward
    # Engines that keep every param.grad through backward (DeepSpeed ZeRO-0, ZeRO-1 without
    # overlap_comm): beyond ``rest`` at each block's backward, beside the gradients already
    # produced (``backward_blocks_grad_size`` bytes per element of Activations.later_grad_elements
    # and of the block's own finished ones) and the block's activations (Activations.block_moments,
    # less the blocks already done: Activations.block_kept each); None: not modelled block by block
    backward_blocks_extra: dict[str, int] | None = None
    # ZeRO-3: beyond ``rest`` once the head's backward ran (its parameters released, its gradient
    # reduced into the bucket), paired with Activations.backward_head_split's last level; None: not modelled
    backward_after_head_extra: dict[str, int] | None = None
    backward_blocks_grad_size: int = 0
    # ZeRO-2 (gradients reduced at their hooks): beyond ``rest`` at a block's backward moment once
    # the hooks of gradients of ``fired`` elements ran (Activations.later_grad_elements[i] + the
    # moment's own elements), as that reduction state leaves it: ``grads_in_partition`` if a
    # reduction has reached this rank's partition, an oversized gradient waiting outside the bucket,
    # the bucket (deepspeed_zero._stage2_hook_states); None for a count no hook boundary reaches, or
    # not modelled
    backward_blocks_after: Callable[[int], dict[str, int] | None] | None = None
    # ZeRO-2 with tied embeddings: beyond ``rest`` (activations included) when autograd sums the
    # tied weight's two gradient shares, after every other hook (deepspeed_zero._stage2_tied_sum);
    # empty where not modelled
    backward_tied_sum_extra: dict[str, int] = field(default_factory=dict)
    # FSDP2 (gradients held unsharded per block until its post-backward reduce-scatter): beyond
    # ``rest`` at block i's in-block backward moments (Activations.block_moments), as
    # ``backward_block_state(done, own)``: ``done`` = L-1-i blocks whose backward and reduce-scatter
    # already ran, ``own`` elements of block i's own parameters with a .grad by then; ``own`` None:
    # block i's post-backward reduce (all its gradients formed), beside its last in-block moment's
    # activations. The activations are the last block's moment less done x Activations.block_kept
    # (core._block_moments takes the largest over done = 0 .. backward_block_count - 1); None: not modelled
    backward_block_state: Callable[[int, int | None], dict[str, int]] | None = None
    backward_block_count: int = 0
    # beyond ``rest`` once the last block's MLP-output gradient hooks have fired (beside
    # Activations.after_mlp_out_hooks); empty where not modelled (deepspeed_zero._stage2_after_mlp_out_hooks)
    backward_after_mlp_out_hooks_extra: dict[str, int] = field(default_factory=dict)
    # beyond ``rest`` at two later hooks of that block (beside Activations.mlp_out_weight_hook /
    # mlp_in_bias_hook); empty where not modelled (deepspeed_zero._stage2_offload_hooks)
    backward_mlp_out_weight_hook_extra: dict[str, int] = field(default_factory=dict)
    backward_mlp_in_bias_hook_extra: dict[str, int] = field(default_factory=dict)
    # candidate moments of the step phase, each as device bytes beyond ``rest`` (may be negative:
    # ZeRO-3 releases the gathered persistent params for the step); the phase peak is the largest
    step_moments: list[dict[str, int]] = field(default_factory=list)
    # gradient accumulation (gradient_accumulation_steps > 1): device bytes beyond ``rest`` alive
    # from a non-boundary micro-step's backward to the boundary's reduction
    # (see accumulate_between_microsteps)
    between_microsteps: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, where: str, category: str, nbytes: int) -> None:
        self.rest[where][category] = self.rest[where].get(category, 0) + int(nbytes)


@dataclass(frozen=True)
class LayoutSetup:
    """What every layout function reads: the inputs and the model, resolved once."""

    inp: EstimateInputs
    shape: ModelShape
    rank: int
    device_type: str
    e: int  # bytes per element of the model dtype
    N: int  # world size
    total: int  # parameters
    largest: int  # largest parameter tensor (0 for a bare parameter count: unknown)
    step_tensors: bool  # the optimizer keeps a 4-byte step tensor per optimized tensor

    @property
    def numels(self) -> tuple[int, ...]:
        """The trainable parameters' numels, in parameters() order: what every optimizer, gradient
        and bucket is sized by (all of them in full fine-tuning)."""
        return self.trainable.param_numels

    @property
    def trainable(self) -> ModelShape:
        """The parameters that train (``ModelShape.trainable``; the shape itself in full fine-tuning)."""
        return self.shape.trainable

    @property
    def t_total(self) -> int:
        """Trainable parameters (``total`` in full fine-tuning)."""
        return self.trainable.n_params

    @property
    def t_largest(self) -> int:
        """Largest trainable tensor (``largest`` in full fine-tuning)."""
        return self.trainable.largest_param if self.shape.trainable_mask is not None else self.largest

    @property
    def frozen(self) -> int:
        """Elements of the frozen parameters (0 in full fine-tuning)."""
        return self.shape.frozen_numel

    @property
    def frozen_bytes(self) -> int:
        """Bytes of the frozen parameters held whole (``frozen * e``; a 4-bit base's packed
        weights at their quant_storage size: ModelShape.frozen_bytes)."""
        return self.shape.frozen_bytes(self.e)


@dataclass(frozen=True)
class EngineLayout:
    """One engine's entry in ``memprof.estimate.layout.LAYOUT_BY_ENGINE``."""

    lay_out: Callable[[LayoutSetup, StateLayout], None]  # fills one rank's StateLayout
    # the estimate's assumptions naming the layout, and the gradient buckets it was given
    layout_assumption: Callable[[EstimateInputs], str]
    buckets_assumption: Callable[[EstimateInputs], str]
    # the assumption saying which ranks were modelled and why the others hold no more; None: the
    # DeepSpeed wording (core._setup_assumptions: the last rank's padding, or stage 1/2's partitions)
    ranks_assumption: Callable[[EstimateInputs], str] | None = None


def layout_setup(inp: EstimateInputs, shape: ModelShape, rank: int, device_type: str) -> LayoutSetup:
    """The inputs and the model, resolved once for one rank's layout."""
    return LayoutSetup(
        inp, shape, rank, device_type, e=ELEMENT_SIZE[inp.precision], N=inp.world_size, total=shape.n_params,
        # a bare parameter count has no per-tensor shapes: the largest tensor (stage-3 gather unit,
        # offload staging buffers) is unknown and taken as 0, and said so
        largest=shape.largest_param if shape.n_tensors > 1 else 0,
        step_tensors=keeps_step_tensors(inp.optimizer, inp.torch_adam),
    )


def optimizer_temporaries(
    inp: EstimateInputs, tensor_numels_largest: int, total_numel: int, device_type: str,
    tensor_numels: Sequence[int] | None = None,
) -> int:
    """Bytes of the torch optimizer's temporaries at their peak inside ``step()`` (fp32 state).

    CPU tensors take the single-tensor loop: ``k`` temporaries the size of one tensor at a time,
    so the largest tensor counts (under ZeRO the inner optimizer holds one flat partition). Where
    the loop's result outlives its tensor (optimizers.temporary_outlives_its_tensor) and the
    optimizer steps several tensors (``tensor_numels``, in the optimizer's order), the previous
    tensor's temporary is alive too: max over i of numel[i-1] + k * numel[i]. CUDA tensors take
    foreach (``_multi_tensor_adam``: ``_foreach_sqrt`` over the whole list, divided and shifted in
    place): one temporary the size of everything the optimizer steps at once.
    DeepSpeed's FusedAdam / CPUAdam: none (see optimizers.single_tensor_temporaries).
    """
    k = single_tensor_temporaries(inp.optimizer, inp.torch_adam)
    if device_type != "cpu":
        return (1 if k else 0) * total_numel * FP32
    peak = k * tensor_numels_largest
    if tensor_numels and temporary_outlives_its_tensor(inp.optimizer, inp.torch_adam):
        peak = max([peak] + [prev + k * cur for prev, cur in zip(tensor_numels, tensor_numels[1:])])
    return peak * FP32


def plus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """``a + b`` by category."""
    out = dict(a)
    for cat, n in b.items():
        out[cat] = out.get(cat, 0) + n
    return out


def accumulate_between_microsteps(s: LayoutSetup, out: StateLayout, between: dict[str, int],
                                  same_at_hook: tuple[str, ...] = (), same_at_end: tuple[str, ...] = (),
                                  how: str = "") -> None:
    """Gradient accumulation (``gradient_accumulation_steps`` k > 1): the engine calls the
    optimizer's reduction / epilogue and ``step()`` only at the boundary (DeepSpeed:
    ``engine.is_gradient_accumulation_boundary``, every k-th micro-step), so what a non-boundary
    micro-step's backward leaves behind (``between``: device bytes beyond ``rest``) is alive
    through the next micro-step's forward and backward. The worst micro-step of a steady cycle is
    the last one (the boundary): its forward and backward start carry ``between``; its first
    gradient hook and backward's end carry it too, except the categories named in
    ``same_at_hook`` / ``same_at_end``, whose storage is the one already counted there (e.g.
    ``param.grad``, which autograd's AccumulateGrad adds into in place). A non-boundary
    micro-step's step phase holds ``rest + between`` (engine.step does nothing else there)."""
    if s.inp.gradient_accumulation_steps <= 1:
        return
    between = {cat: n for cat, n in between.items() if n}
    out.between_microsteps = between
    out.forward_extra = plus(out.forward_extra, between)
    if out.forward_last_block_extra:
        out.forward_last_block_extra = plus(out.forward_last_block_extra, between)
    if out.forward_copy_out_extra:
        out.forward_copy_out_extra = plus(out.forward_copy_out_extra, between)
    if out.forward_in_layer_extra:
        out.forward_in_layer_extra = plus(out.forward_in_layer_extra, between)
    if out.forward_at_fetch is not None and between:
        at_fetch = out.forward_at_fetch
        out.forward_at_fetch = lambda pos: plus(at_fetch(pos), between)
    if out.backward_start_extra is not None:
        out.backward_start_extra = plus(out.backward_start_extra, between)
    out.backward_extra = plus(out.backward_extra, {c: n for c, n in between.items() if c not in same_at_hook})
    out.backward_end_extra = plus(out.backward_end_extra, {c: n for c, n in between.items() if c not in same_at_end})
    if out.backward_after_head_extra is not None:
        out.backward_after_head_extra = plus(out.backward_after_head_extra, {c: n for c, n in between.items() if c not in same_at_hook})
    if out.backward_blocks_extra is not None:
        # every param.grad already exists from the earlier micro-steps (AccumulateGrad adds in place):
        # the block moments hold ``between`` whole, no gradient grows during the boundary's backward
        out.backward_blocks_extra = plus(out.backward_blocks_extra, {c: n for c, n in between.items() if c not in same_at_hook})
        if G in between:
            out.backward_blocks_grad_size = 0
    if out.backward_blocks_after is not None:
        at, kept = out.backward_blocks_after, {c: n for c, n in between.items() if c not in same_at_hook}

        def after(fired: int) -> dict[str, int] | None:
            m = at(fired)
            return None if m is None else plus(m, kept)

        if getattr(at, "most", None) is not None:  # the bound core._stage2_block_moment walks by
            after.most = at.most + sum(kept.values())  # type: ignore[attr-defined]
        out.backward_blocks_after = after
    for name in ("backward_after_mlp_out_hooks_extra", "backward_mlp_out_weight_hook_extra",
                 "backward_mlp_in_bias_hook_extra"):
        if getattr(out, name):
            setattr(out, name, plus(getattr(out, name), {c: n for c, n in between.items() if c not in same_at_hook}))
    out.step_moments = [*out.step_moments, dict(between)]
    out.notes.append(f"gradient accumulation over {s.inp.gradient_accumulation_steps} micro-steps: "
                     f"{how or 'nothing beyond the run-long state'} stays alive between micro-steps; "
                     "peaks are those of the cycle's boundary micro-step")
