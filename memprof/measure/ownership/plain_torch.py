"""What every engine holds through plain torch objects: the model's parameters, their gradients and
buffers, and the state of the torch optimizers (the whole walk of a plain torch run).

DeepSpeed's ZeRO-3 attributes read here (``ds_tensor``, ``ds_persist``, ``grad_accum``) are those
it sets on the model's own parameters; the optimizer wrappers are walked in ``deepspeed.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from memprof.measure.ownership.core import GRADS, MASTER, OPT_STATE, PARAMS, Collector


def walk_module(col: Collector, module: torch.nn.Module, offload_param: bool) -> None:
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
    for param, per_param in list(state.items()):
        offloaded = offloaded_params.get(id(param), default_offloaded)
        if isinstance(per_param, dict):
            for value in per_param.values():
                col.add(value, OPT_STATE, offloaded)


def walk_torch_optimizers(col: Collector, optimizers: list[torch.optim.Optimizer],
                          offloaded_by_id: dict[int, bool], default_offloaded: bool) -> None:
    """The state of each torch optimizer, then what it updates."""
    for opt in optimizers:
        walk_optimizer_state(col, opt, offloaded_by_id, default_offloaded)
        # What the inner optimizer updates is the master copy when it is not a model parameter
        # (catches a wrapper this walk does not know); model params were claimed first.
        for group in getattr(opt, "param_groups", None) or []:
            params = group.get("params", []) if isinstance(group, dict) else []
            for p in params:
                offloaded = offloaded_by_id.get(id(p), default_offloaded)
                col.add(p, MASTER, offloaded)
                col.add(getattr(p, "grad", None), GRADS, offloaded)
