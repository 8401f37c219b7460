"""memprof.estimate: the analytic estimator and capacity planner (pure arithmetic, no torch).

Public API: :func:`estimate`, :class:`EstimateInputs`, :class:`Estimate`, :func:`inputs_from_run`,
:func:`plan` (see :mod:`memprof.estimate.plan`).
"""

from memprof.estimate.core import Estimate, RankEstimate, estimate
from memprof.estimate.inputs import (
    OPTIMIZERS,
    PRECISIONS,
    EstimateInputs,
    ZeroKnobs,
    inputs_from_run,
    load_deepspeed_config,
    settings_from_deepspeed_config,
)
from memprof.estimate.plan import Plan, PlanRow, plan

__all__ = [
    "Estimate",
    "EstimateInputs",
    "OPTIMIZERS",
    "PRECISIONS",
    "Plan",
    "PlanRow",
    "RankEstimate",
    "ZeroKnobs",
    "estimate",
    "inputs_from_run",
    "load_deepspeed_config",
    "plan",
    "settings_from_deepspeed_config",
]
