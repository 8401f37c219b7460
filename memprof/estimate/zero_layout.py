"""Model states per rank as DeepSpeed 0.19.8 lays them out, and what each phase adds.

Every term names the DeepSpeed attribute it stands for; ``docs/estimator.md`` gives the file and
function. All sizes are integer bytes for one rank (``rank`` matters only where partitions are
uneven: the last rank holds the padding, and a parameter straddling a partition boundary belongs to
both ranks' gradient bookkeeping).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field

from memprof.categories import Category
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import ModelShape
from memprof.estimate.optimizers import OPTIMIZER_SPECS, optimizer_state_bytes

ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: 4-byte alignment / sizeof(fp16)

P, M, G, O, C = (Category.PARAMS.value, Category.MASTER_PARAMS.value, Category.GRADS.value,
                 Category.OPTIMIZER_STATE.value, Category.COMM_BUFFERS.value)


@dataclass
class StateLayout:
    """Model states of one rank: at rest by location, and what each phase adds on the device."""

    rest: dict[str, dict[str, int]] = field(default_factory=lambda: {"device": {}, "host": {}})
    # extra model-state bytes alive at each phase's peak, beyond ``rest`` (device only)
    forward_extra: dict[str, int] = field(default_factory=dict)
    backward_extra: dict[str, int] = field(default_factory=dict)
    backward_end_extra: dict[str, int] = field(default_factory=dict)  # at the end of backward
    step_extra: dict[str, int] = field(default_factory=dict)
    step_temp: int = 0  # optimizer-internal temporaries (counted as optimizer_state)
    notes: list[str] = field(default_factory=list)
    partition_numel: int = 0  # this rank's partition of the optimizer's parameters (elements)
    padded_numel: int = 0  # the flat buffer's numel, padding included (stage 1/2), or sum of partitions x N

    def add(self, where: str, category: str, nbytes: int) -> None:
        self.rest[where][category] = self.rest[where].get(category, 0) + int(nbytes)


def _aligned(numel: int, alignment: int) -> int:
    return int(math.ceil(numel / alignment)) * alignment


def stage12_partition(shape: ModelShape, world_size: int, rank: int) -> tuple[int, int, int]:
    """(padded flat numel, partition numel, numel of the params that touch this rank's partition).

    DeepSpeedZeroOptimizer.__init__: the group is flattened and padded to a multiple of
    ``nccl_start_alignment_factor * world_size`` (flatten_dense_tensors_aligned), cut into equal
    partitions (get_data_parallel_partitions); get_partition_info lists the params that overlap a
    partition, and copy_grads_in_partition sizes ``grads_in_partition`` by their full numel.
    """
    cum = shape.prefix_sums
    total = cum[-1]
    padded = _aligned(total, NCCL_START_ALIGNMENT_FACTOR * world_size)
    part = padded // world_size
    start, end = part * rank, min(part * (rank + 1), total)
    if start >= total:
        return padded, part, 0
    first = bisect.bisect_right(cum, start) - 1  # param holding element `start`
    last = bisect.bisect_left(cum, end)  # params [first, last) overlap [start, end)
    return padded, part, cum[last] - cum[first]


def model_state_layout(inp: EstimateInputs, shape: ModelShape, rank: int, device_type: str) -> StateLayout:
    """The model states of ``rank`` (see module docstring)."""
    e = ELEMENT_SIZE[inp.precision]
    N = inp.world_size
    spec = OPTIMIZER_SPECS[inp.optimizer]
    numels = shape.param_numels
    total = shape.n_params
    z = inp.zero
    stage = inp.zero_stage
    overlap = z.overlap_comm_for(stage)
    cpu_single_tensor = device_type == "cpu"
    out = StateLayout()
    # a bare parameter count has no per-tensor shapes: the largest tensor (stage-3 gather unit,
    # offload staging buffers) is unknown and taken as 0, and said so
    largest = shape.largest_param if shape.n_tensors > 1 else 0
    if shape.n_tensors == 1:
        out.notes.append("bare parameter count: per-tensor sizes unknown, so buffers sized by the largest "
                         "parameter (stage-3 gathers, offload staging) are left out")
    # torch optimizers pick foreach (one temporary over the whole list) only for CUDA tensors;
    # on CPU the single-tensor loop makes temporaries per tensor (Adam: sqrt then divide: 2).
    temp_factor = 0 if inp.optimizer in ("sgd", "momentum") else (1 if inp.optimizer in ("nesterov", "rmsprop", "adagrad") else 2)

    if stage == 0:
        out.padded_numel = out.partition_numel = total
        out.add("device", P, total * e)
        if e < FP32:
            # FP16_Optimizer / FP16_UnfusedOptimizer (fp16/fp32 stage 0) keep fp32 copies of all params
            out.add("device", M, total * FP32)
            out.notes.append("stage 0 with bf16/fp16: DeepSpeed's FP16_Optimizer keeps an fp32 master copy of every parameter (4 bytes/param)")
        out.add("device", O, optimizer_state_bytes(inp.optimizer, total, len(numels)))
        # backward: param.grad for every param, then buffered_allreduce_fallback flattens up to
        # allreduce bucket (MEMORY_OPT_ALLREDUCE_SIZE = 5e8 elements) into one copy
        out.backward_end_extra = {G: total * e, C: min(total, 500_000_000) * e if N > 1 else 0}
        out.step_extra = {G: total * e + (total * FP32 if e < FP32 else 0)}
        out.step_temp = temp_factor * largest * FP32 if cpu_single_tensor else (1 if temp_factor else 0) * total * FP32
        return out

    if stage in (1, 2):
        padded, part, touching = stage12_partition(shape, N, rank)
        out.padded_numel, out.partition_numel = padded, part
        off = z.offload_optimizer == "cpu"
        opt_loc = "host" if off else "device"
        out.add("device", P, padded * e)  # bit16_groups_flat (fp32 in fp32 mode), padding included
        out.add(opt_loc, M, part * FP32)  # single_partition_of_fp32_groups
        out.add(opt_loc, O, optimizer_state_bytes(inp.optimizer, part, 1))
        if off:
            # initialize_optimizer_states: the fp32 partition's .grad stays allocated on the host;
            # param_buffer_of_bit16_for_cpu_offload_groups; temp_grad_buffer_for_{cpu,gpu}_offload
            out.add("host", G, part * FP32)
            out.add("host", C, part * e + largest * e)
            out.add("device", C, largest * e)
            out.notes.append("offload_optimizer cpu: fp32 master, its gradient partition and optimizer state live on the host")
        buckets = z.reduce_bucket_size * e * (2 if overlap else 1) if z.contiguous_gradients else 0
        # setup_buckets allocates the ipg buffer(s) at the first gradient hook, while activations live
        out.backward_extra = {C: buckets}
        if stage == 1:
            grads_end = total * e  # stage 1 keeps every param.grad until the epilogue
        else:
            grads_end = (touching * e if z.contiguous_gradients and not off else 0)  # grads_in_partition
        out.backward_end_extra = {G: grads_end, C: buckets}
        if off:
            out.step_extra = {}
        else:
            # step(): the averaged low-precision partition, then .to(fp32) for the master's .grad
            # (the same tensor in fp32 mode: .to is a no-op)
            out.step_extra = {G: part * e + (part * FP32 if e < FP32 else 0)}
        out.step_temp = temp_factor * part * FP32 if cpu_single_tensor else (1 if temp_factor else 0) * part * FP32
        if off:
            out.step_temp = 0  # DeepSpeedCPUAdam updates in place on the host
        return out

    # stage 3
    part_total = shape.stage3_partition_numel(N)
    out.padded_numel, out.partition_numel = part_total * N, part_total
    thr = min(z.param_persistence_threshold, z.model_persistence_threshold)
    persistent = shape.persistent_numel(thr)
    off_opt = z.offload_optimizer == "cpu"
    off_par = z.offload_param == "cpu"
    par_loc = "host" if off_par else "device"
    opt_loc = "host" if off_opt else "device"
    out.add(par_loc, P, part_total * e)  # ds_tensor partitions (fp16_partitioned_groups_flat)
    out.add("device", P, persistent * e)  # persistent params stay gathered (ds_persist)
    if e < FP32 or off_opt:
        out.add(opt_loc, M, part_total * FP32)  # fp32_partitioned_groups_flat
    else:
        out.notes.append("stage 3 fp32 without offload: the fp32 optimizer partition is the parameter partition itself (no separate master copy)")
    n_sub = max(1, math.ceil(part_total / max(1, z.sub_group_size)))
    out.add(opt_loc, O, optimizer_state_bytes(inp.optimizer, part_total, n_sub))
    # grad_partitions_flat_buffer (gradient_accumulation_dtype = model dtype by default)
    out.add(opt_loc if off_opt else "device", G, part_total * e)
    if z.contiguous_gradients:
        out.add("device", C, z.reduce_bucket_size * e)  # IPG bucket flat buffer, allocated at init
    gathered = min(total - persistent, largest + z.prefetch_bucket_size, z.max_live_parameters + largest)
    out.forward_extra = {P: gathered * e}
    out.backward_extra = {P: gathered * e, G: largest * e}
    out.backward_end_extra = {}
    out.step_extra = {G: (part_total * e + part_total * FP32) if e < FP32 else part_total * FP32}
    if off_opt:
        out.step_extra = {}
    out.step_temp = 0 if off_opt else (temp_factor * part_total * FP32 if cpu_single_tensor else (1 if temp_factor else 0) * part_total * FP32)
    out.notes.append(
        f"stage 3: {persistent:,} elements in params of <= {thr:,} elements stay gathered (persistence threshold); "
        f"working set of gathered parameters in forward/backward ~ {gathered:,} elements (largest parameter + prefetch bucket)"
    )
    return out
