"""What every engine holds through plain torch objects: the model's parameters, their gradients and
buffers, and the state of the torch optimizers (the whole walk of a plain torch run).

DeepSpeed's ZeRO-3 attributes read here (``ds_tensor``, ``ds_persist``, ``grad_accum``) are those
it sets on the model's own parameters; the optimizer wrappers are walked in ``deepspeed.py``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from memprof.measure.ownership.core import ACT, GRADS, MASTER, OPT_STATE, PARAMS, Collector, grad_of

_MODULE_WALKERS = ("parameters", "named_parameters", "buffers", "named_buffers", "_named_members")


def module_tensors(module: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(list(module.parameters()), list(module.buffers()))``, in one pass over the module tree.

    The same order and dedup as torch's (torch/nn/modules/module.py: ``named_modules`` visits each
    module once, pre-order; ``_named_members`` yields each tensor once), at half the cost: it runs
    at every phase end. A module class that overrides how its tree or members are listed gets
    torch's own calls."""
    base = torch.nn.Module
    if any(getattr(type(module), name) is not getattr(base, name) for name in _MODULE_WALKERS):
        return list(module.parameters()), list(module.buffers())
    params: list[torch.Tensor] = []
    buffers: list[torch.Tensor] = []
    seen: set[int] = set()  # ids of modules, parameters and buffers already listed
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        if type(m).named_modules is not base.named_modules:
            return list(module.parameters()), list(module.buffers())
        seen.add(id(m))
        for members, out in ((m._parameters, params), (m._buffers, buffers)):
            for t in members.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return params, buffers


# module -> (ids of its parameters, their qualified names, ids of its buffers, theirs): the names
# are read once (named_parameters walks the tree with string joins), then reused while the module
# holds the same tensors, in module_tensors' order (torch's)
_NAMES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[list[int], list[str], list[int], list[str]]] = (
    weakref.WeakKeyDictionary())


def tensor_names(module: torch.nn.Module, params: list[torch.Tensor],
                 buffers: list[torch.Tensor]) -> tuple[list[str], list[str]]:
    """Qualified names of ``params`` and ``buffers`` (:func:`module_tensors`' lists of ``module``)."""
    param_ids, buffer_ids = [id(p) for p in params], [id(b) for b in buffers]
    cached = _NAMES.get(module)
    if cached is not None and cached[0] == param_ids and cached[2] == buffer_ids:
        return cached[1], cached[3]
    by_id = {id(t): n for n, t in module.named_parameters()}
    by_id.update((id(t), n) for n, t in module.named_buffers())
    names = ([by_id.get(i, f"parameter #{k}") for k, i in enumerate(param_ids)],
             [by_id.get(i, f"buffer #{k}") for k, i in enumerate(buffer_ids)])
    _NAMES[module] = (param_ids, names[0], buffer_ids, names[1])
    return names


def quant_state_tensors(quant_state: Any) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes ``QuantState`` (functional.py): ``absmax``, ``code``,
    ``offset`` and, with double quantization, ``state2``'s ``absmax`` and ``code``."""
    states = [quant_state, getattr(quant_state, "state2", None)]
    return [t for s in states if s is not None for t in (getattr(s, "absmax", None), getattr(s, "code", None),
                                                         getattr(s, "offset", None)) if isinstance(t, torch.Tensor)]


def walk_module(col: Collector, module: torch.nn.Module, offload_param: bool) -> None:
    """The model's parameters: compute copies, their ZeRO-3 partitions, and their gradients."""
    params, buffers = module_tensors(module)
    param_names, buffer_names = tensor_names(module, params, buffers)
    col.model_params.update(map(id, params))
    add, add_tensor, names = col.add, col.add_tensor, col.names
    for p, name in zip(params, param_names):
        names[id(p)] = name  # its optimizer state is named after it
        # ZeRO-3 (partition_parameters.py, _partition_param): `ds_tensor` is this rank's partition;
        # persistent params (`ds_persist`, numel <= stage3_param_persistence_threshold) keep their
        # partition on the compute device even with offload_param, the others go to `remote_device`.
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is not None:
            add(ds_tensor, PARAMS, offload_param and not getattr(p, "ds_persist", False), f"partition of {name}")
        # The parameter's storage (that of `param.data`): the full parameter at stage 0-2 (a view of
        # the flat bit16 buffer at stage 1/2); at ZeRO-3 non-empty only while gathered or
        # persistent (free_param sets `param.data = torch.empty(0)`).
        add_tensor(p, PARAMS, False, name)
        # bitsandbytes' Params4bit: its QuantState (absmax, code table, double quantization's
        # nested state) is no parameter but belongs to the packed weight (memprof.quant_config)
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None:
            add(quant_state_tensors(quant_state), PARAMS, False, f"quant state of {name}")
        grad = p.grad
        if grad is not None:
            add(grad, GRADS, False, grad_of(name))
        # stage_1_and_2.py: `param.grad_accum` holds the fp32 accumulation of a low-precision grad
        # (use_grad_accum_attribute, ZeRO-1 with grad_accum_dtype != param dtype).
        grad_accum = getattr(p, "grad_accum", None)
        if grad_accum is not None:
            add(grad_accum, GRADS, False, f".grad_accum of {name}")
    # Module buffers (e.g. the Llama family's rotary `inv_freq` / `original_inv_freq`): model tensors
    # the forward reads, never partitioned or offloaded by ZeRO; DeepSpeed keeps them fp32 under
    # bf16/fp16 (engine._configure_distributed_model casts parameters only). Counted as params.
    for b, name in zip(buffers, buffer_names):
        add_tensor(b, PARAMS, False, name)


def inner_torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a wrapper chain (each DeepSpeed wrapper keeps its inner one at
    ``.optimizer``: DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer,
    FP16_Optimizer, FP16_UnfusedOptimizer); a plain torch optimizer (or DeepSpeed's at ZeRO stage 0
    fp32) is its own."""
    found: list[torch.optim.Optimizer] = []
    seen: set[int] = set()
    current = optimizer
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.optim.Optimizer):
            found.append(current)
        current = getattr(current, "optimizer", None)
    return found


def walk_optimizer_state(col: Collector, opt: torch.optim.Optimizer, offloaded_params: dict[int, bool],
                         default_offloaded: bool) -> None:
    """Every tensor in ``opt.state`` (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq,
    square_avg, sum and ``step`` when kept as a tensor), placed like the parameter it belongs to."""
    state = getattr(opt, "state", None)
    if not isinstance(state, dict):
        return
    add, add_tensor, tensor, names = col.add, col.add_tensor, torch.Tensor, col.names
    for param, per_param in list(state.items()):
        offloaded = offloaded_params.get(id(param), default_offloaded) if offloaded_params else default_offloaded
        if isinstance(per_param, dict):
            of = names.get(id(param)) or "a tensor no walk names"
            for key, value in per_param.items():
                if isinstance(value, tensor):
                    add_tensor(value, OPT_STATE, offloaded, f"{key} of {of}")
                else:
                    add(value, OPT_STATE, offloaded, f"{key} of {of}")


def walk_torch_optimizers(col: Collector, optimizers: list[torch.optim.Optimizer],
                          offloaded_by_id: dict[int, bool], default_offloaded: bool) -> None:
    """The state of each torch optimizer, then what it updates."""
    add, names = col.add, col.names
    for opt in optimizers:
        groups = getattr(opt, "param_groups", None) or []
        for g, group in enumerate(groups):  # names first: the state below is named after them
            for p in (group.get("params", []) if isinstance(group, dict) else []):
                if id(p) not in names:
                    names[id(p)] = f"params {type(opt).__name__} updates, group {g}"
        walk_optimizer_state(col, opt, offloaded_by_id, default_offloaded)
        # What the inner optimizer updates is the master copy when it is not a model parameter
        # (catches a wrapper this walk does not know). Model params, and their grads, were claimed
        # first by walk_module, as params and grads: offered again here they would lose.
        for group in groups:
            params = group.get("params", []) if isinstance(group, dict) else []
            for p in params:
                if id(p) in col.model_params:
                    continue
                offloaded = offloaded_by_id.get(id(p), default_offloaded) if offloaded_by_id else default_offloaded
                name = names[id(p)]
                add(p, MASTER, offloaded, name)
                add(getattr(p, "grad", None), GRADS, offloaded, grad_of(name))


# ---- the training loop's input batches ----------------------------------------------------------
INPUT_BATCH = "input batch"
"""The owner of a tensor the training loop feeds the model (``activations``): a batch the data
loader returned (memprof.measure.regions' data-loader section), or an input of a root-module forward."""


class InputBatches:
    """Weak references to the tensors of the batches a training loop fetched and fed its model.

    Why ``activations``: the model's input is the first tensor its forward computes from, and the
    activation formula counts it there (``input_ids`` in the families' ``loop_held``); memprof's
    launcher makes its batch inside the forward phase, so the tracker labels it ``activations`` from
    its birth. A loop memprof does not own (HF Trainer, TRL, a user's script) makes its batches
    outside every phase, and holds some beyond the current one (transformers 5 fetches an optimizer
    step's ``gradient_accumulation_steps`` batches up front; accelerate's ``DataLoaderShard`` one
    ahead): nothing but this record says what they are, so the ownership walk names them from it.

    Only live tensors are kept (a weak reference's callback forgets a freed one), so the record is
    bounded by what the loop itself holds."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[torch.Tensor]] = {}

    def record(self, obj: Any, depth: int = 4) -> None:
        """Every tensor in ``obj``: a tensor, or a mapping (a dict, transformers' ``BatchEncoding``),
        list or tuple of them, a few levels deep."""
        if depth < 0 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            key = id(obj)
            if key not in self._refs:
                refs = self._refs

                def forget(ref: weakref.ref[torch.Tensor], key: int = key) -> None:
                    if refs.get(key) is ref:
                        del refs[key]

                refs[key] = weakref.ref(obj, forget)
            return
        if isinstance(obj, Mapping):
            items: Any = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            items = obj
        else:
            return
        for item in items:
            self.record(item, depth - 1)

    def tensors(self) -> list[torch.Tensor]:
        """The recorded tensors still alive."""
        return [t for t in (r() for r in list(self._refs.values())) if t is not None]


# root module -> the batches fed to it (installed by memprof.measure.regions while a profiler runs)
_INPUT_BATCHES: weakref.WeakKeyDictionary[torch.nn.Module, InputBatches] = weakref.WeakKeyDictionary()


def input_batches_of(module: torch.nn.Module | None) -> InputBatches | None:
    return _INPUT_BATCHES.get(module) if module is not None else None


def set_input_batches(module: torch.nn.Module, batches: InputBatches | None) -> None:
    if batches is None:
        _INPUT_BATCHES.pop(module, None)
    else:
        _INPUT_BATCHES[module] = batches


def walk_input_batches(col: Collector, batches: InputBatches | None) -> None:
    """The recorded input batches as ``activations`` (:data:`INPUT_BATCH`), the lowest priority: a
    parameter or buffer passed as an input stays what it is. Two kinds are left out:

    * a view into a larger storage (a slice of a data set the script keeps resident in tensor
      memory): the storage is the data set's, ``other``, as the estimator counts the script's
      resident tensors (``script_resident_bytes``);
    * on an accelerator run, a CPU tensor: the data loader's copy before it is moved to the device,
      host memory no estimate counts."""
    if batches is None:
        return
    for t in batches.tensors():
        if t.is_meta or (t.is_cpu and not col.compute_on_cpu):
            continue
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            continue
        col.add_tensor(t, ACT, False, INPUT_BATCH)
