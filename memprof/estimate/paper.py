"""The ZeRO paper's accounting (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", SC'20, section 3.1 and Figure 1).

Mixed-precision Adam holds 2 bytes/param of fp16 weights, 2 of fp16 gradients and K = 12 of
optimizer states (fp32 weights, momentum, variance). Stages partition over N ranks:
baseline (2 + 2 + K)P; P_os 2P + 2P + KP/N; P_os+g 2P + (2 + K)P/N; P_os+g+p (2 + 2 + K)P/N.
For another optimizer K = 4 (fp32 copy) + 4 per state tensor; in fp32 training the weights and
gradients are 4 bytes and there is no separate fp32 copy (K = 4 per state tensor).
No buffers, no padding, no activations.
"""

from __future__ import annotations

from typing import Any

from memprof.categories import Category, empty_breakdown
from memprof.dsconfig import ELEMENT_SIZE
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.layout.state import FP32
from memprof.estimate.model_shapes import ModelShape
from memprof.estimate.optimizers import OPTIMIZER_SPECS
from memprof.estimate.overhead import overhead
from memprof.estimate.result import Estimate, RankEstimate

PAPER_LAYOUT_HAS_NO_ACTIVATIONS = "activations not estimated: layout zero-paper counts model states only"


def zero_paper_terms(n_params: int, stage: int, world_size: int, optimizer: str, precision: str) -> dict[str, float]:
    """Bytes per rank of weights, gradients, fp32 master and optimizer states, the paper's way:
    with A = B = the element size (2 in bf16/fp16, 4 in fp32) and K = 4 bytes per fp32 state
    tensor + 4 for the fp32 master copy in mixed precision, stage 0 (A+B+K)Ψ, stage 1
    (A+B)Ψ + KΨ/N, stage 2 AΨ + (B+K)Ψ/N, stage 3 (A+B+K)Ψ/N. The only home of the formula
    (the estimator's ``--layout zero-paper`` and the report's ZeRO-saving curves use it)."""
    e = ELEMENT_SIZE[precision]
    states = OPTIMIZER_SPECS[optimizer].states_per_param * FP32
    master = FP32 if e < FP32 else 0
    N, s, P = world_size, stage, n_params
    return {
        Category.PARAMS.value: e * P / (N if s >= 3 else 1),
        Category.GRADS.value: e * P / (N if s >= 2 else 1),
        Category.MASTER_PARAMS.value: master * P / (N if s >= 1 else 1),
        Category.OPTIMIZER_STATE.value: states * P / (N if s >= 1 else 1),
    }


def zero_paper_model_states(n_params: int, stage: int, world_size: int, optimizer: str, precision: str) -> int | None:
    """Per-rank model-state bytes by :func:`zero_paper_terms`, or None when the optimizer, precision,
    stage or world size is not one the formula knows (e.g. a run of an optimizer outside the zoo)."""
    if optimizer not in OPTIMIZER_SPECS or precision not in ELEMENT_SIZE or stage not in (0, 1, 2, 3) or world_size < 1:
        return None
    return int(round(sum(zero_paper_terms(n_params, stage, world_size, optimizer, precision).values())))


def paper_terms(inputs: EstimateInputs, n_params: int) -> dict[str, float]:
    """:func:`zero_paper_terms` for the estimator's inputs."""
    return zero_paper_terms(n_params, inputs.zero_stage, inputs.world_size, inputs.optimizer, inputs.precision)


def paper_model_states(inputs: EstimateInputs, n_params: int) -> dict[str, Any]:
    terms = paper_terms(inputs, n_params)
    total = sum(terms.values())
    return {"paper_model_states_bytes": int(round(total)), "paper_model_states_gb": round(total / 1e9, 1)}


def paper_estimate(inputs: EstimateInputs, shape: ModelShape) -> Estimate:
    b = empty_breakdown()
    for cat, nbytes in paper_terms(inputs, shape.n_params).items():
        b["device"][cat] = int(round(nbytes))
    rank = RankEstimate(0, b, {ph: {loc: dict(c) for loc, c in b.items()} for ph in ("forward", "backward", "step")})
    est = Estimate(
        inputs,
        shape,
        [rank],
        None,
        [
            "layout zero-paper: the ZeRO paper's model-state accounting (SC'20, Fig. 1): fp16 weights and "
            "gradients 2+2 bytes/param, K bytes/param of optimizer states incl. the fp32 copy, partitioned per stage",
            "no communication buffers, no partition padding, no activations; phase peaks equal the model states",
            "the default --layout deepspeed shows what DeepSpeed 0.19.8 really holds: gradients exist only "
            "during backward/step (not at rest), reduce buckets of reduce_bucket_size elements, padding to 2*N elements",
        ],
        activations_not_estimated=PAPER_LAYOUT_HAS_NO_ACTIVATIONS,
    )
    est.overhead = overhead(inputs, shape)
    est.paper_comparison = paper_model_states(inputs, shape.n_params)
    return est
