"""Model states per rank as DeepSpeed 0.19.8's engine lays them out, ZeRO stage 0 to 3, and what
each phase adds.

Every term names the DeepSpeed attribute it stands for; ``docs/estimator.md`` gives the file and
function. All sizes are integer bytes for one rank (``rank`` matters only where partitions are
uneven: the last rank holds the padding, and a parameter straddling a partition boundary belongs to
both ranks' gradient bookkeeping).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from memprof.categories import Category
from memprof.dsconfig import ELEMENT_SIZE
from memprof.estimate.activations import GPT2_MLP_OUT_HOOKS
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.layout.partition import (
    Stage12Grads,
    stage12_partition,
    stage12_partition_param_numels,
    stage12_rank_grads,
)
from memprof.estimate.layout.state import (
    FP32,
    C,
    EngineLayout,
    G,
    LayoutSetup,
    M,
    O,
    P,
    StateLayout,
    accumulate_between_microsteps,
    optimizer_temporaries,
)
from memprof.estimate.model_shapes import ModelShape
from memprof.estimate.optimizers import OPTIMIZER_SPECS, optimizer_state_bytes, uses_deepspeed_adam

ACT = Category.ACTIVATIONS.value
FP64 = 8  # deepspeed.runtime.zero.utils.get_norm_dtype(): float64 wherever the accelerator has it (CPU, CUDA)


def deepspeed_zero_layout(s: LayoutSetup, out: StateLayout) -> None:
    """The model states of ``s.rank``: picks the DeepSpeed 0.19.8 code path that
    ``engine._configure_zero_optimizer`` / ``_configure_fp16_optimizer`` /
    ``_configure_bf16_optimizer`` would take for these settings, and lays it out."""
    inp, stage = s.inp, s.inp.zero_stage
    if stage == 0:
        _stage0(s, out)
    elif stage in (1, 2) and inp.zero.offload_optimizer == "cpu":
        _stage12_offload(s, out)
    elif stage == 1 and inp.precision == "bf16" and inp.grad_accum_dtype == "fp32":
        _bf16_optimizer(s, out)
    elif stage in (1, 2):
        _stage12(s, out)
    else:
        _stage3(s, out)


def describe_deepspeed_zero(inp: EstimateInputs) -> str:
    return (f"DeepSpeed 0.19.8 layout, one parameter group, ZeRO stage {inp.zero_stage}, world size "
            f"{inp.world_size}, {inp.precision}")


def describe_zero_buckets(inp: EstimateInputs) -> str:
    return (f"reduce_bucket_size {inp.zero.reduce_bucket_size:,} elements, overlap_comm "
            f"{inp.zero.overlap_comm_for(inp.zero_stage)}, contiguous_gradients {inp.zero.contiguous_gradients}")


def _host_bytes(s: LayoutSetup, nbytes: int, pinned: bool) -> int:
    """Host bytes of one DeepSpeed host allocation. ``get_accelerator().pin_memory`` on CUDA is
    ``tensor.pin_memory()``, served by PyTorch's CachingHostAllocator, which rounds every request
    up to the next power of two (torch/include/ATen/core/CachingHostAllocator.h ``allocate``:
    ``c10::llvm::PowerOf2Ceil(size)`` below ``pinned_max_round_threshold``, unlimited by default,
    c10/core/AllocatorConfig.h). The CPU accelerator's pin_memory page-locks nothing and rounds
    nothing. Not measured on a GPU."""
    if not pinned or s.device_type != "cuda" or nbytes <= 0:
        return nbytes
    return 1 << (nbytes - 1).bit_length()


def _stage2_after_mlp_out_hooks(s: LayoutSetup, n_hooks: int) -> tuple[bool, int]:
    """ZeRO-2 (contiguous_gradients) after the first ``n_hooks`` gradient hooks of backward, in
    reverse parameter order: (whether this rank's ``grads_in_partition`` is allocated by then,
    elements of an oversized gradient still waiting outside the bucket).

    stage_1_and_2.py (0.19.8): each hook (reduce_independent_p_g_buckets_and_remove_grads, :1414)
    first reduces the bucket when ``bucket.elements + param.numel() > reduce_bucket_size`` (:1422,
    reduce_ipg_grads :2205); the reduction calls copy_grads_in_partition (:2270) for every bucket
    param in this rank's partition, and its first call allocates ``grads_in_partition`` for every
    param touching the partition (:2187-2194). A param larger than the bucket is not copied into it
    (:1443, extra_large_param_to_reduce): its gradient stays a tensor of its own until the next
    hook reduces it. So with a bucket smaller than the params, the ranks owning the model's last
    params (in backward order, the first reduced) hold their whole gradient partition while the
    last block's activations are still alive; the others allocate it only deep in backward."""
    rbs = s.inp.zero.reduce_bucket_size
    cum, total = s.shape.prefix_sums, s.shape.prefix_sums[-1]
    _, part, _ = stage12_partition(s.shape, s.N, s.rank)
    start, end = part * s.rank, min(part * (s.rank + 1), total)

    def in_partition(i: int) -> bool:  # get_partition_info: the param overlaps [start, end)
        return cum[i] < end and cum[i + 1] > start

    elements, bucket, allocated, pending = 0, [], False, 0
    for i in list(reversed(range(len(s.numels))))[:n_hooks]:
        n = s.numels[i]
        if elements + n > rbs:
            allocated = allocated or any(in_partition(j) for j in bucket)
            elements, bucket, pending = 0, [], 0
        if n > rbs:
            pending = n
        bucket.append(i)
        elements += n
    return allocated, pending


def _backward_hook_order(shape: ModelShape) -> tuple[int, ...] | None:
    """The parameters' gradient hooks in the order backward runs them: the forward's modules
    (``ModelShape.fetch_modules``) reversed, each module's parameters reversed (a Linear's bias
    before its weight), a tied weight once, at its first module's place (the embedding: its
    AccumulateGrad runs when both shares are in). Traced with register_post_accumulate_grad_hook
    on llama-tiny and qwen2-tiny (exact; torch 2.13): lm_head, norm, then per layer down_proj,
    up_proj, gate_proj, post_attention_layernorm, o_proj, v_proj, k_proj, q_proj, input_layernorm,
    then embed_tokens; GPT-2 matches but for its LayerNorms (weight's hook before bias's). None
    where the family gives no module order."""
    if shape.fetch_modules is None:
        return None
    return _hook_order_of_modules(shape.fetch_modules, len(shape.param_numels))


@functools.lru_cache(maxsize=256)
def _hook_order_of_modules(fetch_modules: tuple[tuple[int, ...], ...], n_params: int) -> tuple[int, ...] | None:
    """:func:`_backward_hook_order` of one module list (cached: ``advise`` asks it of the same
    shape once per rank and change)."""
    order: list[int] = []
    for module in reversed(fetch_modules):
        order += reversed(module)
    last = {i: k for k, i in enumerate(order)}  # a tied weight: its last place in backward
    order = [i for k, i in enumerate(order) if last[i] == k]
    return tuple(order) if sorted(order) == list(range(n_params)) else None


@functools.lru_cache(maxsize=1024)
def _stage2_hook_states(numels: tuple[int, ...], mine: tuple[bool, ...], rbs: int) -> dict[int, tuple[bool, int]]:
    """ZeRO-2 (contiguous_gradients) hook by hook, ``numels`` / ``mine`` (the param touches this
    rank's partition) in backward's hook order: for each count of elements whose hooks have run,
    (whether ``grads_in_partition`` is allocated by then, elements of an oversized gradient waiting
    outside the bucket). stage_1_and_2.py (0.19.8) reduce_independent_p_g_buckets_and_remove_grads
    (:1414): a hook first reduces the bucket when ``bucket.elements + param.numel() >
    reduce_bucket_size`` (:1422); reduce_ipg_grads (:2205) then calls copy_grads_in_partition
    (:2270) for each reduced param in the partition, whose first call allocates
    ``grads_in_partition`` (:2184); the others' gradients are cleared (:2268). A param larger than
    the bucket keeps its own gradient (extra_large_param_to_reduce, :1446) until the next hook
    reduces it; a smaller one is copied into the bucket and its own storage freed (:1455)."""
    states, fired, elements, touched, allocated = {0: (False, 0)}, 0, 0, False, False
    for n, own in zip(numels, mine):
        if n == 0:
            continue  # :1417: no hook work
        if elements + n > rbs:
            allocated, elements, touched = allocated or touched, 0, False
        touched, elements, fired = touched or own, elements + n, fired + n
        states[fired] = (allocated, n if n > rbs else 0)
    return states


@functools.lru_cache(maxsize=1024)
def _stage2_states_in_order(order: tuple[int, ...], numels: tuple[int, ...], cum: tuple[int, ...], start: int, end: int,
                            rbs: int) -> dict[int, tuple[bool, int]]:
    """:func:`_stage2_hook_states` over the params in hook ``order``, each marked whether it
    touches this rank's partition [start, end) of the ``cum`` prefix sums (cached per rank)."""
    return _stage2_hook_states(tuple(numels[i] for i in order),
                               tuple(cum[i] < end and cum[i + 1] > start for i in order), rbs)


def _stage2_blocks_after(s: LayoutSetup, held: int, buckets: int) -> Callable[[int], dict[str, int] | None] | None:
    """``StateLayout.backward_blocks_after`` for ZeRO-2 on the device: at a block moment, this
    rank's ``grads_in_partition`` (``held`` bytes: every param touching the partition, :2187) once
    a reduction reached the partition, an oversized gradient waiting, and the bucket. No zero tail:
    the epilogue makes it (:2890). None where the hook order is not known, or some parameters are frozen."""
    order = None if s.frozen else _backward_hook_order(s.shape)
    if order is None:
        return None
    cum = s.shape.prefix_sums
    _, part, _ = stage12_partition(s.shape, s.N, s.rank)
    start, end = part * s.rank, min(part * (s.rank + 1), cum[-1])
    states = _stage2_states_in_order(order, s.numels, cum, start, end, s.inp.zero.reduce_bucket_size)

    def after(fired: int) -> dict[str, int] | None:
        found = states.get(fired)
        return None if found is None else {G: (held if found[0] else 0) + found[1] * s.e, C: buckets}

    # the most any hook state leaves (core._stage2_block_moment stops walking blocks below it)
    after.most = held + max((pending for _, pending in states.values()), default=0) * s.e + buckets  # type: ignore[attr-defined]
    return after


def _stage2_tied_sum(s: LayoutSetup, after: Callable[[int], dict[str, int] | None]) -> dict[str, int]:
    """ZeRO-2 with tied embeddings: the moment autograd sums the tied weight's gradient shares.
    Its hook is backward's last (:func:`_backward_hook_order`: the AccumulateGrad node runs once
    both shares are in); lm_head's share (V*H*e) waited in the node's input buffer since the loss's
    backward, the embedding's backward returns the other, and torch's InputBuffer::accumulate adds
    them out of place (:func:`_tied_embedding_sum`): 3 x V*H*e, counted as activations (the sum,
    the weight's .grad for one hook, is copied into ``grads_in_partition`` or cleared at its
    reduction, stage_1_and_2.py :2184, :2268). Beside it, the reductions of every other hook
    (``after`` that many elements): ``grads_in_partition`` once a flush reached this rank's
    partition, the oversized wpe gradient waiting (:1446), the bucket. On 2-rank GPT-2 124M
    (ZeRO-2 fp32, buckets 5e5, CPU) this is rank 0's backward peak, at the traced aten.add (2 B
    of the measured grads + activations, ids aside). Empty untied or where not modelled."""
    order = _backward_hook_order(s.shape)
    if not _tied_embedding_sum(s) or order is None or order[-1] != 0:
        return {}
    m = after(s.shape.prefix_sums[-1] - s.numels[0])
    return {} if m is None else {**m, ACT: 3 * s.numels[0] * s.e}


def _stage0(s: LayoutSetup, out: StateLayout) -> None:
    """ZeRO-0: the engine's own optimizer (runtime/engine.py ``_configure_basic_optimizer``), under
    ``FP16_Optimizer`` (fp16/fused_optimizer.py, FusedAdam) or ``FP16_UnfusedOptimizer``
    (fp16/unfused_optimizer.py, any other) in bf16/fp16 (``_do_optimizer_sanity_check`` /
    ``_configure_fp16_optimizer``); gradients are all-reduced by ``buffered_allreduce_fallback``."""
    inp, e, total = s.inp, s.e, s.t_total  # total: the trainable parameters (all, in full fine-tuning)
    # every parameter, frozen ones too, in the compute dtype (engine._configure_distributed_model
    # casts them all: _cast_module_mixed_precision; a 4-bit base's uint8 storage is no floating
    # dtype and stays packed); only trainable ones get grads, master, state
    out.add("device", P, total * e + s.frozen_bytes)
    if e < FP32:
        # engine._do_optimizer_sanity_check: bf16/fp16 at stage 0 -> FP16_Optimizer (FusedAdam) or
        # FP16_UnfusedOptimizer (any other): fp32 copies of every param, per tensor or flat
        out.add("device", M, total * FP32)
        out.notes.append("stage 0 with bf16/fp16: DeepSpeed's FP16_Optimizer keeps an fp32 master copy of every parameter (4 bytes/param)")
    out.add("device", O, optimizer_state_bytes(inp.optimizer, total, len(s.numels), step_tensors=s.step_tensors))
    # backward: param.grad for every param, then buffered_allreduce_fallback flattens up to
    # allreduce bucket (MEMORY_OPT_ALLREDUCE_SIZE = 5e8 elements) into one copy
    out.backward_end_extra = max({G: total * e, C: min(total, 500_000_000) * e if s.N > 1 else 0},
                                 _with_tied_sum({G: total * e}, s), key=lambda m: sum(m.values()))
    # engine.backward (runtime/engine.py) runs loss.backward() and only then allreduce_gradients:
    # no hook releases a gradient, so each block's backward runs beside every later param.grad
    out.backward_blocks_extra, out.backward_blocks_grad_size = {}, e
    temporaries = optimizer_temporaries(inp, s.t_largest, total, s.device_type, s.numels)
    if e < FP32 and uses_deepspeed_adam(inp.optimizer, inp.torch_adam):
        # FP16_Optimizer.step (fp16/fused_optimizer.py:284): _flatten_dense_tensors over a list
        # of p.grad.to(fp32) copies, so the per-parameter fp32 copies (4P) and the flat fp32
        # gradient (4P) are alive together beside the bf16/fp16 grads (eP); then `p.grad = None`
        # and FusedAdam steps from the flat fp32 gradient
        flatten = {G: total * e + 2 * total * FP32}
        in_optimizer = {G: total * FP32, O: temporaries}
        out.step_moments = [flatten, in_optimizer]
    else:
        # step: param.grad (e) and, in bf16/fp16, the fp32 master grads; the optimizer's temporaries
        grads = total * e + (total * FP32 if e < FP32 else 0)
        out.step_moments = [{G: grads, O: temporaries}]
    # engine.backward calls allreduce_gradients only at the boundary, and zero_grad runs in
    # engine.step's boundary branch: every param.grad (e*P) is alive between micro-steps
    accumulate_between_microsteps(s, out, {G: total * e}, same_at_end=(G,), how="every param.grad (e*P)")

def _stage1_partition_copy(s: LayoutSetup, held: int) -> int:
    """ZeRO-1 without overlap_comm, contiguous_gradients: gradient elements alive when
    ``grads_in_partition`` is allocated. After loss.backward() returns, reduce_gradients
    (stage_1_and_2.py:958) walks the params in group (forward) order:
    reduce_independent_p_g_buckets_and_remove_grads (:1414) first reduces the bucket when
    ``bucket.elements + param.numel() > reduce_bucket_size`` (:1422), then copies a param no larger
    than the bucket into the ipg buffer and points its .grad there (:1450-1454: its own storage
    freed); a larger one keeps its gradient (extra_large_param_to_reduce, :1443). The first
    reduction (reduce_ipg_grads, :2205, or the epilogue's last one) whose bucket holds a param
    touching this rank's partition calls copy_grads_in_partition (:2271, stage 1 branch), whose
    first call allocates ``grads_in_partition`` (every param touching the partition, :2184) while
    the params not yet bucketed keep their .grad (stage 1 clears none). Every param bucketed
    before that reduction, the reduced bucket's own included, no longer holds a gradient of its own."""
    rbs, numels = s.inp.zero.reduce_bucket_size, s.trainable.param_numels
    _, part, _ = stage12_partition(s.trainable, s.N, s.rank)
    start, end = part * s.rank, part * (s.rank + 1)
    cum = freed = elements = 0
    mine = False  # the bucket holds a param touching this rank's partition
    for n in numels:
        if elements + n > rbs:
            if mine:
                break  # this reduction allocates grads_in_partition
            elements = 0
        mine = mine or (cum < end and cum + n > start)
        freed += n if n <= rbs else 0
        elements += n
        cum += n
    return s.t_total - freed + held


def _with_tied_sum(moment: dict[str, int], s: LayoutSetup) -> dict[str, int]:
    """``moment`` (the end of a backward that keeps every param.grad) with the tied embedding's
    summed gradient shares (:func:`_tied_embedding_sum`) beside it, as ``activations``: the two
    shares are autograd's (the AccumulateGrad node's input buffer and the embedding backward's
    output), no parameter's ``.grad`` (their sum is the weight's ``.grad``, already in ``moment``'s
    grads), and they die inside backward. The profiler names them so (measured on a 1-rank ZeRO-0
    gpt2-tiny HF Trainer run: 262,144 B = 2 x V*H*4 activations at the backward peak beside every
    param.grad), and :func:`_stage2_tied_sum` counts the same moment's shares the same way."""
    tied = _tied_embedding_sum(s)
    if not tied:
        return dict(moment)
    if not s.shape.has_transformer_shape:
        # a family without an activation model: its estimate holds no activations (it says so), so
        # the shares stay counted, beside the gradients they are summed into
        return {**moment, G: moment.get(G, 0) + tied}
    return {**moment, ACT: tied}


def _tied_embedding_sum(s: LayoutSetup) -> int:
    """Where every param.grad is kept through backward (ZeRO-0, ZeRO-1 without overlap_comm), the
    last moment of backward with tied embeddings: the embedding's backward returns its share of
    the tied weight's gradient while lm_head's share waits in the AccumulateGrad node's input
    buffer; torch's InputBuffer::accumulate adds them out of place (both shares and their sum,
    3 x V*H*e, beside every other param.grad; traced on gpt2-tiny, benchmarks/trace_backward_blocks.py).
    Returns the bytes beyond the weight's own .grad (2 x V*H*e), 0 untied or frozen."""
    tied = s.shape.tied_embeddings and s.shape.model_type is not None and not s.frozen and s.numels
    return 2 * s.numels[0] * s.e if tied else 0


def _stage12_resident(s: LayoutSetup, out: StateLayout, opt_loc: str, pinned: bool = False) -> int:
    """What every ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer.__init__``, stage_1_and_2.py, and
    ``BF16_Optimizer.__init__``, bf16_optimizer.py) keeps for the run: the padded flat low-precision
    group, this rank's fp32 master partition and the inner optimizer's state for it. Returns the
    partition's numel."""
    inp, e = s.inp, s.e
    padded, part, _ = stage12_partition(s.trainable, s.N, s.rank)
    out.add("device", P, padded * e)  # bit16_groups_flat (fp32 in fp32 mode), padding included
    if s.frozen:
        # bit16_groups holds trainable parameters only (__init__: is_optimized_parameter): a frozen
        # parameter stays a whole module tensor on every rank, in the compute dtype (a 4-bit
        # weight packed in its quant_storage)
        out.add("device", P, s.frozen_bytes)
    out.add(opt_loc, M, _host_bytes(s, part * FP32, pinned))  # single_partition_of_fp32_groups (pinned: :565)
    out.add(opt_loc, O, optimizer_state_bytes(inp.optimizer, part, 1, step_tensors=s.step_tensors))
    return part


def _stale_adagrad_state(s: LayoutSetup, out: StateLayout) -> None:
    """State an optimizer created in its constructor, left on the engine's original instance.

    engine._configure_basic_optimizer builds the torch optimizer over the model's parameters after
    _configure_distributed_model has cast them to the model dtype. Of the zoo only torch Adagrad
    creates its state there (adagrad.py ``__init__``: ``sum = torch.full_like(p, ...)``, so in
    p's dtype: bf16/fp16 in mixed precision; ``step = torch.zeros((), dtype=_get_scalar_dtype())``,
    4 bytes fp32 per tensor); the others create it lazily in ``step()``, on the fp32 partitions the
    ZeRO optimizer hands them. stage_1_and_2.py:946 (stage3.py:1358 at ZeRO-3) builds a new Adagrad
    over the fp32 partitions, but engine.basic_optimizer keeps the original one alive with that
    full-size ``sum``. At ZeRO-3 it is full-size too when the model was built whole, as memprof's
    launcher builds it (memprof/train/model.py): the engine partitions the parameters only when the
    ZeRO-3 optimizer is made (stage3.py ``initialize_ds_offload`` -> DeepSpeedZeRoOffload
    ``_convert_to_zero_parameters``), after ``_configure_basic_optimizer`` (engine.py:2332). A model
    built under ``deepspeed.zero.Init`` is partitioned already, and its stale ``sum`` is empty: this
    estimate assumes the model was built whole, and says so."""
    spec = OPTIMIZER_SPECS[s.inp.optimizer]
    if spec.lazy:
        return
    out.add("device", O, optimizer_state_bytes(s.inp.optimizer, s.t_total, len(s.numels), state_bytes_per_element=s.e))
    out.notes.append(f"ZeRO-{s.inp.zero_stage} {spec.torch_class}: the engine's original optimizer stays alive with its "
                     f"constructor-made full-size state in the model dtype ({s.e}P + 4 per tensor)"
                     + ("; assumed the model was built whole, not under deepspeed.zero.Init (then that state is empty)"
                        if s.inp.zero_stage == 3 else ""))


def _bf16_optimizer(s: LayoutSetup, out: StateLayout) -> None:
    """ZeRO-1 + bf16 + ``data_types.grad_accum_dtype: fp32``: ``BF16_Optimizer``
    (runtime/bf16_optimizer.py; engine._do_optimizer_sanity_check picks it)."""
    inp, e = s.inp, s.e
    part = _stage12_resident(s, out, "device")
    _stale_adagrad_state(s, out)
    padded, _, _ = stage12_partition(s.trainable, s.N, s.rank)
    # fp32_groups_gradients_flat: one fp32 gradient per element of the whole (padded) group, kept for the run
    out.add("device", G, padded * FP32)
    out.notes.append("ZeRO-1 + bf16 + fp32 gradient accumulation: BF16_Optimizer keeps fp32 gradients of the whole group (4 bytes/param)")
    # BF16_Optimizer has no IPG buckets: backward_epilogue adds every param's bf16 .grad into
    # the kept fp32 gradients and leaves the bf16 grads allocated through step() (the
    # engine's zero_grad frees them after it); the optimizer steps the fp32 partition in place.
    lp_grads = {G: s.t_total * e}
    out.backward_end_extra = lp_grads
    out.step_moments = [{**lp_grads, O: optimizer_temporaries(inp, part, part, s.device_type)}]
    # the bf16 .grads accumulate in place until the boundary's backward_epilogue (measured: +e*P
    # between micro-steps on gpt2-tiny, 2 CPU ranks)
    accumulate_between_microsteps(s, out, lp_grads, same_at_end=(G,), how="every bf16 param.grad (e*P)")


def _reduce_buckets(s: LayoutSetup) -> int:
    """``setup_buckets`` (stage_1_and_2.py) allocates the ipg buffer(s) at the first gradient hook,
    while activations live: ``reduce_bucket_size`` elements, two with ``overlap_comm``."""
    z = s.inp.zero
    if not z.contiguous_gradients:
        return 0
    return z.reduce_bucket_size * s.e * (2 if z.overlap_comm_for(s.inp.zero_stage) else 1)


def _stage12_offload(s: LayoutSetup, out: StateLayout) -> None:
    """ZeRO-1/2 + ``offload_optimizer: cpu`` (stage_1_and_2.py, the ``cpu_offload`` branches):
    fp32 master, its gradient partition and the optimizer state on the host, DeepSpeedCPUAdam (or
    the torch optimizer) stepping there in place."""
    inp, e, stage = s.inp, s.e, s.inp.zero_stage
    pinned = inp.zero.offload_optimizer_pin_memory  # cpu_offload_pin_memory
    part = _stage12_resident(s, out, "host", pinned)
    # initialize_optimizer_states: the fp32 partition's .grad stays allocated on the host (:940);
    # param_buffer_of_bit16_for_cpu_offload_groups (e*p, host, :572);
    # temp_grad_buffer_for_cpu_offload (host, :657) and _for_gpu_offload (device): largest param x e;
    # each pinned with offload_optimizer.pin_memory (the optimizer state, made by the optimizer, is not)
    out.add("host", G, _host_bytes(s, part * FP32, pinned))
    out.add("host", C, _host_bytes(s, part * e, pinned) + _host_bytes(s, s.t_largest * e, pinned))
    out.add("device", C, s.t_largest * e)
    out.notes.append("offload_optimizer cpu: fp32 master, its gradient partition and optimizer state live on the host")
    if inp.grad_accum_dtype == "fp32" and e < FP32:
        out.notes.append(_APPROXIMATE_FP32_ACCUMULATION)
    buckets = _reduce_buckets(s)
    out.backward_extra = {C: buckets}
    # stage 1 keeps every param.grad until the epilogue; stage 2 copies each reduced gradient
    # straight into the host fp32 partition (async_inplace_copy_grad_to_fp32_buffer_from_gpu)
    grads_end = s.t_total * e if stage == 1 else 0
    out.backward_end_extra = {G: grads_end, C: buckets}
    if stage == 1 and not inp.zero.overlap_comm_for(1):
        # as on the device (_stage12): no hook reduces (process_gradients, stage_1_and_2.py:2284),
        # reduce_gradients runs after loss.backward() returned: every param.grad is kept, so each
        # block's backward runs beside the later ones (and the ipg buckets)
        out.backward_blocks_extra, out.backward_blocks_grad_size = {C: buckets}, e
        if s.trainable.n_tensors > 1:
            _, part, _ = stage12_partition(s.trainable, s.N, s.rank)
            walk = _stage1_offload_reduction(s.numels, inp.zero.reduce_bucket_size, e, part * s.rank,
                                             min(part * (s.rank + 1), s.t_total))
            out.backward_end_extra = max(_with_tied_sum({G: grads_end, C: buckets}, s), {G: walk, C: buckets},
                                         key=lambda m: sum(m.values()))
    if stage == 2:
        _stage2_offload_hook_moments(s, out, buckets)
    out.step_moments = [{}]  # DeepSpeedCPUAdam steps in place on the host
    if inp.gradient_accumulation_steps > 1:
        if stage == 1:
            # as on the device; and no host accumulation buffer: without a non-boundary epilogue
            # ready_for_gradients stays set, so setup_buckets (:3256) raises micro_step_id once per
            # window and the boundary's copy_grads_in_partition sees 0 (:2166; measured: none)
            _stage1_accumulation(s, out, buckets)
        else:
            # copy_grads_in_partition (stage_1_and_2.py:2166): reducing at every micro-step (stage 2),
            # a non-boundary micro-step keeps each partition param's reduced gradient in
            # accumulated_grads_in_cpu (async_accumulate_grad_in_cpu_via_gpu, :1809): the whole
            # param (param.numel()) in the model dtype on the host (pinned with
            # offload_optimizer.pin_memory), kept for the run; accumulate_gradients adds it back
            # into the device gradient through temp_grad_buffer_for_gpu_offload (no new device bytes)
            out.add("host", G, sum(_host_bytes(s, n * e, pinned)
                                   for n in stage12_partition_param_numels(s.trainable, s.N, s.rank)))
            accumulate_between_microsteps(s, out, {}, how="on the device nothing (the host keeps accumulated_grads_in_cpu, "
                                        "the partition's params whole in the model dtype)")


@functools.lru_cache(maxsize=1024)
def _stage1_offload_reduction(numels: tuple[int, ...], rbs: int, e: int, start: int, end: int) -> int:
    """ZeRO-1 + offload_optimizer after loss.backward() returned: gradient bytes at the worst
    moment of reduce_gradients (stage_1_and_2.py:958), every param.grad alive at its start. It walks
    the params in group (forward) order through reduce_independent_p_g_buckets_and_remove_grads
    (:1414): a param no larger than the bucket is copied into it and its own storage freed (:1455),
    a larger one keeps its gradient (extra_large_param_to_reduce) until the next param's call
    reduces it (:1422). reduce_ipg_grads' stage 1 branch (:2273) sends each reduced param in the
    partition ``[start, end)`` to copy_grads_in_partition's offload branch (:2161):
    set_norm_for_param_grad_in_gpu (:1873) takes a float64 copy of its piece, then
    async_inplace_copy_grad_to_fp32_buffer_from_gpu (:1888) copies it to the host and clears the
    gradient; a reduced param outside the partition keeps its gradient (stage 1 clears none)."""
    cum = (0, *itertools.accumulate(numels))
    alive, worst, elements, bucket, pending = sum(numels), 0, 0, [], None

    def reduce(reduced: list[int]) -> int:
        nonlocal alive
        pieces = [(i, min(cum[i + 1], end) - max(cum[i], start)) for i in reduced]
        mine = [(i, p) for i, p in pieces if p > 0]
        peak = alive * e + FP64 * max([p for _, p in mine], default=0)
        alive -= sum(numels[i] for i, _ in mine if numels[i] > rbs)  # an oversized own gradient cleared
        return peak

    for i, n in enumerate(numels):
        if n == 0:
            continue
        if elements + n > rbs:
            worst = max(worst, reduce(bucket if pending is None else [pending]))
            elements, bucket, pending = 0, [], None
        if n > rbs:
            pending = i
        else:
            alive -= n  # copied into the bucket: the bucket holds it now
        bucket.append(i)
        elements += n
    return max(worst, reduce(bucket if pending is None else [pending]))  # the epilogue's reduction


@dataclass(frozen=True)
class _OffloadHook:
    """What one ZeRO-2 + offload gradient hook adds on the device beyond the reduce buckets (bytes;
    the hooked parameter's own gradient is not included)."""

    reduce: int  # during the reduction the hook starts: the waiting oversized gradient + one fp64 norm copy
    clone: int  # the hooked oversized gradient's clone, beside the gradient it copies
    pending: int  # an oversized gradient left waiting outside the bucket after the hook


def _stage2_offload_hooks(s: LayoutSetup) -> tuple[tuple[_OffloadHook, ...], int]:
    """ZeRO-2 + ``offload_optimizer`` (stage_1_and_2.py, DeepSpeed 0.19.8) hook by hook, in
    backward's (reverse parameter) order: each hook's :class:`_OffloadHook`, and the bytes of the
    last reduction (the epilogue's ``reduce_ipg_grads``, :1018) beyond the buckets.

    reduce_independent_p_g_buckets_and_remove_grads (:1414) first reduces the bucket when
    ``bucket.elements + param.numel() > reduce_bucket_size`` (:1422). A param larger than the
    bucket is not copied into it: under offload (``_offload_gradient_safety_enabled``, :232) its
    gradient is replaced by a clone (``grad_reduc.data = grad_reduc.detach().clone()``, :1446: both
    alive for the copy) that waits as ``extra_large_param_to_reduce`` until the next hook reduces it
    (reduce_ipg_grads :2213). Each reduced param touching this rank's partition then goes through
    copy_grads_in_partition's offload branch (:2161): set_norm_for_param_grad_in_gpu (:1886) takes
    ``.to(get_norm_dtype())`` of its piece, a float64 copy, one param at a time, before
    async_inplace_copy_grad_to_fp32_buffer_from_gpu copies the piece to the host and clears the
    gradient (:1912); a param outside the partition is cleared (:2269)."""
    shape = s.trainable
    _, part, _ = stage12_partition(shape, s.N, s.rank)
    return _offload_hook_walk(shape.param_numels, s.inp.zero.reduce_bucket_size, s.e,
                              part * s.rank, min(part * (s.rank + 1), shape.n_params))


@functools.lru_cache(maxsize=1024)
def _offload_hook_walk(numels: tuple[int, ...], rbs: int, e: int, start: int, end: int) -> tuple[tuple[_OffloadHook, ...], int]:
    """:func:`_stage2_offload_hooks` for the partition ``[start, end)`` (pure: cached, the planner and
    the advisor ask for the same ranks many times)."""
    cum = (0, *itertools.accumulate(numels))

    def reduction(bucket: list[int], pending: int | None) -> int:
        reduced = bucket if pending is None else [pending]
        pieces = [min(cum[i + 1], end) - max(cum[i], start) for i in reduced]  # grad_position's num_elements
        return (0 if pending is None else numels[pending] * e) + FP64 * max([p for p in pieces if p > 0], default=0)

    hooks, elements, bucket, pending = [], 0, [], None
    for i in reversed(range(len(numels))):
        n, reduce = numels[i], 0
        if elements + n > rbs:
            reduce = reduction(bucket, pending)
            elements, bucket, pending = 0, [], None
        if n > rbs:
            pending = i
        bucket.append(i)
        elements += n
        hooks.append(_OffloadHook(reduce, n * e if n > rbs else 0, 0 if pending is None else numels[pending] * e))
    return tuple(hooks), reduction(bucket, pending)


def _stage2_offload_hook_moments(s: LayoutSetup, out: StateLayout, buckets: int) -> None:
    """The moments :func:`_stage2_offload_hooks` adds to backward. At its end (every model; the
    activations freed): the last hook (the first parameter's: its gradient, then the reduction it
    starts or its clone), the epilogue's reduction, and with tied GPT-2 embeddings the wte
    AccumulateGrad summing its two shares (lm_head's and the embedding's, and their sum: 3 V*H*e,
    measured) beside the gradient still waiting. In the last GPT-2 (tied) block: mlp.c_proj.weight's
    hook, GELU's backward after it (the gradient still waiting, as without offload) and
    mlp.c_fc.bias's hook, each beside its activations (Activations.mlp_out_weight_hook,
    after_mlp_out_hooks, mlp_in_bias_hook)."""
    if s.shape.n_tensors <= 1 or not s.numels:
        return  # a bare parameter count: no per-tensor shapes to walk
    hooks, last_reduction = _stage2_offload_hooks(s)
    e, last = s.e, hooks[-1]
    end = [last_reduction, s.numels[0] * e + max(last.reduce, last.clone)]
    gpt2_tied = s.shape.model_type == "gpt2" and s.shape.tied_embeddings and not s.frozen
    if gpt2_tied and len(hooks) > GPT2_MLP_OUT_HOOKS:
        end.append(3 * s.numels[0] * e + hooks[-2].pending)
        weight, bias = hooks[GPT2_MLP_OUT_HOOKS - 1], hooks[GPT2_MLP_OUT_HOOKS]
        out.backward_mlp_out_weight_hook_extra = {G: max(weight.reduce, weight.clone), C: buckets}
        out.backward_after_mlp_out_hooks_extra = {G: weight.pending, C: buckets}
        out.backward_mlp_in_bias_hook_extra = {G: max(bias.reduce, bias.clone), C: buckets}
    else:
        out.notes.append(_UNMODELLED_OFFLOAD_HOOKS)
    out.backward_end_extra = {G: max(end), C: buckets}


_UNMODELLED_OFFLOAD_HOOKS = (
    "ZeRO-2 + offload_optimizer: a parameter larger than reduce_bucket_size has its gradient cloned at its "
    "hook, and each reduced gradient piece is copied to float64 for its norm (stage_1_and_2.py); modelled at "
    "the end of backward only for this model (in the last block too for GPT-2): the backward peak may be low")


_APPROXIMATE_FP32_ACCUMULATION = (
    "fp32 gradient accumulation with fp16/bf16 weights here (stage 1 fp16, or offload) takes "
    "DeepSpeed's compact fp32 gradient-buffer path, modelled only for ZeRO-2 without offload: "
    "backward/step peaks are approximate")


def _stage12(s: LayoutSetup, out: StateLayout) -> None:
    """ZeRO-1/2 on the device (``DeepSpeedZeroOptimizer``, stage_1_and_2.py): gradients reduced
    through the ipg buckets into ``grads_in_partition`` (or the compact fp32 partition buffer),
    ``step()`` flattening this rank's pieces into the master's fp32 gradient."""
    inp, e, stage = s.inp, s.e, s.inp.zero_stage
    part = _stage12_resident(s, out, "device")
    _stale_adagrad_state(s, out)
    buckets = _reduce_buckets(s)
    out.backward_extra = {C: buckets}
    rank_grads = stage12_rank_grads(s.trainable, s.N, s.rank)
    fp32_accumulation = inp.grad_accum_dtype == "fp32" and e < FP32
    if fp32_accumulation and stage == 2:
        _stage2_compact_fp32_grads(s, out, part, rank_grads)
        return
    if fp32_accumulation:
        out.notes.append(_APPROXIMATE_FP32_ACCUMULATION)
    pad = rank_grads.pad * e  # the last rank's zero tail
    if stage == 1:
        grads_end = s.t_total * e  # stage 1 keeps every param.grad until the epilogue
    else:
        grads_end = rank_grads.held * e if inp.zero.contiguous_gradients else 0  # grads_in_partition
    out.backward_end_extra = {G: grads_end + pad, C: buckets}
    if stage == 1 and not inp.zero.overlap_comm_for(1):
        # process_gradients (stage_1_and_2.py:2284) reduces in the hook only with
        # partition_gradients or overlap_comm; otherwise engine.allreduce_gradients calls
        # reduce_gradients after loss.backward() returned (engine.py:3092): every param.grad is
        # kept, so each block's backward runs beside the later ones (and the ipg buckets)
        out.backward_blocks_extra, out.backward_blocks_grad_size = {C: buckets}, e
        end = _with_tied_sum({G: grads_end + pad, C: buckets}, s)
        if inp.zero.contiguous_gradients and s.trainable.n_tensors > 1:
            copy = {G: _stage1_partition_copy(s, rank_grads.held) * e + pad, C: buckets}
            end = max(end, copy, key=lambda m: sum(m.values()))
        out.backward_end_extra = end
    if (stage == 2 and inp.zero.contiguous_gradients and s.shape.model_type == "gpt2" and s.shape.tied_embeddings
            and not s.frozen):
        # the moment after the last block's mlp.c_proj hooks (Activations.after_mlp_out_hooks)
        allocated, pending = _stage2_after_mlp_out_hooks(s, GPT2_MLP_OUT_HOOKS)
        out.backward_after_mlp_out_hooks_extra = {G: (grads_end + pad if allocated else 0) + pending * e, C: buckets}
    if stage == 2 and inp.zero.contiguous_gradients:
        out.backward_blocks_after = _stage2_blocks_after(s, rank_grads.held * e, buckets)
        if out.backward_blocks_after is not None:
            out.backward_tied_sum_extra = _stage2_tied_sum(s, out.backward_blocks_after)
    # step() (stage_1_and_2.py:3013) with the grads of every param touching the partition
    # still held (averaged_gradients views of grads_in_partition, + the zero tail):
    # (1) scaled_global_norm -> get_grad_norm_direct (:2684): a float64 copy of one piece at
    #     a time (compute_grad_norm is on unless the config turns it off);
    # (2) flatten(averaged_gradients) (e*p, :3117) and its .to(fp32) (:3119; the same
    #     tensor in fp32 mode) for the master's .grad;
    # (3) `del flat_grad_partition` and free_grad_in_param_list(params_in_partition) drop
    #     the low-precision copies before _optimizer_step, where the optimizer's
    #     temporaries join the fp32 gradient.
    held = rank_grads.held * e + pad
    norm = {G: held + rank_grads.largest_piece * FP64}
    flatten = {G: held + part * e + (part * FP32 if e < FP32 else 0)}
    in_optimizer = {G: part * FP32, O: optimizer_temporaries(inp, part, part, s.device_type)}
    out.step_moments = [norm, flatten, in_optimizer]
    if stage == 1:
        _stage1_accumulation(s, out, buckets)
    else:
        # stage 2 reduces at every micro-step: a non-boundary epilogue keeps the reduced grads of
        # the partition's params (get_all_grad_tensors -> all_grad_tensors, views of that
        # micro-step's grads_in_partition, :1037) and the next micro-step's copy_grads_in_partition
        # allocates a new grads_in_partition beside them (:2184); the boundary's epilogue adds the
        # new into the old (:1044) and step() flattens the old
        accumulate_between_microsteps(s, out, {G: rank_grads.held * e},
                    how="the partition params' reduced gradients (all_grad_tensors, e x their numel)")


def _stage1_accumulation(s: LayoutSetup, out: StateLayout, buckets: int) -> None:
    """ZeRO-1 (partition_gradients off) reduces only at the boundary
    (reduce_ready_partitions_and_remove_grads, stage_1_and_2.py:2291) and the engine calls the
    epilogue only there: a non-boundary micro-step's param.grads (e*P) stay and accumulate in
    place, and the ipg buckets setup_buckets (:3256) allocated at its first hook are not released
    (_release_ipg_buffers runs in the epilogue). At the boundary the same buckets are reused."""
    accumulate_between_microsteps(s, out, {G: s.t_total * s.e, C: buckets}, same_at_hook=(C,), same_at_end=(G, C),
                how="every param.grad (e*P) and the reduce buckets")


def _stage2_compact_fp32_grads(s: LayoutSetup, out: StateLayout, part: int, rank_grads: Stage12Grads) -> None:
    """ZeRO-2 + bf16/fp16 + fp32 gradient accumulation: ``_use_compact_grad_partition_buffer``
    (stage_1_and_2.py:1259): gradients accumulate into one fp32 buffer of this rank's partition
    (torch.zeros(partition_size), :1270) instead of grads_in_partition; the reduce buckets are gone
    by backward's end; step() takes the buffer as its flat fp32 gradient (no flatten, no copy) after
    the norm's fp64 copy of one piece at a time. Measured on gpt2-tiny, 2 CPU ranks: exact."""
    compact_grads = {G: part * FP32}
    out.backward_end_extra = compact_grads
    norm = {G: part * FP32 + rank_grads.largest_piece * FP64}
    in_optimizer = {**compact_grads, O: optimizer_temporaries(s.inp, part, part, s.device_type)}
    out.step_moments = [norm, in_optimizer]
    out.notes.append("ZeRO-2 + fp32 gradient accumulation: gradients accumulate in an fp32 partition buffer (4 bytes/param / N)")
    # the compact buffer lives from the first reduction to the boundary's step: between micro-steps too
    accumulate_between_microsteps(s, out, compact_grads, same_at_end=(G,), how="the fp32 gradient-partition buffer (4 bytes/param / N)")


def _stage3(s: LayoutSetup, out: StateLayout) -> None:
    """ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``, runtime/zero/stage3.py; parameters partitioned by
    ``zero.Init`` / partition_parameters.py), with ``offload_optimizer`` and ``offload_param``
    cpu moving the fp32 states / the partitions to the host."""
    inp, e, N, total, largest = s.inp, s.e, s.N, s.total, s.t_largest
    shape, z = s.shape, s.inp.zero
    # every parameter, frozen ones too, is partitioned (ds_tensor) and gathered for forward and
    # backward; fp32 master, optimizer state and gradient partitions exist for the trainable ones
    # only (stage3.py _get_trainable_parameter_groups -> trainable_param_groups, which
    # _create_fp16_partitions_with_defragmentation and _create_fp32_partitions are built from)
    part_total = shape.stage3_partition_numel(N)  # S, all parameters
    part_trainable = s.trainable.stage3_partition_numel(N)  # S, trainable ones (S in full fine-tuning)
    thr = min(z.param_persistence_threshold, z.model_persistence_threshold)
    # With one rank nothing is gathered into a new buffer: all_gather_coalesced /
    # _allgather_params_coalesced take _no_gather_coalesced when every param's partition world
    # size is 1, and NoGatherHandle sets ``param.data = param.ds_tensor.data.to(same device)``, a
    # view (partition_parameters.py:61, :904, :1545). Persistent or fetched, a gathered param
    # then costs no byte beyond its partition.
    single_rank = N == 1
    persistent = 0 if single_rank else shape.persistent_gathered_numel(thr, N)  # G
    off_opt = z.offload_optimizer == "cpu"
    off_par = z.offload_param == "cpu"
    par_loc = "host" if off_par else "device"
    opt_loc = "host" if off_opt else "device"
    ge = ELEMENT_SIZE[inp.grad_accum_dtype or inp.precision]  # gradient_accumulation_dtype
    # ds_tensor partitions (fp16_partitioned_groups_flat; offloaded: param_groups_fp16_flat_cpu_memory, pinned, stage3.py:906)
    out.add(par_loc, P, _host_bytes(s, part_total * e, z.offload_param_pin_memory) if off_par else part_total * e)
    out.add("device", P, persistent * e)  # persistent params stay gathered (ds_persist), numel rounded up to N
    # fp32_partitioned_groups_flat: a separate fp32 copy even for an fp32 model, because the
    # share-the-buffer test in _create_fp32_partitions (stage3.py:1162) compares a torch.device
    # with a device-name string and never holds
    out.add(opt_loc, M, part_trainable * FP32)
    n_sub = max(1, math.ceil(part_trainable / max(1, z.sub_group_size)))
    largest_sub = min(part_trainable, max(1, z.sub_group_size))
    out.add(opt_loc, O, optimizer_state_bytes(inp.optimizer, part_trainable, n_sub, step_tensors=s.step_tensors))
    _stale_adagrad_state(s, out)
    # grad_partitions_flat_buffer, in gradient_accumulation_dtype (on the host under optimizer
    # offload, pinned with offload_optimizer.pin_memory: stage3.py:795)
    pin_opt = off_opt and z.offload_optimizer_pin_memory
    out.add(opt_loc, G, _host_bytes(s, part_trainable * ge, pin_opt) if off_opt else part_trainable * ge)
    if off_opt:
        # initialize_optimizer_states (stage3.py:1338): each sub-group's fp32 master also keeps an
        # fp32 .grad buffer (subgroup_gradient_buffer, pinned the same way) on the host for the run
        subs = [largest_sub] * (n_sub - 1) + [part_trainable - largest_sub * (n_sub - 1)]
        out.add("host", G, sum(_host_bytes(s, n * FP32, pin_opt) for n in subs if n > 0))
    if z.contiguous_gradients:
        out.add("device", C, z.reduce_bucket_size * e)  # IPG bucket flat buffer, allocated at init, kept
    gathered, how = _stage3_forward_moments(s, out, thr, single_rank, persistent, largest)
    out.backward_end_extra = {}
    if off_opt:
        # DeepSpeedCPUAdam updates the host partitions in place
        out.step_moments = [{}]
    else:
        # step(): _partition_all_parameters releases the gathered persistent params (until
        # _post_step gathers them again); _prepare_fp32_grad_for_sub_group flattens the gradient
        # partition (ge*S) and .to(fp32) copies it (the same tensor in fp32); the flat copy dies
        # before _optimizer_step, where the optimizer's temporaries join the fp32 gradient
        release = -persistent * e
        to_fp32 = {P: release, G: largest_sub * ge + (largest_sub * FP32 if ge < FP32 else 0)}
        in_optimizer = {P: release, G: largest_sub * FP32,
                        O: optimizer_temporaries(inp, largest_sub, largest_sub, s.device_type)}
        out.step_moments = [to_fp32, in_optimizer]
    # the gradient partitions (grad_partitions_flat_buffer) are at rest already; a micro-step
    # after the first adds into them in place (stage3.py:2024, `micro_step_id == 0` copies)
    accumulate_between_microsteps(s, out, {}, how="on the device nothing beyond the run-long gradient partitions")
    out.notes.append(
        f"stage 3: {shape.persistent_numel(thr):,} elements in params of <= {thr:,} elements stay gathered (persistence threshold); "
        f"gathered when forward ends: {gathered:,} of {total - shape.persistent_numel(thr):,} non-persistent elements " + how
    )


def _stage3_forward_moments(s: LayoutSetup, out: StateLayout, thr: int, single_rank: bool, persistent: int,
                            largest: int) -> tuple[int, str]:
    """ZeRO-3's gathered parameters at forward's and backward's moments (and inside forward, the
    prefetch groups' buffers), and how they were found: (gathered when forward ends, words)."""
    shape, z, e, N = s.shape, s.inp.zero, s.e, s.N
    if _trace_reset_each_micro_step(s.inp) and not single_rank:
        # no complete trace: every module's params (persistent ones too) released after its forward
        # and backward; the fused head gathers lm_head itself (trl maybe_gather_lm_head_ctx ->
        # GatheredParameters) in its forward and in its backward, beside its peak moments
        head = -(-shape.vocab * shape.hidden // N) * N if shape.has_transformer_shape else 0
        out.forward_extra = {P: (head - persistent) * e}
        out.backward_extra = {P: (head - persistent) * e, G: largest * e}
        return 0, ("(none: DPO's PEFT reference forward calls the PeftModel outside the engine, whose root "
                   "pre-forward hook resets the coordinator's trace every micro-step: record mode throughout)")
    gathered, how = _stage3_gathered(s, thr, single_rank)
    out.forward_extra = {P: gathered * e}
    out.backward_extra = {P: gathered * e, G: largest * e}
    out.backward_after_head_extra = {P: max(0, gathered - _head_released(s, thr)) * e}
    replayed = None if single_rank else shape.stage3_forward(thr, z.max_reuse_distance, z.prefetch_bucket_size,
                                                              z.max_live_parameters, N)
    if replayed is not None and replayed.peak > gathered:
        # inside forward a prefetched group is held twice: each param's gathered copy (params)
        # beside the call's flat all-gather buffer (comm_buffers) until its last param's module
        out.forward_in_layer_extra = {P: replayed.peak_gathered * e, C: replayed.peak_buffers * e}
    if replayed is not None and replayed.after:
        # an earlier block's in-block moment (Activations.forward_in_blocks) beside what the
        # coordinator holds then: with a complete trace nothing is released in forward while its
        # backward reuse is within stage3_max_reuse_distance (__params_to_release,
        # partitioned_param_coordinator.py:655-663), so the blocks before are gathered, and the
        # prefetches issued at each fetch (:451-481) hold the next blocks' params in flat
        # all-gather buffers (partition_parameters.py:1343) not yet copied out (:795) or still
        # registered under a param whose module has not run (:406). Traced on a 3-rank GPT-2 w96
        # run (ckpt, prefetch 50,000): the peak is block 1's GELU (h.2 in flight), not the loss.
        after = replayed.after
        out.forward_at_fetch = lambda pos: {P: after[pos][0] * e, C: after[pos][1] * e}
    return gathered, how


def _head_released(s: LayoutSetup, thr: int) -> int:
    """Gathered elements released once the head's backward ran: an untied output embedding and the
    final norm (the last two parameters of a model with a transformer shape) are used once more in
    the trace after their backward (none), so release_sub_module frees them then
    (__params_to_release, partitioned_param_coordinator.py:655-663; the run's peak owners at its
    backward peak: no lm_head.weight); each gathered as a single all-gather, numel rounded up to the
    world size. Their gradients went to the reduce bucket at their hooks (the bucket is already
    counted): none is kept. Tied, the head is embed_tokens' weight, used again by the embedding's
    backward: kept."""
    shape = s.shape
    if not shape.has_transformer_shape or shape.tied_embeddings or len(shape.param_numels) < 2:
        return 0
    return sum(-(-n // s.N) * s.N for n in shape.param_numels[-2:] if n > thr)


def _trace_reset_each_micro_step(inp: EstimateInputs) -> bool:
    """Whether the policy's ZeRO-3 parameter coordinator never completes a trace: TRL's DPOTrainer
    with PEFT and no reference model runs the reference forward as ``self.model(...)`` (the
    PeftModel the engine wraps, trl/trainer/dpo_trainer.py ``_compute_loss``) under
    ``use_adapter(..., None)``. The engine's ``_start_of_forward_hook`` is a forward pre-hook on
    that root module (runtime/zero/parameter_offload.py ``setup_zero_stage3_hooks``), so it fires
    again mid-micro-step: ``reset_step`` turns the trace just recorded (the policy's forward) into a
    complete one, the adapter-disabled forward skips lora_A / lora_B and ``trace_prologue``
    invalidates it, and the next micro-step starts recording again
    (partitioned_param_coordinator.py). With an incomplete trace ``release_sub_module`` releases
    every parameter of a module after its forward, persistent ones included, and nothing is
    prefetched."""
    return (inp.loss_implementation == "trl_dpo" and inp.peft is not None and inp.reference_model is None
            and not inp.precompute_ref_log_probs)


def _stage3_gathered(s: LayoutSetup, thr: int, single_rank: bool) -> tuple[int, str]:
    """Gathered non-persistent params when forward ends (steady state), and how that was found:
    replayed from the coordinator's fetch / prefetch / release rules
    (model_shapes.stage3_gathered_after_forward). A bare count has no modules: the params within
    stage3_max_reuse_distance / 2 of forward's end stay, plus the largest param and the prefetch
    window (stage3_prefetch_bucket_size, capped by stage3_max_live_parameters,
    partitioned_param_coordinator.py:452)."""
    shape, z = s.shape, s.inp.zero
    non_persistent = s.total - shape.persistent_numel(thr)
    if single_rank:
        return 0, "(world size 1: a gathered param is a view of its own partition, no extra bytes)"
    replayed = shape.stage3_forward(thr, z.max_reuse_distance, z.prefetch_bucket_size, z.max_live_parameters, s.N)
    if replayed is not None:
        return replayed.end_numel, "(replayed from the parameter coordinator's fetch/prefetch/release rules)"
    retained = shape.stage3_retained_numel(thr, z.max_reuse_distance)
    window = s.largest + min(z.prefetch_bucket_size, max(0, z.max_live_parameters - retained))
    gathered = retained + min(non_persistent - retained, window)
    return gathered, f"({retained:,} within stage3_max_reuse_distance / 2 of forward's end + largest param and prefetch window)"


DEEPSPEED_ZERO_LAYOUT = EngineLayout(deepspeed_zero_layout, describe_deepspeed_zero, describe_zero_buckets)
