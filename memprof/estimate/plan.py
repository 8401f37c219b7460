"""``plan()``: the cheapest DeepSpeed configuration that fits a GPU, by sweeping estimates.

Cost order (cheapest first): lower ZeRO stage (less communication), then no offload before
optimizer offload before parameter offload (offload trades GPU memory for PCIe traffic and CPU
compute). Under ``--engine fsdp2`` the sweep is FSDP2's own knobs (:func:`fsdp2_candidates`):
``reshard_after_forward`` False (no all-gather in backward) before True, then ``CPUOffloadPolicy``.
For each candidate the planner also finds the largest micro-batch that fits on the given GPUs and the
fewest GPUs that fit at the requested micro-batch.

A model whose activations the estimator does not model (a bare parameter count, a model_type
without an activation model) has no peak to compare with the GPU: the planner refuses it unless
asked to plan on model states alone (``model_states_only``), and the plan then says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from memprof.engines import Engine, Fsdp2Settings
from memprof.errors import MemprofError
from memprof.estimate.core import activations_not_estimated, peak_device_and_host_bytes
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import shape_of
from memprof.units import is_positive_int

MAX_MICRO_BATCH = 4096


@dataclass(frozen=True)
class PlanRow:
    zero_stage: int
    offload_optimizer: str
    offload_param: str
    fits: bool  # at the requested GPUs and micro-batch, in GPU memory and (when given) host memory;
    # model states only when the plan says so (model_states_only)
    peak_device_bytes: int
    host_bytes_per_node: int  # what the node's ranks hold in host RAM (offloaded states, host buffers)
    largest_micro_batch: int | None  # at the requested GPUs; None if not even 1 fits
    fewest_gpus: int | None  # at the requested micro-batch, up to max_gpus; None if none fits
    fsdp2: Fsdp2Settings | None = None  # the FSDP2 candidate (engine fsdp2; zero_stage is then 0)

    @property
    def engine_label(self) -> str:
        """The first column: ``ZeRO-2``, or FSDP2 with its reshard_after_forward."""
        if self.fsdp2 is not None:
            return f"FSDP2 reshard_after_forward={self.fsdp2.reshard_after_forward}"
        return f"ZeRO-{self.zero_stage}"

    @property
    def offload_label(self) -> str:
        """What is offloaded where (``optimizer->cpu, params->cpu``); empty without offload."""
        if self.fsdp2 is not None:
            return "params, grads, optimizer->cpu" if self.fsdp2.offload_params else ""
        off = []
        if self.offload_optimizer != "none":
            off.append(f"optimizer->{self.offload_optimizer}")
        if self.offload_param != "none":
            off.append(f"params->{self.offload_param}")
        return ", ".join(off)

    @property
    def label(self) -> str:
        return self.engine_label + (f" + offload {self.offload_label}" if self.offload_label else "")

    def to_json(self) -> dict[str, Any]:
        fsdp2 = {} if self.fsdp2 is None else {"fsdp2": {"reshard_after_forward": self.fsdp2.reshard_after_forward,
                                                         "offload_params": self.fsdp2.offload_params}}
        return fsdp2 | {
            "zero_stage": self.zero_stage,
            "offload_optimizer": self.offload_optimizer,
            "offload_param": self.offload_param,
            "label": self.label,
            "fits": self.fits,
            "peak_device_bytes": self.peak_device_bytes,
            "host_bytes_per_node": self.host_bytes_per_node,
            "largest_micro_batch": self.largest_micro_batch,
            "fewest_gpus": self.fewest_gpus,
        }


@dataclass
class Plan:
    base: EstimateInputs
    gpus: int
    max_gpus: int
    rows: list[PlanRow] = field(default_factory=list)
    evaluations: int = 0
    activations_not_estimated: str | None = None
    """Set when the plan fits model states only: why the activations are not in its peaks."""
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(label, one-line reason) of the candidates the setup rules out (e.g. ZeRO-3 with a uint8 4-bit storage)."""

    @property
    def model_states_only(self) -> bool:
        return self.activations_not_estimated is not None

    @property
    def cheapest(self) -> PlanRow | None:
        return next((r for r in self.rows if r.fits), None)

    def to_json(self) -> dict[str, Any]:
        best = self.cheapest
        return {
            "gpus": self.gpus,
            "max_gpus": self.max_gpus,
            "gpu_memory_bytes": self.base.gpu_memory_bytes,
            "usable_gpu_bytes": int(self.base.gpu_memory_bytes * (1 - self.base.headroom)) if self.base.gpu_memory_bytes else None,
            "host_memory_bytes": self.base.host_memory_bytes,
            "micro_batch": self.base.micro_batch,
            "model_states_only": self.model_states_only,
            "activations_not_estimated": self.activations_not_estimated,
            "cheapest": best.to_json() if best else None,
            "rows": [r.to_json() for r in self.rows],
            "evaluations": self.evaluations,
            "refused": [{"label": label, "reason": reason} for label, reason in self.refused],
        }


def candidates() -> list[tuple[int, str, str]]:
    """(stage, offload_optimizer, offload_param) in cost order."""
    return [(0, "none", "none"), (1, "none", "none"), (2, "none", "none"), (3, "none", "none"),
            (1, "cpu", "none"), (2, "cpu", "none"), (3, "cpu", "none"), (3, "cpu", "cpu")]


def fsdp2_candidates(base: Fsdp2Settings) -> list[Fsdp2Settings]:
    """FSDP2's settings in cost order: reshard_after_forward False first (blocks stay gathered, so
    backward needs no all-gather: _fsdp_param_group.py ``FSDPParamGroup.pre_backward`` unshards
    only a resharded group), then True; each without, then with ``CPUOffloadPolicy`` (PCIe traffic
    for every gather and every gradient). The user's MixedPrecisionPolicy is kept."""
    return [replace(base, reshard_after_forward=r, offload_params=o) for o in (False, True) for r in (False, True)]


def plan(base: EstimateInputs, gpus: int, max_gpus: int | None = None, model_states_only: bool = False) -> Plan:
    """Sweep the candidates for ``base`` (its model, precision, optimizer, micro-batch, GPU memory).

    ``model_states_only``: plan a model whose activations are not estimated on its model states
    alone (otherwise such a model is refused: nothing could be said to fit).
    """
    if base.gpu_memory_bytes is None:
        raise MemprofError("plan needs the GPU memory size: pass --gpu-memory, e.g. 80GiB")
    if base.layout != "deepspeed":
        raise MemprofError(f"plan sweeps DeepSpeed's own layout, not --layout {base.layout}: drop --layout")
    missing = activations_not_estimated(base, shape_of(base))
    if missing is not None and not model_states_only:
        raise MemprofError(f"{missing}, so plan cannot tell what fits: pass --model-states-only to plan on model states alone")
    if missing is None and model_states_only:
        raise MemprofError("--model-states-only is for models whose activations are not estimated; "
                           "this model's are, and plan counts them: drop --model-states-only")
    if not is_positive_int(gpus):
        raise MemprofError(f"GPU count {gpus!r} must be a positive whole number, e.g. --gpus 8")
    max_gpus = gpus if max_gpus is None else max_gpus
    if not is_positive_int(max_gpus) or max_gpus < gpus:
        raise MemprofError(f"--max-gpus {max_gpus!r} must be at least --gpus {gpus}")
    usable = int(base.gpu_memory_bytes * (1 - base.headroom))
    host_limit = base.host_memory_bytes
    # ranks sharing one node's host RAM: --gpus-per-node when given (base.nodes > 1), else all
    per_node = max(1, base.world_size // base.nodes) if base.nodes > 1 else None
    out = Plan(base, gpus, max_gpus, activations_not_estimated=missing)

    Candidate = tuple[int, str, str, Fsdp2Settings | None]

    def peaks(c: Candidate, n: int, mb: int) -> tuple[int, int]:
        """(peak device bytes per GPU, host bytes per node) for n GPUs at micro-batch mb."""
        out.evaluations += 1
        stage, opt, par, fsdp2 = c
        zero = replace(base.zero, offload_optimizer=opt, offload_param=par)
        inp = replace(base, zero_stage=stage, zero=zero, world_size=n, nodes=1, micro_batch=mb,
                      fsdp2=fsdp2 or base.fsdp2)
        device, host_per_rank = peak_device_and_host_bytes(inp)
        return device, host_per_rank * (min(n, per_node) if per_node else n)

    def fits(c: Candidate, n: int, mb: int) -> bool:
        device, host = peaks(c, n, mb)
        return device <= usable and (host_limit is None or host <= host_limit)

    def fewest_gpus(c: Candidate) -> int | None:
        # device memory per GPU falls with n (bisection); host bytes per node need not (n ranks on a
        # node each keep per-rank host buffers), so from the device boundary up, the first n whose
        # host share fits too
        sharded = c[0] > 0 or c[3] is not None  # FSDP2 shards like ZeRO-3
        n = _fewest(lambda k: peaks(c, k, base.micro_batch)[0] <= usable, max_gpus, monotone=sharded)
        if n is None or host_limit is None:
            return n
        return next((k for k in range(n, max_gpus + 1) if fits(c, k, base.micro_batch)), None)

    sweep: list[Candidate] = ([(0, "none", "none", f) for f in fsdp2_candidates(base.fsdp2)]
                              if base.engine == Engine.FSDP2 else [(*c, None) for c in candidates()])
    for c in sweep:
        try:  # a candidate the setup rules out (memprof.estimate.inputs.validate_inputs) is no row
            replace(base, zero_stage=c[0], zero=replace(base.zero, offload_optimizer=c[1], offload_param=c[2]))
        except MemprofError as e:
            offload = ", ".join(f"{what}->cpu" for what, dev in (("optimizer", c[1]), ("params", c[2])) if dev != "none")
            out.refused.append((f"ZeRO-{c[0]}" + (f" + offload {offload}" if offload else ""), str(e)))
            continue
        p, host = peaks(c, gpus, base.micro_batch)
        largest = _largest(lambda mb, c=c: fits(c, gpus, mb))
        fewest = fewest_gpus(c)
        ok = p <= usable and (host_limit is None or host <= host_limit)
        out.rows.append(PlanRow(c[0], c[1], c[2], ok, p, host, largest, fewest, c[3]))
    return out


def _first_true(pred, lo: int, hi: int) -> int:
    """Smallest x in (lo, hi] with pred(x), for pred monotone (false up to a point, then true),
    pred(lo) false and pred(hi) true; hi itself is never evaluated."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _largest(fits) -> int | None:
    """Largest micro-batch in [1, MAX_MICRO_BATCH] that fits (memory grows with the batch)."""
    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= MAX_MICRO_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_MICRO_BATCH + 1)  # first size known not to fit (or past the range)
    return _first_true(lambda mb: not fits(mb), lo, hi) - 1


def _fewest(fits, max_gpus: int, monotone: bool) -> int | None:
    """Fewest GPUs in [1, max_gpus] that fit. Stage 0 does not depend on the GPU count; with ZeRO,
    per-rank memory shrinks as N grows (partition padding moves it by at most a few elements, so
    the boundary found by bisection is checked one step down)."""
    if not monotone:
        return 1 if fits(1) else None
    if not fits(max_gpus):
        return None
    best = _first_true(fits, 0, max_gpus)  # 0 GPUs never fit; max_gpus does
    if best > 1 and fits(best - 1):  # padding made the boundary non-monotone by one step
        best -= 1
    return best
