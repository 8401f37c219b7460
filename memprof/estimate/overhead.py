"""The Adam-style overhead of an estimate's setup, made explicit (``Estimate.overhead``)."""

from __future__ import annotations

from typing import Any

from memprof.dsconfig import ELEMENT_SIZE
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.layout.state import FP32
from memprof.estimate.model_shapes import ModelShape
from memprof.estimate.optimizers import OPTIMIZER_SPECS


def overhead(inputs: EstimateInputs, shape: ModelShape) -> dict[str, Any]:
    """The Adam-style overhead made explicit: optimizer-state bytes per parameter and the ratio
    (weights + optimizer state) / weights, plain fp32, mixed precision, and ZeRO-partitioned."""
    spec = OPTIMIZER_SPECS[inputs.optimizer]
    k = spec.states_per_param * FP32  # state bytes per parameter (fp32 states)
    e = ELEMENT_SIZE[inputs.precision]
    N = inputs.world_size
    # ZeRO 1-3 keep an fp32 master partition even for an fp32 model (stage 3: see layout.deepspeed_zero)
    master = FP32 if e < FP32 or inputs.zero_stage in (1, 2, 3) else 0
    weights = e
    state_here = (k + master) / (N if inputs.zero_stage >= 1 else 1)
    if inputs.zero_stage == 3:
        weights = e / N
    return {
        "optimizer_state_bytes_per_param": k,
        "fp32_ratio_weights_plus_state_to_weights": (4 + k) / 4,
        "mixed_precision_ratio": (e + FP32 + k) / e if e < FP32 else (4 + k) / 4,
        "this_setup_bytes_per_param": round(weights + state_here, 4),
        "this_setup_ratio": round((weights + state_here) / e, 4),
        "explanation": (
            f"{spec.torch_class} keeps {spec.states_per_param} fp32 tensor(s) per parameter = {k} bytes/param; "
            f"fp32 training holds 4 + {k} = {4 + k} bytes/param, {(4 + k) / 4:g}x the weights"
            + (f"; with {inputs.precision} weights the fp32 master adds 4 more: ({e}+4+{k})/{e} = {(e + 4 + k) / e:g}x" if e < FP32 else "")
            + (f"; ZeRO stage {inputs.zero_stage} divides master+state by N={N}" if inputs.zero_stage else "")
        ),
    }
