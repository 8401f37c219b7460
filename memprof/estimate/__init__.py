"""memprof.estimate: the analytic estimator and capacity planner (pure arithmetic, no torch).

Public API: :func:`estimate`, :class:`EstimateInputs`, :class:`Estimate`, :func:`inputs_from_run`,
:func:`plan` (see :mod:`memprof.estimate.plan`); where the settings come from:
:func:`settings_from_setup` (flags over the setup files, :mod:`memprof.estimate.settings`).
"""

from memprof.estimate.core import estimate
from memprof.estimate.from_run import inputs_from_run
from memprof.estimate.inputs import OPTIMIZERS, PRECISIONS, EstimateInputs, ZeroKnobs
from memprof.estimate.plan import Plan, PlanRow, plan
from memprof.estimate.result import Estimate, RankEstimate
from memprof.estimate.settings import SetupFlags, settings_from_deepspeed_config, settings_from_setup

__all__ = [
    "Estimate",
    "EstimateInputs",
    "OPTIMIZERS",
    "PRECISIONS",
    "Plan",
    "PlanRow",
    "RankEstimate",
    "SetupFlags",
    "ZeroKnobs",
    "estimate",
    "inputs_from_run",
    "plan",
    "settings_from_deepspeed_config",
    "settings_from_setup",
]
