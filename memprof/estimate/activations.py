"""The estimator's way in to activation memory: :func:`model_activations` asks the model's family
(memprof/families/) for its formula. The formulas themselves, and what they are derived from, live
in the family files (``families/gpt2.py``, ``families/llama.py``); the shared types in
``families/common.py``, re-exported here for the estimator's other modules.
"""

from __future__ import annotations

from memprof.estimate.model_shapes import ModelShape
from memprof.families.common import (
    FP32,
    INT64,
    ActivationQuery,
    Activations,
    attention_keeps_probabilities,
)
from memprof.families.gpt2 import GPT2_MLP_OUT_HOOKS

__all__ = ["FP32", "GPT2_MLP_OUT_HOOKS", "INT64", "ActivationQuery", "Activations", "attention_keeps_probabilities",
           "model_activations"]


def model_activations(shape: ModelShape, query: ActivationQuery) -> Activations | None:
    """The activation model of ``shape``'s family, or None where none exists (a model type without
    a family file, a bare parameter count, a setting the family's formula does not cover)."""
    if not shape.has_transformer_shape:
        return None
    memo = shape.activations_memo  # the formulas are pure: one answer per (shape, query)
    if query not in memo:
        memo[query] = shape.family.activations(shape, query)
    return memo[query]
