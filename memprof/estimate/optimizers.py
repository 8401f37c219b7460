"""Optimizer state and step temporaries per parameter, from the zoo's rows (memprof.optimizers).

The facts (state tensors, step tensor, lazy state, temporaries, torch spelling) are the rows';
this module turns them into bytes for the estimator. The state is kept in the parameter's dtype
(DeepSpeed hands the inner optimizer fp32 master copies when it keeps any), plus ``step`` as a
0-dim fp32 tensor per parameter tensor for the optimizers that count steps (``_get_scalar_dtype()``).
"""

from __future__ import annotations

from dataclasses import dataclass

from memprof.optimizers import ZOO

STEP_TENSOR_BYTES = 4  # torch.tensor(0.0, dtype=_get_scalar_dtype()) -> float32


@dataclass(frozen=True)
class OptimizerSpec:
    """The estimator's view of a zoo row (``torch_class`` is the row's torch spelling, e.g.
    ``SGD(momentum>0)``, as the assumptions name it)."""

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
    row.name: OptimizerSpec(row.name, row.state_names, row.has_step_tensor, row.lazy, row.torch_spelling, row.note)
    for row in ZOO.values()
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
    return ZOO[name].deepspeed_builds_its_own and not torch_adam


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
    enables foreach only for CUDA tensors): the row's ``step_temporaries`` (see memprof.optimizers
    for each loop's line). DeepSpeed's FusedAdam / DeepSpeedCPUAdam: one C++ kernel over the
    tensors, 0."""
    if uses_deepspeed_adam(name, torch_adam):
        return 0
    return ZOO[name].step_temporaries


def temporary_outlives_its_tensor(name: str, torch_adam: bool) -> bool:
    """Whether one tensor's temporary is still alive while the next tensor's are made (the row's
    ``temporary_outlives_its_tensor``: the loop's result is bound to a local only rebound on the
    next iteration), so the peak is the previous tensor's temporary plus this one's."""
    return single_tensor_temporaries(name, torch_adam) > 0 and ZOO[name].temporary_outlives_its_tensor
