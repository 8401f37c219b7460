"""Who owns which tensor storage: a walk over a DeepSpeed engine (or a plain model + optimizer).

The walk reads the real objects DeepSpeed keeps (engine.module, the ZeRO / BF16 / FP16 optimizer
wrappers and the inner torch optimizer) and maps every storage it finds to a memprof
:class:`~memprof.categories.Category` and :class:`~memprof.categories.Location`. It never walks the
garbage collector: it only follows the attributes listed below, so it is cheap enough to run at every
phase boundary.

Rules (the shared attribution contract, see docs/ownership.md for the attribute table):

* A storage is counted once, keyed on ``(device, untyped_storage().data_ptr())``, with the storage's
  full ``nbytes`` (so the padding of DeepSpeed's flat buffers is included once).
* A storage claimed by two categories goes to the first of ``params, master_params,
  optimizer_state, grads, comm_buffers`` (e.g. ZeRO-3 without a separate fp32 copy).
* Location is decided by ownership on a CPU-only run (every tensor is on the CPU there; states that
  DeepSpeed offloads are ``host``, the compute copy is ``device``). On an accelerator run the tensor's
  device decides: a CPU tensor is ``host``, anything else ``device``.

Attribute names were read from DeepSpeed 0.19.8 (``deepspeed/runtime/zero/stage_1_and_2.py``,
``zero/stage3.py``, ``zero/partition_parameters.py``, ``bf16_optimizer.py``,
``fp16/fused_optimizer.py``, ``fp16/unfused_optimizer.py``). Every read goes through ``getattr`` with
a default, so an attribute missing in another DeepSpeed version is skipped, not fatal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch

from memprof.categories import Breakdown, Category, Location, empty_breakdown

# A storage owned by two categories counts in the first of this order (shared contract).
_PRIORITY: dict[str, int] = {
    Category.PARAMS.value: 0,
    Category.MASTER_PARAMS.value: 1,
    Category.OPTIMIZER_STATE.value: 2,
    Category.GRADS.value: 3,
    Category.COMM_BUFFERS.value: 4,
    Category.ACTIVATIONS.value: 5,
}

PARAMS = Category.PARAMS.value
MASTER = Category.MASTER_PARAMS.value
OPT_STATE = Category.OPTIMIZER_STATE.value
GRADS = Category.GRADS.value
COMM = Category.COMM_BUFFERS.value


class Owned(NamedTuple):
    """One storage's owner: its category, where it lives and its size."""

    category: str  # a memprof.categories.Category value
    location: str  # "device" or "host"
    nbytes: int  # the untyped storage's nbytes


StorageKey = tuple[str, int]


def storage_key(t: torch.Tensor) -> StorageKey:
    """The identity of a tensor's underlying storage: views of one storage share it."""
    return (str(t.device), t.untyped_storage().data_ptr())


def _iter_tensors(obj: Any, depth: int = 3) -> Iterator[torch.Tensor]:
    """Tensors held in ``obj``: a tensor, or lists/tuples/dict values of them, a few levels deep.

    ``None`` entries are skipped (DeepSpeed keeps ``None`` in lists for freed or swapped buffers).
    An object with a ``flat_partition`` tensor (stage 1/2 ``GradPartitionBufferGroup``, a list of
    views of that flat buffer) yields the flat buffer too.
    """
    if obj is None or depth < 0:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    flat = getattr(obj, "flat_partition", None)
    if isinstance(flat, torch.Tensor):
        yield flat
    if isinstance(obj, dict):
        items: Iterable[Any] = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    else:
        return
    for item in items:
        yield from _iter_tensors(item, depth - 1)


class _Collector:
    """Accumulates ``storage key -> Owned``, applying the dedup and priority rules."""

    def __init__(self, compute_on_cpu: bool) -> None:
        self.compute_on_cpu = compute_on_cpu
        self.owned: dict[StorageKey, Owned] = {}

    def location(self, t: torch.Tensor, offloaded: bool) -> str:
        if self.compute_on_cpu:
            # Every tensor is on the CPU: only ownership (is this state offloaded?) tells them apart.
            return Location.HOST.value if offloaded else Location.DEVICE.value
        return Location.HOST.value if t.device.type == "cpu" else Location.DEVICE.value

    def add(self, obj: Any, category: str, offloaded: bool = False) -> None:
        for t in _iter_tensors(obj):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            nbytes = int(storage.nbytes())
            if nbytes == 0:  # freed ZeRO-3 params are torch.empty(0): nothing resident
                continue
            key = (str(t.device), storage.data_ptr())
            held = self.owned.get(key)
            if held is not None and _PRIORITY[held.category] <= _PRIORITY[category]:
                continue
            self.owned[key] = Owned(category, self.location(t, offloaded), nbytes)

    def add_grad_of(self, obj: Any, offloaded: bool = False) -> None:
        """The ``.grad`` of every tensor in ``obj`` (e.g. of the fp32 master partitions)."""
        for t in _iter_tensors(obj):
            self.add(t.grad, GRADS, offloaded)


def _inner_torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a DeepSpeed wrapper chain (each wrapper keeps its inner one at
    ``.optimizer``: DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer,
    FP16_Optimizer, FP16_UnfusedOptimizer); at ZeRO stage 0 fp32 ``engine.optimizer`` is the torch
    optimizer itself."""
    found: list[torch.optim.Optimizer] = []
    seen: set[int] = set()
    current = optimizer
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.optim.Optimizer):
            found.append(current)
        current = getattr(current, "optimizer", None)
    return found


def _walk_optimizer_state(col: _Collector, opt: torch.optim.Optimizer, offloaded_params: dict[int, bool],
                          default_offloaded: bool) -> None:
    """Every tensor in ``opt.state`` (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq,
    square_avg, sum and ``step`` when kept as a tensor), placed like the parameter it belongs to."""
    state = getattr(opt, "state", None)
    if not isinstance(state, dict):
        return
    for param, per_param in list(state.items()):
        offloaded = offloaded_params.get(id(param), default_offloaded)
        if isinstance(per_param, dict):
            for value in per_param.values():
                col.add(value, OPT_STATE, offloaded)


def _walk_module(col: _Collector, module: torch.nn.Module, offload_param: bool) -> None:
    """The model's parameters: compute copies, their ZeRO-3 partitions, and their gradients."""
    for p in module.parameters():
        # ZeRO-3 (partition_parameters.py, _partition_param): `ds_tensor` is this rank's partition;
        # persistent params (`ds_persist`, numel <= stage3_param_persistence_threshold) keep their
        # partition on the compute device even with offload_param, the others go to `remote_device`.
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is not None:
            col.add(ds_tensor, PARAMS, offload_param and not getattr(p, "ds_persist", False))
        # param.data: the full parameter at stage 0-2 (a view of the flat bit16 buffer at stage 1/2);
        # at ZeRO-3 non-empty only while gathered or persistent (free_param sets torch.empty(0)).
        col.add(p.data, PARAMS, False)
        col.add(p.grad, GRADS, False)
        # stage_1_and_2.py: `param.grad_accum` holds the fp32 accumulation of a low-precision grad
        # (use_grad_accum_attribute, ZeRO-1 with grad_accum_dtype != param dtype).
        col.add(getattr(p, "grad_accum", None), GRADS, False)
    # Module buffers (e.g. the Llama family's rotary `inv_freq` / `original_inv_freq`): model tensors
    # the forward reads, never partitioned or offloaded by ZeRO; DeepSpeed keeps them fp32 under
    # bf16/fp16 (engine._configure_distributed_model casts parameters only). Counted as params.
    for b in module.buffers():
        col.add(b, PARAMS, False)


def _walk_zero_1_2(col: _Collector, zo: Any) -> None:
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
    # tensors (two with overlap_comm), allocated in setup_buckets, cleared after backward.
    for bucket in list((getattr(zo, "ipg_buckets", None) or {}).values()):
        col.add(getattr(bucket, "buffer", None), COMM)
    # Offload staging: low-precision copy of the updated partition before the all-gather, and the
    # largest-param-sized gradient transfer buffers (CPU side and accelerator side).
    col.add(getattr(zo, "param_buffer_of_bit16_for_cpu_offload_groups", None), COMM, offload)
    col.add(getattr(zo, "temp_grad_buffer_for_cpu_offload", None), COMM, offload)
    col.add(getattr(zo, "temp_grad_buffer_for_gpu_offload", None), COMM, False)
    # Muon all-gather cache: OrderedDict key -> (local_buffer, gathered_buffer, nbytes).
    col.add(getattr(zo, "_muon_allgather_buffers", None), COMM)


def _walk_zero_3(col: _Collector, zo: Any) -> dict[int, bool]:
    """DeepSpeedZeroOptimizer_Stage3 (stage3.py); returns id(master partition) -> offloaded."""
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
        col.add(getattr(bucket, "buffer", None), COMM)
    # Muon momentum kept beside the optimizer state (also referenced from optimizer.state).
    col.add(getattr(zo, "muon_momentum_buffer_partitioned_groups_flat", None), OPT_STATE, offload_opt)
    col.add(getattr(zo, "_muon_allgather_buffers", None), COMM)
    return offloaded_by_id


def _walk_bf16_optimizer(col: _Collector, bo: Any) -> None:
    """BF16_Optimizer (bf16_optimizer.py): ZeRO-1 bf16 with fp32 gradient accumulation."""
    col.add(getattr(bo, "bf16_groups_flat", None), PARAMS)  # flat bf16 params, padded to 2*N
    masters = getattr(bo, "fp32_groups_flat_partition", None)  # fp32 master partition
    col.add(masters, MASTER)
    col.add_grad_of(masters)
    # fp32 gradient accumulator of the WHOLE flat group (not partitioned), kept for the run.
    col.add(getattr(bo, "fp32_groups_gradients_flat", None), GRADS)


def _walk_fp16_optimizers(col: _Collector, fo: Any) -> None:
    """FP16_Optimizer (fused) and FP16_UnfusedOptimizer (fp16/), also used for bf16 at stage 0."""
    col.add(getattr(fo, "fp16_groups_flat", None), PARAMS)  # fused: flat low-precision params
    col.add(getattr(fo, "fp16_groups", None), PARAMS)  # lists of the model's low-precision params
    for name in ("fp32_groups_flat", "fp32_groups"):  # fused: flat fp32 master; unfused: per param
        masters = getattr(fo, name, None)
        col.add(masters, MASTER)
        col.add_grad_of(masters)


def owned_storages(engine: Any = None, *, model: torch.nn.Module | None = None,
                   optimizer: Any = None) -> dict[StorageKey, Owned]:
    """Every storage that the engine (or the model and optimizer) holds, with its owner.

    Pass a DeepSpeed engine, or a plain ``model`` and/or torch ``optimizer`` (or a DeepSpeed
    optimizer wrapper). Activations and ``other`` are not found here: they are what a tracker
    measures beyond these storages.
    """
    if engine is not None:
        model = model if model is not None else getattr(engine, "module", None)
        optimizer = optimizer if optimizer is not None else getattr(engine, "optimizer", None)
    compute_device = getattr(engine, "device", None) if engine is not None else None
    if compute_device is None and model is not None:
        compute_device = next((p.device for p in model.parameters()), None)
    compute_on_cpu = compute_device is None or torch.device(compute_device).type == "cpu"
    col = _Collector(compute_on_cpu)

    offloaded_by_id: dict[int, bool] = {}
    default_offloaded = False
    if optimizer is not None:
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
            offloaded_by_id = _walk_zero_3(col, optimizer)
            default_offloaded = bool(getattr(optimizer, "offload_optimizer", False))
        elif hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            _walk_zero_1_2(col, optimizer)
            default_offloaded = bool(getattr(optimizer, "cpu_offload", False))
        elif hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
            _walk_bf16_optimizer(col, optimizer)
        elif hasattr(optimizer, "fp32_groups_flat") or hasattr(optimizer, "fp32_groups"):  # FP16
            _walk_fp16_optimizers(col, optimizer)

    # The module after the optimizer's own buffers: with ZeRO-3 offload_param even persistent
    # params' partitions are views of the CPU flat buffer, whose location the optimizer walk set.
    # stage3.py: `offload_param` (bool) says non-persistent partitions live on the CPU.
    if model is not None:
        _walk_module(col, model, bool(getattr(optimizer, "offload_param", False)))

    inner = _inner_torch_optimizers(optimizer)
    # DeepSpeed keeps the optimizer it first built at `engine.basic_optimizer`; ZeRO-1/2 replaces
    # an Adagrad with a new one over the fp32 partitions (initialize_optimizer_states), leaving the
    # first one, with its full-size `sum` state, alive there: it is held memory, so it is counted.
    basic = getattr(engine, "basic_optimizer", None) if engine is not None else None
    if isinstance(basic, torch.optim.Optimizer) and all(basic is not o for o in inner):
        inner.append(basic)
    for opt in inner:
        _walk_optimizer_state(col, opt, offloaded_by_id, default_offloaded)
        # What the inner optimizer updates is the master copy when it is not a model parameter
        # (catches a wrapper this walk does not know); model params were claimed first above.
        for group in getattr(opt, "param_groups", None) or []:
            params = group.get("params", []) if isinstance(group, dict) else []
            for p in params:
                offloaded = offloaded_by_id.get(id(p), default_offloaded)
                col.add(p, MASTER, offloaded)
                col.add(getattr(p, "grad", None), GRADS, offloaded)
    return col.owned


def owned_breakdown(owned: dict[StorageKey, Owned]) -> Breakdown:
    """Bytes per location and category, every location and category present."""
    out = empty_breakdown()
    for item in owned.values():
        out[item.location][item.category] += int(item.nbytes)
    return out


class DdpBuckets:
    """torch DDP's gradient buckets, which no walk of Python objects reaches.

    ``DistributedDataParallel`` (torch/nn/parallel/distributed.py) hands its parameters to a C++
    ``Reducer``, which allocates one flat bucket tensor per bucket when DDP is built (and again
    when ``_pre_forward`` rebuilds them after the first iteration, unless ``find_unused_parameters``
    or ``static_graph``); with ``gradient_as_bucket_view=False`` (the default, and HF Trainer's /
    accelerate's) every gradient is copied into its bucket for the all-reduce, so the buckets hold
    one element per trainable parameter for the run. Only C++ holds them, so an allocation tracker
    started after DDP was built never sees them, and an ownership walk cannot find them.

    :meth:`owned` names them as ``comm_buffers`` under keys no storage has (negative pointers), so
    the profiler counts them from their size as alive throughout (its "owned but untracked" rule),
    sized from DDP's own record (``_get_ddp_logging_data()["bucket_sizes"]``, bytes per bucket).
    Built when tracking starts; if DDP rebuilds its buckets later, the tracker sees the new ones
    being allocated (as ``activations``, then ``other``) and they are no longer named here.
    ``gradient_as_bucket_view=True`` makes the gradients views of the buckets, which the walk finds
    as ``grads`` while they exist: nothing is named here then (docs/integrations.md).
    """

    def __init__(self, ddp: Any) -> None:
        self.ddp = ddp
        self.rebuilt_before_tracking = bool(getattr(ddp, "_has_rebuilt_buckets", False))
        self.gradient_as_bucket_view = bool(getattr(ddp, "gradient_as_bucket_view", False))
        params = [p for p in ddp.parameters() if p.requires_grad]
        self.device = str(params[0].device) if params else "cpu"

    def bucket_bytes(self) -> list[int]:
        """Bytes of each bucket as DDP records them (its rebuilt sizes once rebuilt)."""
        data = self.ddp._get_ddp_logging_data()
        sizes = data.get("rebuilt_bucket_sizes") if data.get("has_rebuilt_buckets") else None
        sizes = sizes or data.get("bucket_sizes") or ""
        return [int(s) for s in str(sizes).replace(",", " ").split() if s.strip().isdigit()]

    def owned(self) -> dict[StorageKey, Owned]:
        if self.gradient_as_bucket_view:
            return {}
        if not self.rebuilt_before_tracking and getattr(self.ddp, "_has_rebuilt_buckets", False):
            return {}  # rebuilt while tracking: the tracker counts the new buckets itself
        return {(self.device, -(i + 1)): Owned(COMM, "device", n) for i, n in enumerate(self.bucket_bytes())}
