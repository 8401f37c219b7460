"""Measured beside estimated: the plain data behind ``memprof compare`` (and the tests' checks).

For each rank present in a run, the last complete step is taken as steady state (step 1's optimizer
state is created lazily, so later steps are what the estimator models):

* at rest (the ``step`` phase's ``end`` breakdown) per location and category, measured vs estimated;
* per phase, the peak device total, measured vs estimated; with gradient accumulation (k > 1
  micro-steps per optimizer step, one step record each) the largest over the last complete cycle
  of k micro-steps ending at a boundary, the worst micro-step the estimate models.

Tolerances are the ones memprof promises: resident model states (``params``, ``master_params``,
``optimizer_state``) within 0.5%, per-phase peak totals within 5%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS, PHASES
from memprof.errors import MemprofError

RESIDENT_TOLERANCE = 0.005
PEAK_TOLERANCE = 0.05
RESIDENT_CHECKED = ("params", "master_params", "optimizer_state")


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
        if self.measured == 0:
            return None if self.estimated == 0 else float("inf")
        return (self.estimated - self.measured) / self.measured

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

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.rows)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tolerances": {"resident": RESIDENT_TOLERANCE, "peak": PEAK_TOLERANCE},
            "steps_compared": {str(k): v for k, v in self.step.items()},
            "missing_ranks": self.missing_ranks,
            "rows": [dict(asdict(r), error=r.error, ok=r.ok) for r in self.rows],
        }


def last_complete_step(rank_entry: dict[str, Any]) -> dict[str, Any] | None:
    """The last step record of a rank that has all three phases."""
    for step in reversed(rank_entry.get("steps") or []):
        if all(p in (step.get("phases") or {}) for p in PHASES):
            return step
    return None


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


def compare_run(run_doc: dict[str, Any], estimate: dict[str, Any]) -> Comparison:
    """Compare every rank of ``run_doc`` with ``estimate`` (the estimator's JSON for its setup)."""
    est_ranks = {int(r["rank"]): r for r in estimate.get("ranks", [])}
    if not est_ranks:
        raise MemprofError("the estimate has no ranks: nothing to compare against")
    out = Comparison(missing_ranks=list(run_doc.get("missing_ranks") or []))
    gas = (run_doc.get("run") or {}).get("gradient_accumulation_steps") or 1
    for entry in run_doc["ranks"]:
        rank = int(entry["rank"])
        cycle = steady_cycle(entry, gas if isinstance(gas, int) else 1)
        if not cycle:
            continue
        step = cycle[-1]
        out.step[rank] = int(step["step"])
        # the estimator may give one rank per distinct layout; fall back to rank 0's figures
        est = est_ranks.get(rank, est_ranks[min(est_ranks)])
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
                        estimated=int(est.get(loc, {}).get(cat, 0)),
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
    if not out.rows:
        raise MemprofError("the run has no complete step on any rank: nothing to compare")
    return out
