"""memprof.estimate: the analytic estimator and capacity planner (pure arithmetic, no torch).

Public API: :func:`estimate`, :class:`EstimateInputs`, :class:`Estimate`, :func:`inputs_from_run`,
:func:`plan` (see :mod:`memprof.estimate.plan`).
"""

from memprof.estimate.core import estimate
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
from memprof.estimate.result import Estimate, RankEstimate

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
