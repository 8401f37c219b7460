"""What an estimate answers: per-rank breakdowns at rest and at each phase's peak, with the
assumptions it rests on. Built by :func:`memprof.estimate.core.estimate` (DeepSpeed's layout) and
:func:`memprof.estimate.paper.paper_estimate` (the ZeRO paper's accounting)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memprof.categories import PHASES, Breakdown, breakdown_total
from memprof.estimate.activations import Activations
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import ModelShape


@dataclass
class RankEstimate:
    rank: int
    rest: Breakdown
    phases: dict[str, Breakdown]

    def phase_total(self, phase: str) -> int:
        return breakdown_total(self.phases[phase], "device")

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "device": dict(self.rest["device"]),
            "host": dict(self.rest["host"]),
            "phases": {ph: {"peak": self.phases[ph], "peak_total": self.phase_total(ph)} for ph in PHASES},
        }


@dataclass
class Estimate:
    inputs: EstimateInputs
    shape: ModelShape
    ranks: list[RankEstimate]
    activations: Activations | None
    assumptions: list[str] = field(default_factory=list)
    overhead: dict[str, Any] = field(default_factory=dict)
    paper_comparison: dict[str, Any] | None = None
    activations_not_estimated: str | None = None
    """Why this estimate holds no activations (None when it estimates them): its peaks are then
    model states only and :attr:`fits` is None (unknown), never a "yes" that was not computed."""

    @property
    def device_total_bytes(self) -> int:
        return max(breakdown_total(r.rest, "device") for r in self.ranks)

    @property
    def peak_device_bytes(self) -> int:
        return max(r.phase_total(ph) for r in self.ranks for ph in PHASES)

    @property
    def usable_gpu_bytes(self) -> int | None:
        g = self.inputs.gpu_memory_bytes
        return None if g is None else int(g * (1 - self.inputs.headroom))

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits the usable GPU memory; None without a GPU size or without activations."""
        usable = self.usable_gpu_bytes
        if usable is None or self.activations_not_estimated is not None:
            return None
        return self.peak_device_bytes <= usable

    @property
    def host_bytes_per_rank(self) -> int:
        """Host bytes one rank holds (the largest over the modelled ranks): offloaded model states
        and DeepSpeed's host buffers (pinned ones included), constant through a step."""
        return max(breakdown_total(r.rest, "host") for r in self.ranks)

    @property
    def ranks_per_node(self) -> int:
        return self.inputs.world_size // self.inputs.nodes

    @property
    def host_bytes_per_node(self) -> int:
        """What a node's ranks hold in its host RAM together: ranks per node x per rank."""
        return self.ranks_per_node * self.host_bytes_per_rank

    @property
    def host_fits(self) -> bool | None:
        h = self.inputs.host_memory_bytes
        return None if h is None else self.host_bytes_per_node <= h

    def to_json(self) -> dict[str, Any]:
        return {
            "ranks": [r.to_json() for r in self.ranks],
            "device_total_bytes": self.device_total_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "fits": self.fits,
            "activations_not_estimated": self.activations_not_estimated,
            "gpu_memory_bytes": self.inputs.gpu_memory_bytes,
            "usable_gpu_bytes": self.usable_gpu_bytes,
            "host_bytes_per_rank": self.host_bytes_per_rank,
            "ranks_per_node": self.ranks_per_node,
            "host_bytes_per_node": self.host_bytes_per_node,
            "host_memory_bytes": self.inputs.host_memory_bytes,
            "host_fits": self.host_fits,
            "n_params": self.shape.n_params,
            **({"n_trainable_params": self.shape.trainable.n_params, "n_frozen_params": self.shape.frozen_numel}
               if self.shape.trainable_mask is not None else {}),
            "layout": self.inputs.layout,
            "assumptions": list(self.assumptions),
            "overhead": dict(self.overhead),
            "paper_comparison": self.paper_comparison,
            "inputs": self.inputs.to_json(),
        }
