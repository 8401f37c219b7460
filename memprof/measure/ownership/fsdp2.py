"""torch FSDP2 (``torch.distributed.fsdp.fully_shard``): its sharded and gathered parameters, its
gradients and its collective buffers, named from the objects FSDP2 keeps (torch 2.13,
torch/distributed/fsdp/_fully_shard/).

Every ``fully_shard``-ed module is an ``FSDPModule``; its ``FSDPState`` keeps one
``FSDPParamGroup`` per call (``_fsdp_state.py``: ``FSDPState._fsdp_param_groups``), each with one
``FSDPParam`` per parameter (``_fsdp_param_group.py``: ``FSDPParamGroup.fsdp_params``):

* ``FSDPParam._sharded_param_data``: this rank's dim-0 chunk, padded to the size of chunk 0
  (``_fsdp_param.py``: ``FSDPParam._init_sharded_param``, ``padded_sharded_param.view(-1)``); the
  ``sharded_param`` DTensor's local tensor is a view of it -> ``params`` (``host`` under
  ``CPUOffloadPolicy``, ``offload_to_cpu``);
* ``FSDPParam.all_gather_outputs``: the unsharded parameter while gathered, padded (numel x world
  size, in ``param_dtype``; ``init_all_gather_outputs``), storage resized to 0 once resharded
  (``free_unsharded_param`` -> ``free_storage``) -> ``params``; ``_sharded_post_forward_param_data``
  (``reshard_after_forward`` an int) likewise;
* ``sharded_param.grad``: a DTensor whose local tensor is a view of the reduce-scatter output
  (``_fsdp_collectives.py``: ``foreach_reduce``, ``torch.as_strided(reduce_output, ...)``), or its
  cast to the original dtype -> ``grads``; ``_unsharded_param.grad`` and
  ``unsharded_accumulated_grad`` (a block's gradients before the reduce-scatter) -> ``grads``;
* ``FSDPParamGroup._all_gather_result`` (an issued all-gather: ``foreach_all_gather``'s flat
  ``all_gather_output``), ``FSDPCommContext.all_gather_state`` (the previous block's output, kept
  for overlap in forward: ``wait_for_unshard``), ``FSDPCommContext.reduce_scatter_states`` (the
  reduce-scatter inputs kept until the next block's reduce: ``post_backward``),
  ``_all_reduce_state`` / ``_partial_reduce_output`` (HSDP only) -> ``comm_buffers``.

The reduce-scatter output is the sharded gradient (``grads``, which outranks ``comm_buffers``); the
bf16 copy-in buffer of a mixed-precision all-gather (``_get_param_all_gather_inputs``'
``flat_foreach_copy_input``) lives only inside ``foreach_all_gather`` and no object keeps it: the
allocation tracker sees it (as ``activations`` in forward/backward).

A layout memprof does not model is refused in one line naming it (:func:`check_supported`).
"""

from __future__ import annotations

from typing import Any

import torch

from memprof.errors import MemprofError
from memprof.measure.dispatch_tracker import label_of
from memprof.measure.ownership.core import COMM, GRADS, PARAMS, Collector

_GATHERED = label_of("device", PARAMS)  # the tracker label of a gathered (unsharded) parameter
_COMM = label_of("device", COMM)  # ... and of a flat all-gather output

try:  # torch >= 2.6 exports both; older torch has no FSDP2 to walk
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
except ImportError:  # pragma: no cover - torch without FSDP2
    FSDPModule = None  # type: ignore[assignment,misc]
    CPUOffloadPolicy = None  # type: ignore[assignment,misc]


def fsdp_modules(model: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The ``fully_shard``-ed modules of ``model`` (itself included), in ``modules()`` order."""
    if model is None or FSDPModule is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp2_model(model: torch.nn.Module | None) -> bool:
    return bool(fsdp_modules(model))


def param_groups(model: torch.nn.Module | None) -> list[Any]:
    """Every ``FSDPParamGroup`` of the model's FSDP2 modules (a module with no parameters of its
    own has none)."""
    groups: list[Any] = []
    for module in fsdp_modules(model):
        state = module._get_fsdp_state()  # FSDPModule._get_fsdp_state (torch _fully_shard.py)
        groups.extend(getattr(state, "_fsdp_param_groups", None) or [])
    return groups


def _local(t: Any) -> Any:
    """A DTensor's local shard (``DTensor.to_local()`` without autograd); anything else as is."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def _param_name(fp: Any) -> str:
    """``<module class>.<parameter>`` of an FSDPParam (its fqn is set only at lazy init)."""
    info = getattr(fp, "_module_info", None)
    module = type(getattr(info, "module", None)).__name__
    return getattr(fp, "_param_fqn", None) or f"{module}.{getattr(info, 'param_name', '?')}"


def check_supported(model: torch.nn.Module | None) -> None:
    """MemprofError, one line, for an FSDP2 layout memprof does not model: HSDP / replicate meshes
    (2-D or DDP mesh), sharding on a dim other than 0 (``shard_placement_fn``), DTensor (tensor
    parallel) parameters under FSDP2, ``reshard_after_forward`` as an int (a post-forward mesh)."""
    for group in param_groups(model):
        where = getattr(group, "_module_fqn", "") or ", ".join(type(m).__name__ for m in getattr(group, "modules", ()))
        mesh = getattr(getattr(group, "mesh_info", None), "mesh", None)
        if mesh is not None and mesh.ndim != 1:
            raise MemprofError(f"FSDP2 on a {mesh.ndim}-D device mesh (HSDP) at {where}: memprof models "
                               "fully_shard on a 1-D mesh only")
        if getattr(group, "_use_post_forward_mesh", False):
            raise MemprofError(f"FSDP2 reshard_after_forward as an int (a post-forward mesh) at {where}: memprof "
                               "models reshard_after_forward True or False only")
        for fp in group.fsdp_params:
            dim = getattr(getattr(fp, "fsdp_placement", None), "dim", 0)
            if dim != 0:
                raise MemprofError(f"FSDP2 sharding {_param_name(fp)} on dim {dim} (shard_placement_fn) at {where}: "
                                   "memprof models FSDP2's default dim-0 sharding only")
            if getattr(fp, "is_dtensor", False):
                raise MemprofError(f"FSDP2 over DTensor parameter {_param_name(fp)} (tensor parallel) at {where}: "
                                   "memprof models fully_shard over plain parameters only")


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def fsdp2_record(model: torch.nn.Module | None) -> dict[str, Any] | None:
    """What the run records of an FSDP2 model (``run["fsdp2"]``), or None for any other model:
    ``reshard_after_forward`` (of the non-root groups: torch keeps the root's gathered after
    forward, ``_fully_shard.py``: ``fully_shard``'s root rule), the ``MixedPrecisionPolicy`` dtypes
    (None: the parameter's own dtype), ``offload_params`` ("cpu" under ``CPUOffloadPolicy``) and the
    number of groups. Refuses a layout memprof does not model (:func:`check_supported`)."""
    groups = param_groups(model)
    if not fsdp_modules(model):
        return None
    check_supported(model)
    non_root = [g for g in groups if getattr(g, "_module_fqn", "")] or groups
    reshard = sorted({bool(getattr(g, "post_forward_mesh_info", None) is not None) for g in non_root})
    policy = getattr(groups[0], "mp_policy", None) if groups else None
    offload = any(CPUOffloadPolicy is not None and isinstance(getattr(g, "offload_policy", None), CPUOffloadPolicy)
                  for g in groups)
    return {
        "reshard_after_forward": reshard[0] if len(reshard) == 1 else None,  # None: groups differ
        "param_dtype": _dtype_name(getattr(policy, "param_dtype", None)),
        "reduce_dtype": _dtype_name(getattr(policy, "reduce_dtype", None)),
        "offload_params": "cpu" if offload else None,
        "sharded_dtype": _dtype_name(groups[0].fsdp_params[0].sharded_param.dtype) if groups and groups[0].fsdp_params else None,
        "param_groups": len(groups),
    }


def _walk_param(col: Collector, fp: Any) -> None:
    offloaded = bool(getattr(fp, "offload_to_cpu", False))
    name = _param_name(fp)
    col.add(getattr(fp, "_sharded_param_data", None), PARAMS, offloaded, f"shard of {name}")
    # gathered (storage resized to 0 when resharded: the collector skips empty storages)
    col.add(list(getattr(fp, "all_gather_outputs", None) or []), PARAMS, False, f"gathered {name}")
    col.add(list(getattr(fp, "_unsharded_inner_tensors", None) or []), PARAMS, False, f"gathered {name}")
    col.add(getattr(fp, "_sharded_post_forward_param_data", None), PARAMS, False, f"post-forward shard of {name}")
    sharded = getattr(fp, "sharded_param", None)
    if sharded is not None:
        col.add(_local(sharded.grad), GRADS, offloaded, f".grad of shard of {name}")
    unsharded = fp.__dict__.get("_unsharded_param")  # set at the first all-gather
    if unsharded is not None:
        col.add(_local(unsharded.grad), GRADS, False, f".grad of gathered {name}")
    col.add(getattr(fp, "unsharded_accumulated_grad", None), GRADS, False, f"accumulated gradient of {name}")


def _walk_group_buffers(col: Collector, group: Any) -> None:
    pending = getattr(group, "_all_gather_result", None)
    if pending is not None:
        col.add(pending.all_gather_output, COMM, False, "FSDP2 all-gather output")
    col.add(getattr(group, "_partial_reduce_output", None), COMM, False, "FSDP2 partial reduce output")
    all_reduce = getattr(group, "_all_reduce_state", None)
    if all_reduce is not None:
        col.add(all_reduce.all_reduce_input, COMM, False, "FSDP2 all-reduce input")


def _walk_mesh(col: Collector, group: Any) -> None:
    """The group's DeviceMesh keeps its ranks as a small int32 CPU tensor (torch/distributed/
    device_mesh.py ``DeviceMesh.__init__``: ``_rank_map``, 4 bytes per rank), for the process group
    FSDP2 communicates over: communication metadata, so ``comm_buffers``, in host memory (the mesh
    moves it to the CPU even when given a device tensor), on a CPU-only run too (a tiny offloaded
    step peak, ~1 KB, was 2% of it ``other``); its root mesh's too, when the group's is a slice of one."""
    mesh = getattr(getattr(group, "mesh_info", None), "mesh", None)
    if mesh is None:
        return
    meshes = [mesh]
    root = getattr(mesh, "_get_root_mesh", None)
    try:
        if callable(root) and root() is not mesh:
            meshes.append(root())
    except Exception:  # a torch without root meshes: the group's own mesh is named still
        pass
    for m in meshes:
        col.add(getattr(m, "_rank_map", None), COMM, True, "FSDP2 device mesh ranks")


def _walk_comm_context(col: Collector, ctx: Any) -> None:
    kept = getattr(ctx, "all_gather_state", None)
    if kept is not None:
        col.add(kept.all_gather_result.all_gather_output, COMM, False, "FSDP2 all-gather output")
    for state in list(getattr(ctx, "reduce_scatter_states", None) or []):
        col.add(state.reduce_scatter_input, COMM, False, "FSDP2 reduce-scatter input")


def walk_fsdp2(col: Collector, model: torch.nn.Module | None) -> dict[int, bool]:
    """Every storage FSDP2 keeps for ``model`` (nothing for a model without ``fully_shard``). Walk
    before the module's parameters so offloaded shards get their ``host`` location first. Returns
    ``{id(sharded parameter): True}`` for the shards ``CPUOffloadPolicy`` keeps on the host: the
    optimizer's state of those (torch.optim's ``zeros_like`` of a CPU shard) is host memory too,
    which on a CPU-only run only ownership can say (``Collector``: location by ownership there)."""
    contexts: dict[int, Any] = {}
    offloaded: dict[int, bool] = {}
    for group in param_groups(model):
        for fp in group.fsdp_params:
            _walk_param(col, fp)
            if getattr(fp, "offload_to_cpu", False):
                offloaded[id(fp.sharded_param)] = True
        _walk_group_buffers(col, group)
        _walk_mesh(col, group)
        ctx = getattr(group, "comm_ctx", None)
        if ctx is not None:
            contexts[id(ctx)] = ctx  # one context shared by every group under a root
    for ctx in contexts.values():
        _walk_comm_context(col, ctx)
    return offloaded


class StorageResizeWatch:
    """Tells ``resync(storage, label)`` about every storage FSDP2 frees, re-allocates in place or
    gathers into, while active, so that a CPU tracker counts it and names it when it is made:

    * FSDP2 frees a resharded block with ``UntypedStorage.resize_(0)`` and gathers it again with
      ``resize_(n)`` (``_fsdp_param.py``: ``free_storage``, ``alloc_storage``, only ever on a
      parameter's unsharded storage, so ``label`` is device ``params``; ``_fsdp_param_group.py``
      calls its own imported ``alloc_storage`` on a 1-rank mesh). No dispatched op shows that to the
      dispatch-mode tracker; the allocator hook sees it only for a storage made while it tracks,
      since ``resize_`` goes through the allocator the storage was made with: the gathered storages
      of a model that ran a step before the profiler started (or of the root, which FSDP2 gathers in
      the pre-forward hook that runs before ``profile_accelerate``'s first forward phase starts the
      profiler) were invisible to it, their re-gathers uncounted (-3.5% at accelerate's backward
      peak in tests/test_fsdp2.py). A block the hook does allocate took the label open then
      (``activations`` in forward) and, with ``reshard_after_forward``, is freed by ``reshard``
      before any ownership walk (before the next block's ``wait_for_unshard``, or the phase end)
      can name it: the last block's gathered parameters were ``activations`` at the forward peak
      (-11.5% of it on tests/test_fsdp2.py's ``reshard`` run).
    * ``foreach_all_gather`` (``_fsdp_collectives.py``, called by ``FSDPParamGroup.unshard`` through
      ``_fsdp_param_group``'s name) returns the flat ``all_gather_output`` FSDP2 keeps until the
      copy-out (or, in forward, until the next block's: ``comm_ctx.all_gather_state``):
      ``comm_buffers`` from its allocation on, not only once a walk finds it (a walk runs only after
      a large allocation). Its mixed-precision copy-in (the bf16 casts) dies inside the call and
      keeps the phase's label.

    Wraps those module functions, calling the originals unchanged, and puts them back on exit."""

    # (module of torch.distributed.fsdp._fully_shard, function): the names FSDP2 calls them by
    _RESIZES = (("_fsdp_param", "free_storage"), ("_fsdp_param", "alloc_storage"), ("_fsdp_param_group", "alloc_storage"))
    _GATHERS = (("_fsdp_param_group", "foreach_all_gather"),)

    def __init__(self, resync: Any) -> None:
        self.resync = resync
        self.saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> StorageResizeWatch:
        import importlib

        for names, watched in ((self._RESIZES, self._resized), (self._GATHERS, self._gathered)):
            for module_name, name in names:
                module = importlib.import_module(f"torch.distributed.fsdp._fully_shard.{module_name}")
                original = getattr(module, name, None)
                if original is None:  # another torch: nothing of that name to watch
                    continue
                self.saved.append((module, name, original))
                setattr(module, name, watched(original))
        return self

    def _resized(self, original: Any) -> Any:
        resync = self.resync

        def watched(tensor: torch.Tensor) -> None:
            original(tensor)
            resync(tensor.untyped_storage(), _GATHERED)
        return watched

    def _gathered(self, original: Any) -> Any:
        resync = self.resync

        def watched(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            output = getattr(result, "all_gather_output", None)
            if isinstance(output, torch.Tensor):
                resync(output.untyped_storage(), _COMM)
            return result
        return watched

    def __exit__(self, *exc: Any) -> None:
        for module, name, original in reversed(self.saved):
            setattr(module, name, original)
        self.saved.clear()


class Fsdp2GroupWatch:
    """Runs the profiler's own work at two of ``FSDPParamGroup``'s moments, while active, wrapping
    ``wait_for_unshard`` and ``post_backward`` (calling the originals unchanged; put back on exit):

    * ``before`` each, an ownership walk if one is due (``CpuBackend.walk_if_due``). These are the
      moments just before FSDP2 frees what it owns within a phase: ``wait_for_unshard`` frees the
      previous block's all-gather output in forward and its own after the copy-out in backward (the
      gathered parameters, allocated in ``unshard`` before it, are alive there too, until
      ``reshard``); ``post_backward`` frees the block's unsharded gradients (copied into the
      reduce-scatter input) and the previous block's reduce-scatter input (the root's, in the final
      callback, comes before the last one is cleared). A walk there names each of them (in the peak
      too, ``relabel_pending``) before it dies, as a walk after every large allocation did, at one
      walk per point instead of one per large activation (about 150 a step on the 4-block GPT-2 of
      benchmarks/bench_fsdp2.py).
    * ``after`` each, outside forward, ``let_release``: gloo's worker threads get the GIL. gloo
      completes a collective on its own thread, which drops its references to the buffers (a
      block's all-gather output, which ``wait_for_unshard`` frees right after the copy-out in
      backward; a reduce-scatter's) only once it gets the GIL, so without this a buffer FSDP2 has
      already freed is alive at the next block's backward peak at random ranks and steps (+1.6% /
      -4.5% on a 2-rank bf16 run). ``let_release`` is the CPU backend's own pause for the same
      thing at phase ends (backends.CpuBackend._let_comm_threads_release, a few ms on several ranks).
    """

    _METHODS = ("wait_for_unshard", "post_backward")

    def __init__(self, before: Any = None, let_release: Any = None) -> None:
        self.before = before
        self.let_release = let_release
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> Fsdp2GroupWatch:
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        for name in self._METHODS:
            original = FSDPParamGroup.__dict__[name]
            self.saved[name] = original
            setattr(FSDPParamGroup, name, self._watched(original, TrainingState.FORWARD))
        return self

    def _watched(self, original: Any, forward: Any) -> Any:
        before, let_release = self.before, self.let_release

        def watched(group: Any, *args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            out = original(group, *args, **kwargs)
            if let_release is not None and getattr(group, "_training_state", None) != forward:
                let_release()
            return out
        return watched

    def __exit__(self, *exc: Any) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        for name, original in self.saved.items():
            setattr(FSDPParamGroup, name, original)
        self.saved.clear()
