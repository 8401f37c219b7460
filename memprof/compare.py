"""Measured beside estimated: the one definition, used by ``memprof compare`` and by the report.

For each rank present in a run, the last complete step (:func:`last_complete_step`: the last step
record holding all three phases) is taken as steady state (step 1's optimizer state is created
lazily, so later steps are what the estimator models):

* at rest (the ``step`` phase's ``end`` breakdown) per location and category, measured vs estimated;
* per phase, the peak device total, measured vs estimated; with gradient accumulation (k > 1
  micro-steps per optimizer step, one step record each) the largest over the last complete cycle
  of k micro-steps ending at a boundary, the worst micro-step the estimate models.

The estimate's figures for a rank are :func:`estimate_for_rank`'s (rank 0's stand in for a rank the
estimator did not list); the error is :func:`relative_error`, (estimated - measured) / measured.
Tolerances are the ones memprof promises: resident model states (``params``, ``master_params``,
``optimizer_state``) within 0.5%, per-phase peak totals within 3%. :mod:`memprof.report` builds its
tables and charts on :func:`comparison_of`, so the page can never disagree with
``memprof compare --check``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS, PHASES
from memprof.errors import MemprofError

RESIDENT_TOLERANCE = 0.005
PEAK_TOLERANCE = 0.03  # every phase peak within 3% (issue 8's accuracy bar; the matrix tests hold it)
RESIDENT_CHECKED = ("params", "master_params", "optimizer_state")


def relative_error(measured: int, estimated: int) -> float | None:
    """(estimated - measured) / measured; None when both are 0, inf when only the measurement is."""
    if measured == 0:
        return None if estimated == 0 else math.inf
    return (estimated - measured) / measured


def last_complete_step_index(rank_entry: dict[str, Any]) -> int | None:
    """Index in ``rank_entry["steps"]`` of the last step record that has all three phases."""
    steps = rank_entry.get("steps") or []
    for i in range(len(steps) - 1, -1, -1):
        if all(p in (steps[i].get("phases") or {}) for p in PHASES):
            return i
    return None


def last_complete_step(rank_entry: dict[str, Any]) -> dict[str, Any] | None:
    """The last step record of a rank that has all three phases (None when there is none)."""
    i = last_complete_step_index(rank_entry)
    return None if i is None else rank_entry["steps"][i]


def estimate_for_rank(estimate: dict[str, Any] | None, rank: int) -> dict[str, Any] | None:
    """The estimator's entry for ``rank``. The estimator may give one entry per distinct layout, so
    rank 0's (the lowest rank listed) stands in for a rank it did not list. None without an estimate
    or when it lists no rank."""
    if not estimate or not estimate.get("ranks"):
        return None
    by_rank = {int(r["rank"]): r for r in estimate["ranks"]}
    return by_rank.get(rank, by_rank[min(by_rank)])


@dataclass
class Row:
    """One measured-vs-estimated figure of one rank."""

    rank: int
    what: str  # "rest" or "peak"
    location: str  # "device"/"host" for rest rows; "device" for peak rows
    name: str  # category for rest rows, phase for peak rows
    measured: int
    estimated: int
    tolerance: float | None  # None: shown, not checked

    @property
    def error(self) -> float | None:
        """Relative error of the estimate against the measurement (None when both are 0)."""
        return relative_error(self.measured, self.estimated)

    @property
    def ok(self) -> bool | None:
        if self.tolerance is None:
            return None
        if self.measured == 0 and self.estimated == 0:
            return True
        err = self.error
        return err is not None and abs(err) <= self.tolerance


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    step: dict[int, int] = field(default_factory=dict)  # rank -> step compared
    missing_ranks: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What makes the comparison weaker than it looks (e.g. only the run's first optimizer step was
    compared, before lazily created optimizer state exists)."""

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.rows)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    def rows_by_figure(self) -> dict[tuple[int, str, str, str], Row]:
        """The rows keyed by (rank, what, location, name)."""
        return {(r.rank, r.what, r.location, r.name): r for r in self.rows}

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tolerances": {"resident": RESIDENT_TOLERANCE, "peak": PEAK_TOLERANCE},
            "steps_compared": {str(k): v for k, v in self.step.items()},
            "missing_ranks": self.missing_ranks,
            "warnings": list(self.warnings),
            "rows": [dict(asdict(r), error=r.error, ok=r.ok) for r in self.rows],
        }


def steady_cycle(rank_entry: dict[str, Any], gradient_accumulation_steps: int) -> list[dict[str, Any]]:
    """The last complete accumulation cycle of a rank: the k step records ending at the last
    complete boundary micro-step (DeepSpeed's engine.is_gradient_accumulation_boundary: micro-step
    index i with (i + 1) % k == 0, counting from the run's first step 0). Falls back to the last
    complete step when the run holds no whole cycle."""
    k = max(1, int(gradient_accumulation_steps or 1))
    complete = {int(s["step"]): s for s in rank_entry.get("steps") or [] if all(p in (s.get("phases") or {}) for p in PHASES)}
    for end in sorted((i for i in complete if (i + 1) % k == 0), reverse=True):
        cycle = [complete.get(i) for i in range(end - k + 1, end + 1)]
        if all(cycle):
            return cycle
    last = last_complete_step(rank_entry)
    return [last] if last else []


def comparison_of(run_doc: dict[str, Any], estimate: dict[str, Any]) -> Comparison:
    """Every figure of every rank of ``run_doc`` that has a complete step, beside ``estimate`` (the
    estimator's JSON for the run's setup, listing at least one rank). Ranks without a complete step
    give no rows; nothing is raised for them (the report shows such runs too)."""
    out = Comparison(missing_ranks=list(run_doc.get("missing_ranks") or []))
    gas = (run_doc.get("run") or {}).get("gradient_accumulation_steps") or 1
    for entry in run_doc["ranks"]:
        rank = int(entry["rank"])
        cycle = steady_cycle(entry, gas if isinstance(gas, int) else 1)
        est = estimate_for_rank(estimate, rank)
        if not cycle or est is None:
            continue
        step = cycle[-1]
        out.step[rank] = int(step["step"])
        if int(cycle[0]["step"]) == 0 and not out.warnings:
            # The estimate is a steady cycle's; in the first optimizer step, state that the
            # optimizer creates lazily (Adam's exp_avg/exp_avg_sq, momentum buffers) does not exist
            # yet in forward/backward, so its peaks can sit below the estimate by that state.
            k = gas if isinstance(gas, int) and gas > 0 else 1
            out.warnings.append(
                f"only the run's first optimizer step could be compared (micro-steps 0-{k - 1}): lazily created "
                f"optimizer state does not exist yet in it; run at least {2 * k} steps to compare a steady one"
            )
        rest = step["phases"]["step"]["end"]
        for loc in LOCATIONS:
            for cat in CATEGORIES:
                out.rows.append(
                    Row(
                        rank=rank,
                        what="rest",
                        location=loc,
                        name=cat,
                        measured=int(rest.get(loc, {}).get(cat, 0)),
                        estimated=int((est.get(loc) or {}).get(cat, 0)),
                        tolerance=RESIDENT_TOLERANCE if cat in RESIDENT_CHECKED else None,
                    )
                )
        for phase in PHASES:
            est_phase = (est.get("phases") or {}).get(phase)
            if est_phase is None:
                continue
            out.rows.append(
                Row(
                    rank=rank,
                    what="peak",
                    location="device",
                    name=phase,
                    measured=max(int(s["phases"][phase]["peak_total"]) for s in cycle),
                    estimated=int(est_phase["peak_total"]),
                    tolerance=PEAK_TOLERANCE,
                )
            )
    return out


def compare_run(run_doc: dict[str, Any], estimate: dict[str, Any]) -> Comparison:
    """:func:`comparison_of`, for ``memprof compare``: MemprofError when there is nothing to compare."""
    if not estimate.get("ranks"):
        raise MemprofError("the estimate has no ranks: nothing to compare against")
    out = comparison_of(run_doc, estimate)
    if not out.rows:
        raise MemprofError("the run has no complete step on any rank: nothing to compare")
    return out
