"""``advise()``: from the user's own setup to the cheapest change that fits, with its price.

The advisor moves the knobs a DeepSpeed user has (ZeRO stage, optimizer and parameter offload,
activation checkpointing, micro-batch against accumulation steps, bf16, the ZeRO bucket and
stage-3 gathering limits, more GPUs up to ``max_gpus``), one at a time and then together, and asks
the estimator (:func:`memprof.estimate.core.estimate`) what each setup peaks at. Nothing here is a
memory formula of its own: every byte comes from the estimate, so an advice is exactly as good as
the estimate it rests on (and refused where the estimate holds no activations).

What a change costs is stated in the terms the field uses, per rank and optimizer step, from the
code paths the estimator models (see :func:`step_costs`):

* communication volume (ZeRO paper, Rajbhandari et al. 2020, sec. 7: data parallelism and ZeRO-1/2
  move 2 x the parameter bytes per step, ZeRO-3 3 x, i.e. 1.5x), refined per micro-step where
  DeepSpeed reduces at every backward (ZeRO-2's ``reduce_ipg_grads`` in the gradient hooks of
  ``runtime/zero/stage_1_and_2.py``; ZeRO-3's gathers in ``partitioned_param_coordinator.py`` and
  its reduce-scatter in ``stage3.py``) and only at the accumulation boundary elsewhere
  (``engine.allreduce_gradients`` at stage 0; ZeRO-1's ``reduce_gradients`` at the boundary);
* bytes over PCIe for offload: the gradient partition down and the updated parameter partition up
  each step (``stage_1_and_2.py`` ``async_accumulate_grad_in_cpu_via_gpu`` / the CPU step's copy
  back), and under parameter offload every gathered partition up in forward and again in backward;
* recompute: activation checkpointing runs each block's forward again in backward, about one extra
  forward per micro-step (torch.utils.checkpoint; about +1/3 of a step's compute);
* micro-steps per optimizer step for accumulation.

Under ``--engine fsdp2`` the knobs are FSDP2's (``reshard_after_forward``, ``MixedPrecisionPolicy``
param_dtype bf16, ``CPUOffloadPolicy``) beside checkpointing, micro-batch and GPUs, and the
communication per micro-step is torch's (``_fully_shard/_fsdp_param_group.py``): an all-gather of
every group in forward (``FSDPParamGroup.unshard`` from ``pre_forward``), another in backward
unless ``reshard_after_forward`` is False (``pre_backward`` unshards only a resharded group; the
root is never resharded, counted anyway: an upper bound by the root's parameters), both in
``param_dtype``, and a reduce-scatter of the gradients in ``reduce_dtype`` (``post_backward`` ->
``foreach_reduce``, every micro-step); under offload, each gather's shards go up over PCIe
(``FSDPParam.all_gather_inputs``: ``sharded_param_data.to(device)``) and each micro-step's
gradient shards come down (``foreach_reduce``, ``offload_to_cpu``).

The ranking of combinations (:data:`COST_ORDER`) is lexicographic and printed with the answer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from memprof.categories import CATEGORIES, PHASES
from memprof.engines import Engine
from memprof.errors import MemprofError
from memprof.estimate.core import activations_not_estimated, estimate, peak_device_and_host_bytes
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import shape_of
from memprof.estimate.result import Estimate
from memprof.families import family_of
from memprof.units import format_bytes

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

COST_ORDER: tuple[str, ...] = ("extra_gpus", "precision_changed", "adapters_changed", "pcie_bytes", "comm_bytes",
                               "recompute_forwards", "micro_steps")
"""How combinations are ranked, most important first: GPUs you do not have cost most; then a change
of numerics (fp32 -> bf16); then PCIe traffic (offload is usually the slowest path); then network
volume; then recompute; then more, smaller micro-steps."""

COST_ORDER_TEXT = ("cheapest = fewest extra GPUs, then no precision change, then the adapters as given, "
                   "then fewest PCIe bytes (offload), "
                   "then least communication, then no recompute, then fewest micro-steps per step")


@dataclass(frozen=True)
class PeakAt:
    """Where an estimate peaks: the rank, the phase, the bytes and what they are made of."""

    rank: int
    phase: str
    bytes: int
    categories: dict[str, int]

    @classmethod
    def of(cls, est: Estimate) -> PeakAt:
        rank, phase = max(((r, ph) for r in est.ranks for ph in PHASES), key=lambda rp: rp[0].phase_total(rp[1]))
        return cls(rank.rank, phase, rank.phase_total(phase), {c: int(rank.phases[phase]["device"][c]) for c in CATEGORIES})

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "phase": self.phase, "bytes": self.bytes, "categories": dict(self.categories)}


@dataclass(frozen=True)
class StepCosts:
    """What one setup costs per rank and optimizer step, besides memory (module docstring)."""

    gpus: int
    comm_bytes: int
    pcie_bytes: int
    recompute_forwards: int
    micro_steps: int
    precision: str
    lora: str | None = None
    """The adapters (``r=16 on all-linear``) when PEFT is in play: a change of them is a modelling choice."""

    def to_json(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "comm_bytes": self.comm_bytes, "pcie_bytes": self.pcie_bytes,
                "recompute_forwards": self.recompute_forwards, "micro_steps": self.micro_steps}


def step_costs(inp: EstimateInputs, n_params: int, n_trainable: int | None = None) -> StepCosts:
    """Per rank and optimizer step: communication volume, PCIe bytes, recomputed forwards, micro-steps.

    ``n_trainable`` (default: every parameter): only trainable parameters have gradients to reduce
    and updated partitions to gather (runtime/utils.py is_optimized_parameter; a LoRA backbone
    moves nothing at ZeRO 0-2), while ZeRO-3 gathers every parameter, frozen ones too."""
    if inp.engine == Engine.FSDP2:
        return _fsdp2_step_costs(inp, n_params, n_params if n_trainable is None else n_trainable)
    b, gas, n = ELEMENT_BYTES[inp.precision], inp.gradient_accumulation_steps, inp.world_size
    trained = n_params if n_trainable is None else n_trainable
    psi, grads = n_params * b, trained * b
    if n == 1:
        comm = 0
    elif inp.zero_stage == 3:  # all-gather in forward and in backward, reduce-scatter: every micro-step
        comm = (2 * psi + grads) * gas
    elif inp.zero_stage == 2:  # reduce-scatter in every backward, all-gather of the updated partitions once
        comm = grads * gas + grads
    else:  # stage 0: one all-reduce (2 psi) at the boundary; ZeRO-1: reduce + all-gather at the boundary
        comm = 2 * grads
    part = -(-trained // n) if inp.zero_stage > 0 else trained
    pcie = 0
    if inp.zero.offload_optimizer != "none":  # gradient partition down every micro-step, parameters up once
        pcie += part * b * gas + part * b
    if inp.zero.offload_param != "none":  # each rank's partition up for the forward and the backward gathers
        pcie += 2 * -(-n_params // n) * b * gas
    lora = None if inp.peft is None else f"r={inp.peft.r} on {_targets_text(inp.peft.target_modules)}"
    return StepCosts(n, comm, pcie, gas if inp.activation_checkpointing else 0, gas, inp.precision, lora)


def _targets_text(targets: tuple[str, ...] | str) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


def _costs_of(inp: EstimateInputs) -> StepCosts:
    shape = shape_of(inp)
    return step_costs(inp, shape.n_params, shape.trainable.n_params)


def _fsdp2_step_costs(inp: EstimateInputs, n_params: int, n_trainable: int) -> StepCosts:
    """FSDP2's step_costs (module docstring): gathers (1 or 2 per micro-step) of every parameter in
    param_dtype, one reduce-scatter of the trainable ones in reduce_dtype (a frozen LoRA backbone is
    gathered, never reduced: layout/fsdp2.py); under offload the shards up per gather, gradients down."""
    f, gas, n = inp.fsdp2, inp.gradient_accumulation_steps, inp.world_size
    gathers = 1 if not f.reshard_after_forward else 2
    gathered, reduced = ELEMENT_BYTES[inp.precision], ELEMENT_BYTES[f.reduce_dtype or inp.precision]
    sharded = 4 if f.param_dtype else gathered  # fp32 shards under a param_dtype
    comm = 0 if n == 1 else (gathers * n_params * gathered + n_trainable * reduced) * gas
    pcie = (gathers * -(-n_params // n) + -(-n_trainable // n)) * sharded * gas if f.offload_params else 0
    lora = None if inp.peft is None else f"r={inp.peft.r} on {_targets_text(inp.peft.target_modules)}"
    return StepCosts(n, comm, pcie, gas if inp.activation_checkpointing else 0, gas, inp.precision, lora)


@dataclass(frozen=True)
class Change:
    """One setup the advisor evaluated: what changed, its peak, what that saves, and its price."""

    change: str
    """Machine-readable: ``zero_stage=3``, ``offload_optimizer=cpu``, ``micro_batch=2,gas=4`` ..."""
    description: str
    inputs: EstimateInputs | None
    peak: PeakAt | None
    saved_bytes: int | None
    fits: bool | None
    host_fits: bool | None
    cost: str
    costs: StepCosts | None
    unknown: str | None = None
    """Why this change could not be evaluated (a term the estimator does not model, a refused setup)."""
    why_not: str | None = None
    """For a change that saves little or nothing at the peak: the reason in categories and bytes."""

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "description": self.description,
                "peak_bytes": self.peak.bytes if self.peak else None, "peak": self.peak.to_json() if self.peak else None,
                "saved_bytes": self.saved_bytes, "fits": self.fits, "host_fits": self.host_fits, "cost": self.cost,
                "costs": self.costs.to_json() if self.costs else None, "unknown": self.unknown, "why_not": self.why_not}


@dataclass
class Advice:
    base: EstimateInputs
    base_peak: PeakAt
    usable_bytes: int
    base_fits: bool
    base_host_fits: bool | None
    changes: list[Change]
    best: Change | None
    runner_up: Change | None
    closest: Change | None
    """When nothing fits: the combination whose peak comes nearest the budget."""
    max_gpus: int
    evaluations: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def margin_bytes(self) -> int:
        return self.usable_bytes - self.base_peak.bytes

    def to_json(self) -> dict[str, Any]:
        return {"setup": {"peak_bytes": self.base_peak.bytes, "peak": self.base_peak.to_json(), "fits": self.base_fits,
                          "host_fits": self.base_host_fits, "margin_bytes": self.margin_bytes},
                "usable_gpu_bytes": self.usable_bytes, "gpu_memory_bytes": self.base.gpu_memory_bytes,
                "headroom": self.base.headroom, "max_gpus": self.max_gpus, "cost_order": list(COST_ORDER),
                "changes": [c.to_json() for c in self.changes],
                "best": self.best.to_json() if self.best else None,
                "runner_up": self.runner_up.to_json() if self.runner_up else None,
                "closest": self.closest.to_json() if self.closest else None,
                "evaluations": self.evaluations, "notes": list(self.notes)}


def _cost_text(base: StepCosts, new: StepCosts) -> str:
    """The price of going from ``base`` to ``new``, in the field's terms; "none" when nothing grows."""
    parts = []
    if new.gpus != base.gpus:
        parts.append(f"{new.gpus - base.gpus:+d} GPUs")
    if new.precision != base.precision:
        parts.append(f"numerics {base.precision} -> {new.precision} (mixed precision, fp32 master weights)")
    if new.lora != base.lora:
        parts.append(f"adapters {base.lora} -> {new.lora} (a modelling choice: fewer trainable parameters)")
    if new.comm_bytes != base.comm_bytes:
        ratio = f" ({new.comm_bytes / base.comm_bytes:.2f}x)" if base.comm_bytes else ""
        parts.append(f"communication {format_bytes(base.comm_bytes)} -> {format_bytes(new.comm_bytes)} per step{ratio}")
    if new.pcie_bytes != base.pcie_bytes:
        parts.append(f"PCIe {format_bytes(base.pcie_bytes)} -> {format_bytes(new.pcie_bytes)} per step")
    if new.recompute_forwards != base.recompute_forwards:
        parts.append(f"recompute: +{new.recompute_forwards - base.recompute_forwards} forward per step (~+33% compute)"
                     if new.recompute_forwards > base.recompute_forwards else "no recompute")
    if new.micro_steps != base.micro_steps:
        parts.append(f"{new.micro_steps} micro-steps per step (was {base.micro_steps})")
    return "; ".join(parts) or "none (same traffic and compute)"


def _cost_key(base: StepCosts, c: StepCosts, knobs_changed: int = 0) -> tuple:
    """COST_ORDER, then the fewest knobs changed (of two equally cheap setups, the one nearer the user's)."""
    return (max(0, c.gpus - base.gpus), c.precision != base.precision, c.lora != base.lora, c.pcie_bytes, c.comm_bytes,
            c.recompute_forwards, c.micro_steps, knobs_changed)


def _single_changes(base: EstimateInputs, max_gpus: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(change id, description, EstimateInputs fields to replace) for one knob at a time."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    z, stage = base.zero, base.zero_stage
    if base.engine == Engine.FSDP2:
        out += _fsdp2_changes(base)
    for s in range(4 if base.engine == Engine.DEEPSPEED else 0):
        if s == stage or (s < 3 and z.offload_param != "none") or (s == 0 and z.offload_optimizer != "none"):
            continue
        out.append((f"zero_stage={s}", f"ZeRO-{s}", {"zero_stage": s}))
    if stage >= 1 and z.offload_optimizer == "none":
        out.append(("offload_optimizer=cpu", "optimizer offload (cpu)",
                    {"zero": replace(z, offload_optimizer="cpu")}))
    if stage == 3 and z.offload_param == "none":
        out.append(("offload_param=cpu", "parameter + optimizer offload",
                    {"zero": replace(z, offload_param="cpu", offload_optimizer="cpu")}))
    if not base.activation_checkpointing:
        out.append(("activation_checkpointing=true", "checkpointing", {"activation_checkpointing": True}))
    mb, gas = base.micro_batch, base.gradient_accumulation_steps
    for smaller in sorted({mb // 2, 1} - {0, mb}, reverse=True):
        if mb % smaller == 0:
            factor = mb // smaller
            out.append((f"micro_batch={smaller},gas={gas * factor}",
                        f"micro-batch {smaller} x GAS {gas * factor}",
                        {"micro_batch": smaller, "gradient_accumulation_steps": gas * factor}))
    if base.precision == "fp32":
        out.append(("precision=bf16", "bf16", _bf16_fields(base)))
    out += _knob_changes(base)
    out += _lora_changes(base)
    n = base.world_size
    while n * 2 <= max_gpus:
        n *= 2
        per_node = base.world_size // base.nodes
        nodes = n // per_node if n % per_node == 0 else 1
        out.append((f"world_size={n}", f"{n} GPUs", {"world_size": n, "nodes": nodes}))
        break  # the next doubling is one more row of the same kind; the combinations try every count
    return out


def _bf16_fields(base: EstimateInputs) -> dict[str, Any]:
    """bf16 compute: DeepSpeed's bf16 block; FSDP2's MixedPrecisionPolicy(param_dtype=bf16), fp32 shards."""
    if base.engine == Engine.FSDP2:
        return {"precision": "bf16", "fsdp2": replace(base.fsdp2, param_dtype="bf16")}
    return {"precision": "bf16"}


def _fsdp2_changes(base: EstimateInputs) -> list[tuple[str, str, dict[str, Any]]]:
    """FSDP2's own knobs, one at a time: reshard_after_forward flipped, CPU offload on."""
    f = base.fsdp2
    r = not f.reshard_after_forward
    out = [(f"reshard_after_forward={str(r).lower()}", f"reshard_after_forward {r}",
            {"fsdp2": replace(f, reshard_after_forward=r)})]
    if not f.offload_params:
        out.append(("offload_params=cpu", "CPU offload (CPUOffloadPolicy)", {"fsdp2": replace(f, offload_params=True)}))
    return out


_KNOB_LABELS = {"reduce_bucket_size": "reduce bucket", "allgather_bucket_size": "allgather bucket",
                "prefetch_bucket_size": "prefetch bucket", "max_live_parameters": "max live params",
                "param_persistence_threshold": "persistence threshold"}


def _lora_changes(base: EstimateInputs) -> list[tuple[str, str, dict[str, Any]]]:
    """With PEFT adapters in play: half the rank, and PEFT's default targets for the family when the
    setup targets more (fewer adapter parameters, their grads, master copies, optimizer state and
    activations)."""
    lora = base.peft
    if lora is None:
        return []
    out = []
    if lora.r >= 2:
        out.append((f"lora_r={lora.r // 2}", f"LoRA r {lora.r // 2}", {"peft": replace(lora, r=lora.r // 2)}))
    family = family_of((base.model_config or {}).get("model_type"))
    defaults = family.lora_default_targets if family is not None else ()
    if defaults and lora.target_modules != defaults:
        out.append((f"lora_target_modules={','.join(defaults)}", f"LoRA on {','.join(defaults)}",
                    {"peft": replace(lora, target_modules=defaults)}))
    return out


def _knob_changes(base: EstimateInputs) -> list[tuple[str, str, dict[str, Any]]]:
    """A quarter of each ZeRO buffer limit that sizes memory at this stage."""
    z, out = base.zero, []
    knobs = []
    if base.engine != Engine.DEEPSPEED:
        return out  # FSDP2 has no bucket or gathering limits to turn
    if base.zero_stage in (1, 2):
        knobs += ["reduce_bucket_size", "allgather_bucket_size"]
    if base.zero_stage == 3:
        knobs += ["reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters", "param_persistence_threshold"]
    for knob in knobs:
        value = getattr(z, knob)
        if value >= 4:
            out.append((f"{knob}={value // 4}", f"{_KNOB_LABELS[knob]} / 4",
                        {"zero": replace(z, **{knob: value // 4})}))
    return out


def _why_not(base: PeakAt, new: PeakAt, description: str) -> str:
    """What moved between two peaks, by category, largest first: why a change saved little."""
    deltas = sorted(((new.categories[c] - base.categories[c], c) for c in CATEGORIES), key=lambda d: -abs(d[0]))
    moved = [f"{c} {'+' if d > 0 else '-'}{format_bytes(abs(d))}" for d, c in deltas if d][:4]
    where = "" if (new.rank, new.phase) == (base.rank, base.phase) else \
        f"; the peak moves from rank {base.rank}'s {base.phase} to rank {new.rank}'s {new.phase}"
    body = ", ".join(moved) if moved else "no category changes at the peak"
    saved = base.bytes - new.bytes
    effect = ("leaves the peak unchanged" if saved == 0 else f"raises the peak by {format_bytes(-saved)}" if saved < 0
              else f"saves only {format_bytes(saved)}")
    return f"{description} {effect}: {body}{where}"


def _evaluate(base_inp: EstimateInputs, base_peak: PeakAt, base_costs: StepCosts, usable: int, change: str,
              description: str, fields: dict[str, Any], n_params: int) -> Change:
    try:
        inp = base_inp.with_(**fields)
        missing = activations_not_estimated(inp, shape_of(inp))
        if missing is not None:
            return Change(change, description, None, None, None, None, None, "unknown", None, unknown=missing)
        est = estimate(inp)
    except MemprofError as e:
        return Change(change, description, None, None, None, None, None, "unknown", None, unknown=str(e))
    peak, costs = PeakAt.of(est), _costs_of(inp)
    saved = base_peak.bytes - peak.bytes
    why = None
    # expected of offload: the device's master weights and optimizer state at the peak leave it
    expected = (base_peak.categories["master_params"] + base_peak.categories["optimizer_state"]
                if change.startswith("offload_") else 0)
    if saved <= base_peak.bytes // 100 or saved < 0.9 * expected:  # where the bytes went instead
        why = _why_not(base_peak, peak, description)
        if expected and saved < 0.9 * expected:
            why += (f" (the master weights and optimizer state at the peak are {format_bytes(expected)}; offload keeps "
                    "DeepSpeed's device-side buffers, and the peak is set by what stays)")
    return Change(change, description, inp, peak, saved, peak.bytes <= usable, est.host_fits,
                  _cost_text(base_costs, costs), costs, why_not=why)


def _combinations(base: EstimateInputs, max_gpus: int) -> list[tuple[str, dict[str, Any]]]:
    """Every setup the knobs reach together (stage x offload x checkpointing x micro-batch x precision x GPUs)."""
    mb, gas = base.micro_batch, base.gradient_accumulation_steps
    micro = [m for m in range(mb, 0, -1) if mb % m == 0]
    precisions = [base.precision] + (["bf16"] if base.precision == "fp32" else [])
    per_node = base.world_size // base.nodes
    worlds = [base.world_size]
    while worlds[-1] * 2 <= max_gpus:
        worlds.append(worlds[-1] * 2)
    if base.engine == Engine.FSDP2:
        return _fsdp2_combinations(base, micro, precisions, worlds, per_node)
    offloads = [("none", "none"), ("cpu", "none"), ("cpu", "cpu")]
    out = []
    for stage, (oo, op), ckpt, m, prec, n in itertools.product(range(4), offloads, sorted({base.activation_checkpointing, True}),
                                                                 micro, precisions, worlds):
        if (oo != "none" and stage == 0) or (op != "none" and stage != 3):
            continue
        fields = {"zero_stage": stage, "zero": replace(base.zero, offload_optimizer=oo, offload_param=op),
                  "activation_checkpointing": ckpt, "micro_batch": m, "gradient_accumulation_steps": gas * (mb // m),
                  "precision": prec, "world_size": n, "nodes": n // per_node if n % per_node == 0 else 1}
        parts = [f"zero_stage={stage}"] + ([f"offload_optimizer={oo}"] if oo != "none" else []) + \
                ([f"offload_param={op}"] if op != "none" else []) + (["activation_checkpointing=true"] if ckpt else []) + \
                [f"micro_batch={m},gas={gas * (mb // m)}", f"precision={prec}", f"world_size={n}"]
        out.append((",".join(parts), fields))
    return out


def _fsdp2_combinations(base: EstimateInputs, micro: list[int], precisions: list[str], worlds: list[int],
                        per_node: int) -> list[tuple[str, dict[str, Any]]]:
    """FSDP2's setups: reshard_after_forward x offload x checkpointing x micro-batch x precision x GPUs."""
    mb, gas, f = base.micro_batch, base.gradient_accumulation_steps, base.fsdp2
    out = []
    for reshard, offload, ckpt, m, prec, n in itertools.product(
            (False, True), (False, True), sorted({base.activation_checkpointing, True}), micro, precisions, worlds):
        fsdp2 = replace(f, reshard_after_forward=reshard, offload_params=offload,
                        param_dtype=f.param_dtype if prec == base.precision else "bf16")
        fields = {"fsdp2": fsdp2, "activation_checkpointing": ckpt, "micro_batch": m,
                  "gradient_accumulation_steps": gas * (mb // m), "precision": prec, "world_size": n,
                  "nodes": n // per_node if n % per_node == 0 else 1}
        parts = [f"reshard_after_forward={str(reshard).lower()}"] + (["offload_params=cpu"] if offload else []) + \
                (["activation_checkpointing=true"] if ckpt else []) + \
                [f"micro_batch={m},gas={gas * (mb // m)}", f"precision={prec}", f"world_size={n}"]
        out.append((",".join(parts), fields))
    return out


def _describe(inp: EstimateInputs) -> str:
    if inp.engine == Engine.FSDP2:
        f = inp.fsdp2
        return ", ".join([f"FSDP2 reshard_after_forward {f.reshard_after_forward}",
                          *(["CPU offload"] if f.offload_params else []),
                          *(["checkpointing"] if inp.activation_checkpointing else []),
                          f"micro-batch {inp.micro_batch} x {inp.gradient_accumulation_steps} steps",
                          inp.precision + (f" (param_dtype {f.param_dtype})" if f.param_dtype else ""),
                          f"{inp.world_size} GPUs"])
    z = inp.zero
    off = [f"{what} offload" for what, dev in (("optimizer", z.offload_optimizer), ("parameter", z.offload_param)) if dev != "none"]
    return ", ".join([f"ZeRO-{inp.zero_stage}", *off, *(["checkpointing"] if inp.activation_checkpointing else []),
                      f"micro-batch {inp.micro_batch} x {inp.gradient_accumulation_steps} steps", inp.precision,
                      f"{inp.world_size} GPUs"])


def _search(base: EstimateInputs, base_peak: PeakAt, base_costs: StepCosts, usable: int, max_gpus: int,
            n_params: int, advice: Advice) -> None:
    """The cheapest and runner-up combinations that fit (COST_ORDER), or the closest when none does."""
    fitting, nearest = [], None
    for change, fields in _combinations(base, max_gpus):
        try:
            inp = base.with_(**fields)
        except MemprofError:
            continue
        advice.evaluations += 1
        device, host_per_rank = peak_device_and_host_bytes(inp)
        host_ok = base.host_memory_bytes is None or host_per_rank * (inp.world_size // inp.nodes) <= base.host_memory_bytes
        costs = _costs_of(inp)
        if device <= usable and host_ok:
            changed = sum(getattr(inp, k) != getattr(base, k) for k in _fields_of(base))
            fitting.append((_cost_key(base_costs, costs, changed), change, inp))
        elif host_ok and (nearest is None or device < nearest[0]):
            nearest = (device, change, inp)
    fitting.sort(key=lambda f: f[0])
    picks = [_evaluate(base, base_peak, base_costs, usable, change, _describe(inp), _fields_of(inp), n_params)
             for _, change, inp in fitting[:2]]
    advice.best = picks[0] if picks else None
    advice.runner_up = picks[1] if len(picks) > 1 else None
    if not picks and nearest is not None:
        advice.closest = _evaluate(base, base_peak, base_costs, usable, nearest[1], _describe(nearest[2]),
                                   _fields_of(nearest[2]), n_params)


def _fields_of(inp: EstimateInputs) -> dict[str, Any]:
    return {k: getattr(inp, k) for k in ("zero_stage", "zero", "activation_checkpointing", "micro_batch",
                                         "gradient_accumulation_steps", "precision", "world_size", "nodes", "fsdp2")}


def _smallest_sharding(base: EstimateInputs) -> dict[str, Any]:
    """The fields of the engine's most sharded, most offloaded setup (the "even ..." note)."""
    if base.engine == Engine.FSDP2:
        return {"fsdp2": replace(base.fsdp2, reshard_after_forward=True, offload_params=True)}
    return {"zero_stage": 3, "zero": replace(base.zero, offload_optimizer="cpu", offload_param="cpu")}


def advise(base: EstimateInputs, max_gpus: int | None = None) -> Advice:
    """Evaluate ``base``, every single change, and the combinations; see the module docstring."""
    if base.gpu_memory_bytes is None:
        raise MemprofError("advise needs the GPU memory size: pass --gpu-memory, e.g. 80GiB")
    if base.layout != "deepspeed":
        raise MemprofError(f"advise works on DeepSpeed's own layout, not --layout {base.layout}: drop --layout")
    shape = shape_of(base)
    missing = activations_not_estimated(base, shape)
    if missing is not None:
        raise MemprofError(f"{missing}, so advise cannot tell what fits: pass --model or --model-config of a GPT-2 "
                           "or Llama-family model")
    max_gpus = base.world_size if max_gpus is None else max_gpus
    if max_gpus < base.world_size:
        raise MemprofError(f"--max-gpus {max_gpus} is below the setup's {base.world_size} GPUs: raise --max-gpus")
    usable = int(base.gpu_memory_bytes * (1 - base.headroom))
    est = estimate(base)
    base_peak, base_costs = PeakAt.of(est), _costs_of(base)
    smallest_params = min(peak_device_and_host_bytes(base.with_(
        **_smallest_sharding(base), world_size=max_gpus, nodes=1, micro_batch=1,
        gradient_accumulation_steps=base.gradient_accumulation_steps * base.micro_batch,
        activation_checkpointing=True))[0], base_peak.bytes)
    advice = Advice(base, base_peak, usable, base_peak.bytes <= usable, est.host_fits, [], None, None, None, max_gpus)
    advice.changes = [_evaluate(base, base_peak, base_costs, usable, c, d, f, shape.n_params)
                      for c, d, f in _single_changes(base, max_gpus)]
    advice.evaluations = 1 + len(advice.changes)
    _search(base, base_peak, base_costs, usable, max_gpus, shape.n_params, advice)
    if advice.base_fits and advice.base_host_fits is not False:  # nothing to change: the recommendation is the setup
        as_given = _evaluate(base, base_peak, base_costs, usable, "as_given", "the setup as given", {}, shape.n_params)
        same = advice.best is not None and _fields_of(advice.best.inputs) == _fields_of(base)
        advice.best, advice.runner_up = as_given, (advice.runner_up if same else advice.best)
    if advice.best is None and smallest_params > usable:
        smallest = "FSDP2 with CPU offload" if base.engine == Engine.FSDP2 else "ZeRO-3 with both offloads"
        advice.notes.append(f"even {smallest}, checkpointing and micro-batch 1 on {max_gpus} GPUs peaks at "
                            f"{format_bytes(smallest_params)}, over the usable {format_bytes(usable)}")
    if base.precision != "fp32":
        advice.notes.append("bf16 instead of fp32: not offered, the setup already computes in " + base.precision)
    if base.peft is None:
        advice.notes.append("LoRA rank / targets: offered when the setup has adapters (--peft-config or --lora-r)")
    return advice
