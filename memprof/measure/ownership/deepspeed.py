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

from memprof.measure.ownership.core import COMM, GRADS, OPT_STATE, PARAMS, Collector, Placement


def _walk_zero_1_2(col: Collector, zo: Any) -> Placement:
    """DeepSpeedZeroOptimizer (stage_1_and_2.py)."""
    # `cpu_offload` is True when offload_optimizer.device is cpu (stage_1_and_2.py __init__).
    offload = bool(getattr(zo, "cpu_offload", False))
    # The flat low-precision (or fp32) buffer per param group; model params are views into it.
    col.add_each(getattr(zo, "bit16_groups_flat", None), PARAMS, "bit16 flat params, group {}")
    # fp32 master partition this rank updates; on `self.device` ('cpu' under offload). Its
    # `.grad`: the fp32 gradient partition, alive only inside step() unless offloaded
    # (initialize_optimizer_states keeps it for cpu_offload).
    col.add_masters(getattr(zo, "single_partition_of_fp32_groups", None), "fp32 partition, group {}", offload)
    # Gradient partitions averaged across ranks: dict group -> list of tensors (or a
    # GradPartitionBufferGroup with a `flat_partition`), None after step().
    col.add_each(getattr(zo, "averaged_gradients", None), GRADS, "averaged gradient partition, group {}")
    # Accumulated full gradients of params in this partition (ZeRO-1 path), None after use.
    col.add_each(getattr(zo, "all_grad_tensors", None), GRADS, "accumulated gradients (all_grad_tensors), group {}")
    # ZeRO-2 contiguous gradient partition (copy_grads_in_partition), released after backward:
    # sized by the params in this rank's partition, so it differs between ranks.
    col.add(getattr(zo, "grads_in_partition", None), GRADS, False, "grads_in_partition (this rank's gradients)")
    # Offload: per-param fp32 gradient accumulators on the CPU.
    col.add(getattr(zo, "accumulated_grads_in_cpu", None), GRADS, offload, "CPU gradient accumulators")
    # Reduce buckets: dict dtype -> IPGBucket whose `.buffer` is a list of reduce_bucket_size
    # tensors (two with overlap_comm), allocated in setup_buckets, cleared after backward. With
    # contiguous_gradients params' .grad are views of it until reduced: the bucket wins (Collector.claim).
    _claim_buckets(col, zo)
    # Offload staging: low-precision copy of the updated partition before the all-gather, and the
    # largest-param-sized gradient transfer buffers (CPU side and accelerator side).
    col.add(getattr(zo, "param_buffer_of_bit16_for_cpu_offload_groups", None), COMM, offload,
            "offload staging: bit16 partition copy")
    col.add(getattr(zo, "temp_grad_buffer_for_cpu_offload", None), COMM, offload, "offload staging: gradient buffer (host)")
    col.add(getattr(zo, "temp_grad_buffer_for_gpu_offload", None), COMM, False, "offload staging: gradient buffer (device)")
    # Muon all-gather cache: OrderedDict key -> (local_buffer, gathered_buffer, nbytes).
    col.add(getattr(zo, "_muon_allgather_buffers", None), COMM, False, "muon all-gather cache")
    return Placement({}, offload)


def _claim_buckets(col: Collector, zo: Any) -> None:
    """The IPG reduce buckets, named by dtype and index (two per dtype with overlap_comm)."""
    for dtype, bucket in list((getattr(zo, "ipg_buckets", None) or {}).items()):
        buffers = getattr(bucket, "buffer", None)
        name = f"ipg reduce bucket {str(dtype).removeprefix('torch.')}"
        if isinstance(buffers, (list, tuple)) and len(buffers) > 1:
            for i, b in enumerate(buffers):
                col.claim(b, COMM, False, f"{name} #{i}")
        else:
            col.claim(buffers, COMM, False, name)


def _walk_zero_3(col: Collector, zo: Any) -> Placement:
    """DeepSpeedZeroOptimizer_Stage3 (stage3.py)."""
    offload_opt = bool(getattr(zo, "offload_optimizer", False))
    offload_param = bool(getattr(zo, "offload_param", False))
    # Flat buffer of all parameter partitions (defragment()); ds_tensors are views into it.
    col.add(getattr(zo, "lp_param_buffer", None), PARAMS, False, "param partitions (flat lp_param_buffer)")
    # Per sub-group views of that buffer, or with offload_param of the CPU flat buffers below.
    col.add_each(getattr(zo, "fp16_partitioned_groups_flat", None), PARAMS, "param partitions, sub-group {}", offload_param)
    col.add_each(getattr(zo, "param_groups_fp16_flat_cpu_memory", None), PARAMS, "param partitions (host flat buffer {})",
                 offload_param)
    # Pinned copies made by offload_states() (dynamic offload of states between steps).
    col.add(getattr(zo, "lp_param_contiguous_pin_buffer", None), PARAMS, True, "pinned copy of param partitions")
    col.add(getattr(zo, "lp_grad_partitions_flat_pin_buffers", None), GRADS, True, "pinned copy of gradient partitions")
    # fp32 master partitions per sub-group; with offload_optimizer each sub-group goes to
    # `subgroup_to_device[i]` ('cpu' unless partial offload keeps it on the accelerator).
    subgroup_to_device = getattr(zo, "subgroup_to_device", None) or {}
    masters = list(getattr(zo, "fp32_partitioned_groups_flat", None) or [])
    offloaded_by_id: dict[int, bool] = {}
    for i, master in enumerate(masters):
        offloaded = offload_opt and subgroup_to_device.get(i, "cpu") == "cpu"
        if master is not None:
            offloaded_by_id[id(master)] = offloaded
        col.add_masters([master] if master is not None else None, f"fp32 partition, sub-group {i}", offloaded)
    # fp32 (grad_accum_dtype) gradient partitions of every param, one flat buffer on `self.device`.
    col.add(getattr(zo, "grad_partitions_flat_buffer", None), GRADS, offload_opt, "gradient partitions (flat buffer)")
    col.add_each(getattr(zo, "averaged_gradients", None), GRADS, "averaged gradient partition, sub-group {}", offload_opt)
    # IPG reduce bucket: dict dtype -> IPGBucketZ3 with one `.buffer` of reduce_bucket_size
    # elements, allocated once in _setup_for_real_optimizer and kept for the whole run.
    _claim_buckets(col, zo)
    # Muon momentum kept beside the optimizer state (also referenced from optimizer.state).
    col.add_each(getattr(zo, "muon_momentum_buffer_partitioned_groups_flat", None), OPT_STATE,
                 "muon momentum, sub-group {}", offload_opt)
    col.add(getattr(zo, "_muon_allgather_buffers", None), COMM, False, "muon all-gather cache")
    _walk_inflight_gathers(col, zo)
    return Placement(offloaded_by_id, offload_opt)


INFLIGHT_GATHER = "all-gather buffer in flight"
"""The owner name (its prefix) of a ZeRO-3 all-gather's output held by its handle (below)."""


def inflight_registries(zo: Any) -> list[Any]:
    """ZeRO-3's registry of parameters in flight (param -> its all-gather handle): one per model,
    kept on the module (parameter_offload.py:198-200, ``module.ds_inflight_param_registry``) and
    handed to the coordinator (``__inflight_param_registry``, partitioned_param_coordinator.py:104)."""
    found: list[Any] = []
    coordinator = getattr(getattr(zo, "parameter_offload", None), "param_coordinator", None)
    for holder, name in ((getattr(zo, "module", None), "ds_inflight_param_registry"),
                         (coordinator, "_PartitionedParameterCoordinator__inflight_param_registry")):
        registry = getattr(holder, name, None) if holder is not None else None
        if registry is not None and all(registry is not r for r in found):
            found.append(registry)
    return found


def _walk_inflight_gathers(col: Collector, zo: Any) -> None:
    """The output buffers of ZeRO-3's all-gathers still in flight, ``comm_buffers``.

    The coordinator's prefetch (partitioned_param_coordinator.py __all_gather_params_, 582-622)
    all-gathers a bucket of parameters in one call and registers the same handle under each of
    them; ``_fetch_sub_module_impl`` pops a parameter's handle when its module runs (406). An
    ``AllGatherCoalescedHandle`` keeps ``partitions``, views of the call's flat output
    (partition_parameters.py ``_all_gather_dtype`` 1343-1370: ``partition_sz * world_size``
    elements of the all-gather dtype); ``wait()`` copies each parameter out of them (``torch.cat``,
    795) but the handle still holds them, so the flat buffer lives until the bucket's last
    parameter is consumed and its handle leaves the registry. Nothing else holds it: no other walk
    reaches it. Single-parameter gathers (``AllGatherHandle``, 1373-1444) gather into a buffer the
    parameter's data is a view of (params, from the module walk), except across a dtype change,
    where the handle keeps it (``param_buffer``); quantized gathers keep the quantized copy and the
    scales (``QuantizationInfo``)."""
    handles: dict[int, Any] = {}
    for registry in inflight_registries(zo):
        for handle in list(getattr(registry, "values", lambda: [])()):
            for h in getattr(handle, "handles", None) or [handle]:  # MultipleAllGatherHandles: one per process group
                handles.setdefault(id(h), h)
    for h in handles.values():
        params = [p for p in getattr(h, "params", None) or [getattr(h, "_AllGatherHandle__param", None)] if p is not None]
        # named by its bucket: a bucket's parameters need not have consecutive ds_ids (a prefetch
        # skips those already gathered), so the first id and the count, not a range
        ids = sorted(i for i in (getattr(p, "ds_id", None) for p in params) if isinstance(i, int))
        owner = f"{INFLIGHT_GATHER} ({len(params)} params from ds_id {ids[0]})" if ids else INFLIGHT_GATHER
        col.add(getattr(h, "partitions", None), COMM, False, owner)
        col.add(getattr(h, "_AllGatherHandle__param_buffer", None), COMM, False, owner)
        quantization = getattr(h, "quantization", None) or getattr(h, "_AllGatherHandle__quantization", None)
        if quantization is not None:
            col.add([getattr(quantization, "quantized_param", None), getattr(quantization, "scale_buffer", None)], COMM,
                    False, owner)


def _walk_bf16_optimizer(col: Collector, bo: Any) -> Placement:
    """BF16_Optimizer (bf16_optimizer.py): ZeRO-1 bf16 with fp32 gradient accumulation."""
    col.add_each(getattr(bo, "bf16_groups_flat", None), PARAMS, "bf16 flat params, group {}")  # padded to 2*N
    col.add_masters(getattr(bo, "fp32_groups_flat_partition", None), "fp32 partition, group {}")  # fp32 master partition
    # fp32 gradient accumulator of the WHOLE flat group (not partitioned), kept for the run.
    col.add_each(getattr(bo, "fp32_groups_gradients_flat", None), GRADS, "fp32 gradient accumulator (whole group), group {}")
    return Placement({}, False)


def _walk_fp16_optimizers(col: Collector, fo: Any) -> Placement:
    """FP16_Optimizer (fused) and FP16_UnfusedOptimizer (fp16/), also used for bf16 at stage 0."""
    col.add_each(getattr(fo, "fp16_groups_flat", None), PARAMS, "low-precision flat params, group {}")  # fused
    # unfused: lists of the model's low-precision params, named after each by the module walk
    col.add(getattr(fo, "fp16_groups", None), PARAMS)
    # fused: flat fp32 master per group; unfused: one fp32 master per param
    col.add_masters(getattr(fo, "fp32_groups_flat", None), "fp32 master (flat), group {}")
    col.add_masters(getattr(fo, "fp32_groups", None), "fp32 master params, group {}")
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
