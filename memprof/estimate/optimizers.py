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


def optimizer_state_bytes(name: str, numel: int, n_tensors: int, state_bytes_per_element: int = 4) -> int:
    """Bytes of optimizer state for ``n_tensors`` parameter tensors holding ``numel`` elements."""
    spec = OPTIMIZER_SPECS[name]
    step = STEP_TENSOR_BYTES * n_tensors if spec.has_step_tensor else 0
    return spec.states_per_param * state_bytes_per_element * numel + step


def step_temporary_bytes(name: str, numel: int, bytes_per_element: int = 4) -> int:
    """Largest temporary the torch optimizer allocates inside one step (foreach implementation).

    Adam/AdamW/amsgrad build ``denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps`` (one
    parameter-sized tensor; amsgrad takes the max into max_exp_avg_sq in place); RMSprop builds
    ``avg = square_avg.sqrt()``; Adagrad ``std = state_sum.sqrt()``; SGD with momentum adds the
    gradient in place (nesterov: ``grad.add(buf, alpha=momentum)``, one tensor).
    """
    if name == "sgd" or name == "momentum":
        return 0
    return bytes_per_element * numel
