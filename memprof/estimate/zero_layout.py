"""Former home of the model-state layout, now ``memprof.estimate.layout`` (one module per engine):
these names stay importable from here."""

from memprof.dsconfig import ELEMENT_SIZE
from memprof.estimate.layout import LAYOUT_BY_ENGINE, model_state_layout
from memprof.estimate.layout.deepspeed_zero import FP64
from memprof.estimate.layout.partition import (
    NCCL_START_ALIGNMENT_FACTOR,
    Stage12Grads,
    stage12_partition,
    stage12_partition_param_numels,
    stage12_rank_grads,
)
from memprof.estimate.layout.state import FP32, StateLayout, optimizer_temporaries

__all__ = [
    "ELEMENT_SIZE",
    "FP32",
    "FP64",
    "LAYOUT_BY_ENGINE",
    "NCCL_START_ALIGNMENT_FACTOR",
    "Stage12Grads",
    "StateLayout",
    "model_state_layout",
    "optimizer_temporaries",
    "stage12_partition",
    "stage12_partition_param_numels",
    "stage12_rank_grads",
]
