"""Optimizer state per parameter for the optimizer zoo.

Read from torch's optimizers (``torch/optim/{sgd,rmsprop,adagrad,adam,adamw}.py``,
``_init_group``): the state each keeps per parameter tensor, in the parameter's dtype (DeepSpeed
hands the inner optimizer fp32 master copies when it keeps any), plus ``step`` as a 0-dim fp32
tensor per parameter tensor for the optimizers that count steps (``_get_scalar_dtype()``).
"""

from __future__ import annotations

from dataclasses import dataclass

STEP_TENSOR_BYTES = 4  # torch.tensor(0.0, dtype=_get_scalar_dtype()) -> float32


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    state_names: tuple[str, ...]  # full-size state tensors, each the size of the parameter
    has_step_tensor: bool  # a `step` tensor per parameter tensor
    lazy: bool  # state created at the first optimizer.step(), not at construction
    torch_class: str
    note: str

    @property
    def states_per_param(self) -> int:
        return len(self.state_names)


OPTIMIZER_SPECS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("sgd", (), False, True, "SGD(momentum=0)", "plain SGD keeps no state (momentum_buffer stays None)"),
        OptimizerSpec("momentum", ("momentum_buffer",), False, True, "SGD(momentum>0)", "momentum_buffer"),
        OptimizerSpec("nesterov", ("momentum_buffer",), False, True, "SGD(momentum>0, nesterov=True)", "momentum_buffer"),
        OptimizerSpec("rmsprop", ("square_avg",), True, True, "RMSprop", "square_avg and step (momentum=0, centered=False)"),
        OptimizerSpec("adagrad", ("sum",), True, False, "Adagrad", "sum and step, created in the constructor"),
        OptimizerSpec("adam", ("exp_avg", "exp_avg_sq"), True, True, "Adam", "exp_avg, exp_avg_sq and step"),
        OptimizerSpec("adamw", ("exp_avg", "exp_avg_sq"), True, True, "AdamW", "exp_avg, exp_avg_sq and step"),
        OptimizerSpec("amsgrad", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), True, True, "Adam(amsgrad=True)",
                      "exp_avg, exp_avg_sq, max_exp_avg_sq and step"),
    )
}


def optimizer_state_bytes(
    name: str, numel: int, n_tensors: int, state_bytes_per_element: int = 4, step_tensors: bool | None = None
) -> int:
    """Bytes of optimizer state for ``n_tensors`` parameter tensors holding ``numel`` elements.

    ``step_tensors`` says whether the implementation keeps ``step`` as a tensor (None: the torch
    optimizer's own rule); see :func:`keeps_step_tensors`."""
    spec = OPTIMIZER_SPECS[name]
    has_step = spec.has_step_tensor if step_tensors is None else step_tensors
    step = STEP_TENSOR_BYTES * n_tensors if has_step else 0
    return spec.states_per_param * state_bytes_per_element * numel + step


def uses_deepspeed_adam(name: str, torch_adam: bool) -> bool:
    """Whether DeepSpeed builds its own Adam (FusedAdam, or DeepSpeedCPUAdam under optimizer offload)
    rather than ``torch.optim.Adam/AdamW``: ``engine.get_optimizer_configuration`` returns the torch
    class only for ``"torch_adam": true``. AMSGrad exists only in torch's (FusedAdam raises on it)."""
    return name in ("adam", "adamw") and not torch_adam


def keeps_step_tensors(name: str, torch_adam: bool) -> bool:
    """torch optimizers keep ``state["step"]`` as a 4-byte tensor per parameter tensor
    (``_get_scalar_dtype()``); FusedAdam and DeepSpeedCPUAdam count steps in a Python int
    (``group["step"]``, ops/adam/fused_adam.py, cpu_adam.py)."""
    if uses_deepspeed_adam(name, torch_adam):
        return False
    return OPTIMIZER_SPECS[name].has_step_tensor


def single_tensor_temporaries(name: str, torch_adam: bool) -> int:
    """How many parameter-sized temporaries one step of the optimizer holds at once, per tensor, in
    torch's single-tensor loop (what torch picks for CPU tensors: ``_default_to_fused_or_foreach``
    enables foreach only for CUDA tensors):

    * Adam/AdamW/AMSGrad (``_single_tensor_adam``): ``denom = (exp_avg_sq.sqrt() /
      bias_correction2_sqrt).add_(eps)``: the ``sqrt`` output is alive while ``div`` allocates: 2
      (AMSGrad takes the max into ``max_exp_avg_sq`` in place and then the same two);
    * RMSprop (``avg = square_avg.sqrt().add_(eps)``), Adagrad (``std = state_sum.sqrt().add_(eps)``),
      SGD+nesterov (``grad.add(buf, alpha=momentum)``): 1;
    * SGD with or without momentum: updates in place, 0;
    * DeepSpeed's FusedAdam / DeepSpeedCPUAdam: one C++ kernel over the tensors, 0.
    """
    if uses_deepspeed_adam(name, torch_adam):
        return 0
    return {"sgd": 0, "momentum": 0, "nesterov": 1, "rmsprop": 1, "adagrad": 1}.get(name, 2)


def temporary_outlives_its_tensor(name: str, torch_adam: bool) -> bool:
    """Whether one tensor's temporary is still alive while the next tensor's are made.

    In the single-tensor loops the result is bound to a local that is only rebound on the next
    iteration: Adam's ``denom``, RMSprop's ``avg``, Adagrad's ``std`` (so the peak is the previous
    tensor's temporary plus this one's). SGD+nesterov rebinds ``grad = grads[i]`` at the top of
    the loop first, which frees the previous ``grad.add(buf)`` before the next is made.
    """
    return single_tensor_temporaries(name, torch_adam) > 0 and name != "nesterov"
