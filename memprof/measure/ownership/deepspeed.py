"""The walk of DeepSpeed's optimizer wrappers: ZeRO-1/2, ZeRO-3, BF16_Optimizer and the FP16 ones.

Each wrapper keeps the flat buffers, master partitions, gradient partitions and reduce buckets it
allocates in attributes listed below (docs/ownership.md has the table). The model's own parameters
and the inner torch optimizer are walked by ``plain_torch.py``, as for any engine.

Attribute names were read from DeepSpeed 0.19.8 (``deepspeed/runtime/zero/stage_1_and_2.py``,
``zero/stage3.py``, ``zero/partition_parameters.py``, ``bf16_optimizer.py``,
``fp16/fused_optimizer.py``, ``fp16/unfused_optimizer.py``). Every read goes through ``getattr`` with
a default, so an attribute missing in another DeepSpeed version is skipped, not fatal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memprof.measure.ownership.core import COMM, GRADS, MASTER, OPT_STATE, PARAMS, Collector, Placement


def _walk_zero_1_2(col: Collector, zo: Any) -> Placement:
    """DeepSpeedZeroOptimizer (stage_1_and_2.py)."""
    # `cpu_offload` is True when offload_optimizer.device is cpu (stage_1_and_2.py __init__).
    offload = bool(getattr(zo, "cpu_offload", False))
    # The flat low-precision (or fp32) buffer per param group; model params are views into it.
    col.add(getattr(zo, "bit16_groups_flat", None), PARAMS)
    # fp32 master partition this rank updates; on `self.device` ('cpu' under offload).
    masters = getattr(zo, "single_partition_of_fp32_groups", None)
    col.add(masters, MASTER, offload)
    # Its `.grad`: the fp32 gradient partition, alive only inside step() unless offloaded
    # (initialize_optimizer_states keeps it for cpu_offload).
    col.add_grad_of(masters, offload)
    # Gradient partitions averaged across ranks: dict group -> list of tensors (or a
    # GradPartitionBufferGroup with a `flat_partition`), None after step().
    col.add(getattr(zo, "averaged_gradients", None), GRADS)
    # Accumulated full gradients of params in this partition (ZeRO-1 path), None after use.
    col.add(getattr(zo, "all_grad_tensors", None), GRADS)
    # ZeRO-2 contiguous gradient partition (copy_grads_in_partition), released after backward.
    col.add(getattr(zo, "grads_in_partition", None), GRADS)
    # Offload: per-param fp32 gradient accumulators on the CPU.
    col.add(getattr(zo, "accumulated_grads_in_cpu", None), GRADS, offload)
    # Reduce buckets: dict dtype -> IPGBucket whose `.buffer` is a list of reduce_bucket_size
    # tensors (two with overlap_comm), allocated in setup_buckets, cleared after backward. With
    # contiguous_gradients params' .grad are views of it until reduced: the bucket wins (Collector.claim).
    for bucket in list((getattr(zo, "ipg_buckets", None) or {}).values()):
        col.claim(getattr(bucket, "buffer", None), COMM)
    # Offload staging: low-precision copy of the updated partition before the all-gather, and the
    # largest-param-sized gradient transfer buffers (CPU side and accelerator side).
    col.add(getattr(zo, "param_buffer_of_bit16_for_cpu_offload_groups", None), COMM, offload)
    col.add(getattr(zo, "temp_grad_buffer_for_cpu_offload", None), COMM, offload)
    col.add(getattr(zo, "temp_grad_buffer_for_gpu_offload", None), COMM, False)
    # Muon all-gather cache: OrderedDict key -> (local_buffer, gathered_buffer, nbytes).
    col.add(getattr(zo, "_muon_allgather_buffers", None), COMM)
    return Placement({}, offload)


def _walk_zero_3(col: Collector, zo: Any) -> Placement:
    """DeepSpeedZeroOptimizer_Stage3 (stage3.py)."""
    offload_opt = bool(getattr(zo, "offload_optimizer", False))
    offload_param = bool(getattr(zo, "offload_param", False))
    # Flat buffer of all parameter partitions (defragment()); ds_tensors are views into it.
    col.add(getattr(zo, "lp_param_buffer", None), PARAMS)
    # Per sub-group views of that buffer, or with offload_param of the CPU flat buffers below.
    col.add(getattr(zo, "fp16_partitioned_groups_flat", None), PARAMS, offload_param)
    col.add(getattr(zo, "param_groups_fp16_flat_cpu_memory", None), PARAMS, offload_param)
    # Pinned copies made by offload_states() (dynamic offload of states between steps).
    col.add(getattr(zo, "lp_param_contiguous_pin_buffer", None), PARAMS, True)
    col.add(getattr(zo, "lp_grad_partitions_flat_pin_buffers", None), GRADS, True)
    # fp32 master partitions per sub-group; with offload_optimizer each sub-group goes to
    # `subgroup_to_device[i]` ('cpu' unless partial offload keeps it on the accelerator).
    subgroup_to_device = getattr(zo, "subgroup_to_device", None) or {}
    masters = list(getattr(zo, "fp32_partitioned_groups_flat", None) or [])
    offloaded_by_id: dict[int, bool] = {}
    for i, master in enumerate(masters):
        offloaded = offload_opt and subgroup_to_device.get(i, "cpu") == "cpu"
        if master is not None:
            offloaded_by_id[id(master)] = offloaded
        col.add(master, MASTER, offloaded)
        col.add(getattr(master, "grad", None), GRADS, offloaded)
    # fp32 (grad_accum_dtype) gradient partitions of every param, one flat buffer on `self.device`.
    col.add(getattr(zo, "grad_partitions_flat_buffer", None), GRADS, offload_opt)
    col.add(getattr(zo, "averaged_gradients", None), GRADS, offload_opt)
    # IPG reduce bucket: dict dtype -> IPGBucketZ3 with one `.buffer` of reduce_bucket_size
    # elements, allocated once in _setup_for_real_optimizer and kept for the whole run.
    for bucket in list((getattr(zo, "ipg_buckets", None) or {}).values()):
        col.claim(getattr(bucket, "buffer", None), COMM)
    # Muon momentum kept beside the optimizer state (also referenced from optimizer.state).
    col.add(getattr(zo, "muon_momentum_buffer_partitioned_groups_flat", None), OPT_STATE, offload_opt)
    col.add(getattr(zo, "_muon_allgather_buffers", None), COMM)
    return Placement(offloaded_by_id, offload_opt)


def _walk_bf16_optimizer(col: Collector, bo: Any) -> Placement:
    """BF16_Optimizer (bf16_optimizer.py): ZeRO-1 bf16 with fp32 gradient accumulation."""
    col.add(getattr(bo, "bf16_groups_flat", None), PARAMS)  # flat bf16 params, padded to 2*N
    masters = getattr(bo, "fp32_groups_flat_partition", None)  # fp32 master partition
    col.add(masters, MASTER)
    col.add_grad_of(masters)
    # fp32 gradient accumulator of the WHOLE flat group (not partitioned), kept for the run.
    col.add(getattr(bo, "fp32_groups_gradients_flat", None), GRADS)
    return Placement({}, False)


def _walk_fp16_optimizers(col: Collector, fo: Any) -> Placement:
    """FP16_Optimizer (fused) and FP16_UnfusedOptimizer (fp16/), also used for bf16 at stage 0."""
    col.add(getattr(fo, "fp16_groups_flat", None), PARAMS)  # fused: flat low-precision params
    col.add(getattr(fo, "fp16_groups", None), PARAMS)  # lists of the model's low-precision params
    for name in ("fp32_groups_flat", "fp32_groups"):  # fused: flat fp32 master; unfused: per param
        masters = getattr(fo, name, None)
        col.add(masters, MASTER)
        col.add_grad_of(masters)
    return Placement({}, False)


# (does this object look like the wrapper, its walk), first match wins: ZeRO-3 before ZeRO-1/2, whose
# wrapper it does not subclass but whose attribute names partly overlap.
OPTIMIZER_WALKS: tuple[tuple[Callable[[Any], bool], Callable[[Collector, Any], Placement]], ...] = (
    (lambda o: hasattr(o, "fp32_partitioned_groups_flat"), _walk_zero_3),  # ZeRO-3
    (lambda o: hasattr(o, "single_partition_of_fp32_groups"), _walk_zero_1_2),  # ZeRO-1/2
    (lambda o: hasattr(o, "fp32_groups_flat_partition"), _walk_bf16_optimizer),  # BF16_Optimizer
    (lambda o: hasattr(o, "fp32_groups_flat") or hasattr(o, "fp32_groups"), _walk_fp16_optimizers),  # FP16
)


def walk_optimizer_wrapper(col: Collector, optimizer: Any) -> Placement | None:
    """Walk ``optimizer`` if it is one of DeepSpeed's wrappers; None if it is not."""
    for matches, walk in OPTIMIZER_WALKS:
        if matches(optimizer):
            return walk(col, optimizer)
    return None


def first_built_optimizer(engine: Any, inner: list[torch.optim.Optimizer]) -> torch.optim.Optimizer | None:
    """DeepSpeed keeps the optimizer it first built at ``engine.basic_optimizer``; ZeRO-1/2 replaces
    an Adagrad with a new one over the fp32 partitions (initialize_optimizer_states), leaving the
    first one, with its full-size ``sum`` state, alive there: it is held memory, so it is counted.
    None when it is one of ``inner`` already (or there is none)."""
    basic = getattr(engine, "basic_optimizer", None) if engine is not None else None
    if isinstance(basic, torch.optim.Optimizer) and all(basic is not o for o in inner):
        return basic
    return None
