"""The one vocabulary of memprof: memory categories, locations and training phases.

Every part of memprof (measure, estimate, report, compare) speaks these names. A memory breakdown
is a plain nested dict ``{location: {category: bytes}}`` with integer bytes; units are converted
only for display (see :mod:`memprof.units`).
"""

from __future__ import annotations

from enum import Enum


class Category(str, Enum):
    """What a byte is held for."""

    PARAMS = "params"
    """Compute copy of the parameters (fp32 or bf16/fp16): the full model, or under ZeRO-3 this
    rank's shard plus persistent and currently gathered parameters."""
    MASTER_PARAMS = "master_params"
    """fp32 master copies of the parameters that DeepSpeed keeps beside low-precision weights."""
    GRADS = "grads"
    """Gradients: full, bucketed or partitioned, low precision or fp32 accumulators, and the working
    memory of gradient processing in a DeepSpeed optimizer's step (the flattened gradient partition
    and its fp32 copy, the norm's and unscaling's temporaries: memprof/measure/regions.py)."""
    OPTIMIZER_STATE = "optimizer_state"
    """Per-parameter optimizer state (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq,
    square_avg, sum) and step counters, and the working memory of the optimizer's step (e.g. torch
    Adam's foreach / for-loop temporaries: what the torch optimizer allocates inside ``step()``)."""
    COMM_BUFFERS = "comm_buffers"
    """Communication buffers: reduce / all-gather buckets (a reduce bucket whose slices are
    parameters' ``.grad`` views while they wait to be reduced included), ZeRO-3 prefetch and staging."""
    ACTIVATIONS = "activations"
    """Tensors saved for backward plus working memory of forward and backward."""
    OTHER = "other"
    """Measured total minus every category above: never dropped, never negative. On CPU what no
    category's code made and nobody owns (the script's own tensors, e.g. its data set and batches)."""

    @property
    def is_model_state(self) -> bool:
        """params, master_params, grads or optimizer_state: the states the model and its optimizer
        hold whatever the batch (what ZeRO partitions), as opposed to buffers and activations."""
        return self in (Category.PARAMS, Category.MASTER_PARAMS, Category.GRADS, Category.OPTIMIZER_STATE)


class Location(str, Enum):
    """Where a byte lives. ``device`` is the memory the model computes in (the GPU; on a CPU-only
    run, the CPU's memory used for compute). ``host`` is CPU memory that holds offloaded states."""

    DEVICE = "device"
    HOST = "host"


class Phase(str, Enum):
    """The phases of one training step, in order."""

    FORWARD = "forward"
    BACKWARD = "backward"
    STEP = "step"


# The enums' values in their order, for code that indexes or iterates plain strings (breakdown keys).
CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category)
LOCATIONS: tuple[str, ...] = tuple(loc.value for loc in Location)
PHASES: tuple[str, ...] = tuple(p.value for p in Phase)
MODEL_STATE_CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category if c.is_model_state)

Breakdown = dict[str, dict[str, int]]
"""``{location: {category: bytes}}``, every location and category present."""


def empty_breakdown() -> Breakdown:
    """A breakdown with every location and category at zero bytes."""
    return {loc: {cat: 0 for cat in CATEGORIES} for loc in LOCATIONS}


def breakdown_total(breakdown: Breakdown, location: str | None = None) -> int:
    """Sum of bytes in one location, or in all locations when ``location`` is None."""
    locations = LOCATIONS if location is None else (location,)
    return sum(int(v) for loc in locations for v in breakdown.get(loc, {}).values())

