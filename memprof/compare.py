"""Measured beside estimated: the one definition, used by ``memprof compare`` and by the report.

For each rank present in a run, the last complete step (:func:`last_complete_step`: the last step
record holding all three phases) is taken as steady state (step 1's optimizer state is created
lazily, so later steps are what the estimator models):

* at rest (the ``step`` phase's ``end`` breakdown) per location and category, measured vs estimated;
* per phase, the peak device total, measured vs estimated; with gradient accumulation (k > 1
  micro-steps per optimizer step, one step record each) the largest over the last complete cycle
  of k micro-steps ending at a boundary, the worst micro-step the estimate models
  (:func:`peak_snapshots`: the step record of that peak);
* per phase and device category, the bytes at that peak snapshot vs the estimate's breakdown of
  that phase's peak moment; the error is a share of the phase's measured peak
  ((estimated - measured) / measured peak), so a small category is judged by what it does to the peak.

The estimate's figures for a rank are :func:`estimate_for_rank`'s (rank 0's stand in for a rank the
estimator did not list); the error is :func:`relative_error`, (estimated - measured) / measured.
Tolerances are the ones memprof promises: resident model states (``params``, ``master_params``,
``optimizer_state``) within 0.5%, per-phase peak totals within 3%, each category at a phase peak
within 3% of that peak (gated by ``--check`` by default: :data:`CHECK_CATEGORIES_BY_DEFAULT`;
``--no-check-categories`` checks the totals only). :mod:`memprof.report` builds its tables
and charts on :func:`comparison_of`, so the page can never disagree with ``memprof compare --check``.

:func:`rank_differences` names, for each phase whose peaks differ across ranks by more than
:data:`RANK_SPREAD`, the category (and owner, where the run records owners) that makes the
heaviest rank heavier than the lightest, beside the estimate's per-rank breakdowns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from memprof.categories import CATEGORIES, LOCATIONS, PHASES
from memprof.errors import MemprofError
from memprof.units import format_bytes

RESIDENT_TOLERANCE = 0.005
PEAK_TOLERANCE = 0.03  # every phase peak within 3% (issue 8's accuracy bar; the matrix tests hold it)
CATEGORY_TOLERANCE = 0.03  # every category at a phase peak within 3% of that peak (issue 17)
RESIDENT_CHECKED = ("params", "master_params", "optimizer_state")
CHECK_CATEGORIES_BY_DEFAULT = True
"""Whether ``compare --check`` (and the report's verdict) gates the per-category rows. On since the
profiler names its transients (issue 17: `other` at most 1% of every phase peak of the test matrix);
``--no-check-categories`` gates the totals only."""
RANK_SPREAD = 0.01  # ranks whose phase peaks differ by more than 1% of the lighter one: named
PEAK_OWNERS_KEY = "peak_owners"
"""Optional key of a phase record: ``{location: {category: {owner: bytes}}}`` at the peak, where a
profiler records who holds the bytes; :func:`rank_differences` names the owner from it."""


def relative_error(measured: int, estimated: int) -> float | None:
    """(estimated - measured) / measured; None when both are 0, inf when only the measurement is."""
    if measured == 0:
        return None if estimated == 0 else math.inf
    return (estimated - measured) / measured


def category_row_name(phase: str, category: str) -> str:
    """The ``name`` of the per-category row of ``category`` at ``phase``'s peak."""
    return f"{phase}/{category}"


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
    what: str  # "rest", "peak" or "category" (a category at a phase peak)
    location: str  # "device"/"host" for rest rows; "device" for peak and category rows
    name: str  # category for rest rows, phase for peak rows, "phase/category" for category rows
    measured: int
    estimated: int
    tolerance: float | None  # None: shown, not checked
    step: int | None = None  # peak and category rows: the step record whose peak they read
    share_of: int | None = None
    """Category rows: the phase's measured peak total; their error is a share of it."""

    @property
    def error(self) -> float | None:
        """Relative error of the estimate against the measurement (None when both are 0); for a
        category row, (estimated - measured) / the phase's measured peak."""
        if self.share_of is not None:
            diff = self.estimated - self.measured
            if self.share_of == 0:
                return None if diff == 0 else math.inf
            return diff / self.share_of
        return relative_error(self.measured, self.estimated)

    @property
    def ok(self) -> bool | None:
        if self.tolerance is None:
            return None
        if self.measured == self.estimated:
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
    check_categories: bool = CHECK_CATEGORIES_BY_DEFAULT
    """Whether the per-category rows count in :attr:`ok` (``--check-categories``)."""
    rank_differences: list[RankDifference] = field(default_factory=list)

    def gates(self, row: Row) -> bool:
        """Whether ``row`` counts in ``compare --check``'s verdict."""
        return row.tolerance is not None and (row.what != "category" or self.check_categories)

    @property
    def ok(self) -> bool:
        return not self.failures()

    def failures(self) -> list[Row]:
        """The gated rows outside their tolerance."""
        return [r for r in self.rows if self.gates(r) and r.ok is False]

    def category_misses(self) -> list[Row]:
        """Category rows outside :data:`CATEGORY_TOLERANCE`, gated or not."""
        return [r for r in self.rows if r.what == "category" and r.ok is False]

    def rows_by_figure(self) -> dict[tuple[int, str, str, str], Row]:
        """The rows keyed by (rank, what, location, name)."""
        return {(r.rank, r.what, r.location, r.name): r for r in self.rows}

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tolerances": {"resident": RESIDENT_TOLERANCE, "peak": PEAK_TOLERANCE, "category": CATEGORY_TOLERANCE},
            "categories_checked": self.check_categories,
            "steps_compared": {str(k): v for k, v in self.step.items()},
            "missing_ranks": self.missing_ranks,
            "warnings": list(self.warnings),
            # rest and peak rows as before; the category rows apart, so readers of "rows" (the
            # matrix tests, benchmarks/sweep_configs.py) count the same figures as before
            "rows": [dict(asdict(r), error=r.error, ok=r.ok) for r in self.rows if r.what != "category"],
            "category_rows": [dict(asdict(r), error=r.error, ok=r.ok) for r in self.rows if r.what == "category"],
            "rank_differences": [d.to_json() for d in self.rank_differences],
        }


def steady_cycle_indices(rank_entry: dict[str, Any], gradient_accumulation_steps: int) -> list[int]:
    """Indices in ``rank_entry["steps"]`` of :func:`steady_cycle`'s records."""
    k = max(1, int(gradient_accumulation_steps or 1))
    steps = rank_entry.get("steps") or []
    complete = {int(s["step"]): i for i, s in enumerate(steps) if all(p in (s.get("phases") or {}) for p in PHASES)}
    for end in sorted((n for n in complete if (n + 1) % k == 0), reverse=True):
        cycle = [complete.get(n) for n in range(end - k + 1, end + 1)]
        if all(i is not None for i in cycle):
            return cycle  # type: ignore[return-value]
    last = last_complete_step_index(rank_entry)
    return [] if last is None else [last]


def steady_cycle(rank_entry: dict[str, Any], gradient_accumulation_steps: int) -> list[dict[str, Any]]:
    """The last complete accumulation cycle of a rank: the k step records ending at the last
    complete boundary micro-step (DeepSpeed's engine.is_gradient_accumulation_boundary: micro-step
    index i with (i + 1) % k == 0, counting from the run's first step 0). Falls back to the last
    complete step when the run holds no whole cycle."""
    return [rank_entry["steps"][i] for i in steady_cycle_indices(rank_entry, gradient_accumulation_steps)]


def run_gas(run_doc: dict[str, Any]) -> int:
    """The run's gradient accumulation steps (1 when unrecorded or not an int)."""
    gas = (run_doc.get("run") or {}).get("gradient_accumulation_steps") or 1
    return gas if isinstance(gas, int) and gas > 0 else 1


def peak_snapshots(cycle: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per phase, the step record of ``cycle`` whose peak of that phase is highest (the latest on
    a tie): the snapshot the peak and category rows read."""
    out = {}
    for phase in PHASES:
        if cycle:
            out[phase] = max(reversed(cycle), key=lambda s: int(s["phases"][phase]["peak_total"]))
    return out


def _rest_rows(rank: int, rest: dict[str, Any], est: dict[str, Any]) -> list[Row]:
    return [Row(rank=rank, what="rest", location=loc, name=cat, measured=int(rest.get(loc, {}).get(cat, 0)),
                estimated=int((est.get(loc) or {}).get(cat, 0)),
                tolerance=RESIDENT_TOLERANCE if cat in RESIDENT_CHECKED else None)
            for loc in LOCATIONS for cat in CATEGORIES]


def _peak_rows(rank: int, snapshots: dict[str, dict[str, Any]], est: dict[str, Any]) -> list[Row]:
    """Per phase the peak total, then every device category at that peak (as a share of it)."""
    rows = []
    for phase, snap in snapshots.items():
        est_phase = (est.get("phases") or {}).get(phase)
        if est_phase is None:
            continue
        record, step = snap["phases"][phase], int(snap["step"])
        peak = int(record["peak_total"])
        rows.append(Row(rank=rank, what="peak", location="device", name=phase, measured=peak,
                        estimated=int(est_phase["peak_total"]), tolerance=PEAK_TOLERANCE, step=step))
        if est_phase.get("peak") is None:
            continue  # an estimate without the breakdown of its peak moment: totals only
        measured, estimated = record["peak"].get("device") or {}, est_phase["peak"].get("device") or {}
        rows += [Row(rank=rank, what="category", location="device", name=category_row_name(phase, cat),
                     measured=int(measured.get(cat, 0)), estimated=int(estimated.get(cat, 0)),
                     tolerance=CATEGORY_TOLERANCE, step=step, share_of=peak)
                 for cat in CATEGORIES]
    return rows


def _first_step_warning(gas: int) -> str:
    # The estimate is a steady cycle's; in the first optimizer step, state that the optimizer
    # creates lazily (Adam's exp_avg/exp_avg_sq, momentum buffers) does not exist yet in
    # forward/backward, so its peaks can sit below the estimate by that state.
    return (f"only the run's first optimizer step could be compared (micro-steps 0-{gas - 1}): lazily created "
            f"optimizer state does not exist yet in it; run at least {2 * gas} steps to compare a steady one")


def comparison_of(run_doc: dict[str, Any], estimate: dict[str, Any],
                  check_categories: bool = CHECK_CATEGORIES_BY_DEFAULT) -> Comparison:
    """Every figure of every rank of ``run_doc`` that has a complete step, beside ``estimate`` (the
    estimator's JSON for the run's setup, listing at least one rank). Ranks without a complete step
    give no rows; nothing is raised for them (the report shows such runs too)."""
    out = Comparison(missing_ranks=list(run_doc.get("missing_ranks") or []), check_categories=check_categories)
    gas = run_gas(run_doc)
    for entry in run_doc["ranks"]:
        rank = int(entry["rank"])
        cycle = steady_cycle(entry, gas)
        est = estimate_for_rank(estimate, rank)
        if not cycle or est is None:
            continue
        out.step[rank] = int(cycle[-1]["step"])
        if int(cycle[0]["step"]) == 0 and not out.warnings:
            out.warnings.append(_first_step_warning(gas))
        out.rows += _rest_rows(rank, cycle[-1]["phases"]["step"]["end"], est)
        out.rows += _peak_rows(rank, peak_snapshots(cycle), est)
    out.rank_differences = rank_differences(run_doc, estimate)
    return out


def compare_run(run_doc: dict[str, Any], estimate: dict[str, Any],
                check_categories: bool = CHECK_CATEGORIES_BY_DEFAULT) -> Comparison:
    """:func:`comparison_of`, for ``memprof compare``: MemprofError when there is nothing to compare."""
    if not estimate.get("ranks"):
        raise MemprofError("the estimate has no ranks: nothing to compare against")
    out = comparison_of(run_doc, estimate, check_categories)
    if not out.rows:
        raise MemprofError("the run has no complete step on any rank: nothing to compare")
    return out


# ---- why one rank is heavier ---------------------------------------------------------------------

@dataclass
class CategoryGap:
    """One device category at a phase peak on the heavier and the lighter rank, measured and
    estimated (the estimate's entries for those two ranks; None without an estimate)."""

    category: str
    heavier: int
    lighter: int
    estimated_heavier: int | None = None
    estimated_lighter: int | None = None
    owner: str | None = None  # the owner whose bytes differ most, where the run records owners
    owner_difference: int | None = None

    @property
    def difference(self) -> int:
        return self.heavier - self.lighter

    @property
    def estimated_difference(self) -> int | None:
        if self.estimated_heavier is None or self.estimated_lighter is None:
            return None
        return self.estimated_heavier - self.estimated_lighter


@dataclass
class RankDifference:
    """At one phase's peak, the heaviest rank against the lightest, and what makes the difference."""

    phase: str
    heavier_rank: int
    lighter_rank: int
    heavier_peak: int
    lighter_peak: int
    heavier_step: int
    lighter_step: int
    gaps: list[CategoryGap]  # every device category whose bytes differ, largest difference first
    estimate_tells_apart: bool | None
    """Whether the estimate has an entry of its own for each of the two ranks (None: no estimate);
    when it does not, one layout stands for both and it predicts no difference."""

    @property
    def spread(self) -> float:
        """(heavier - lighter) / lighter."""
        return (self.heavier_peak - self.lighter_peak) / self.lighter_peak if self.lighter_peak else math.inf

    @property
    def cause(self) -> CategoryGap | None:
        """The category that makes most of the difference (None when no category is heavier)."""
        return self.gaps[0] if self.gaps and self.gaps[0].difference > 0 else None

    @property
    def estimated_cause(self) -> CategoryGap | None:
        """The category in which the estimate puts the largest difference between the two ranks."""
        diffs = [g for g in self.gaps if g.estimated_difference]
        return max(diffs, key=lambda g: g.estimated_difference or 0, default=None)

    def words(self) -> str:
        """One sentence: which rank is heavier, by how much, and which category (owner) makes it."""
        h, lo = self.heavier_rank, self.lighter_rank
        text = (f"{self.phase} peak: rank {h} is {self.spread:.1%} heavier than rank {lo} "
                f"({format_bytes(self.heavier_peak, precision=2)} vs {format_bytes(self.lighter_peak, precision=2)}, "
                f"+{format_bytes(self.heavier_peak - self.lighter_peak)})")
        cause = self.cause
        if cause is None:
            return text
        text += (f"; {cause.category} makes +{format_bytes(cause.difference)} of it "
                 f"({format_bytes(cause.heavier)} vs {format_bytes(cause.lighter)} measured")
        if cause.owner is not None:
            text += f", most of it {cause.owner}, +{format_bytes(cause.owner_difference or 0)}"
        text += ")"
        held = self.held_cause
        if held is not None:
            text += (f"; of what the ranks hold, the largest difference is {held.owner} ({held.category}), "
                     f"+{format_bytes(held.owner_difference or 0)}")
        return text + self._estimate_words(cause)

    @property
    def held_cause(self) -> CategoryGap | None:
        """Where the cause has no owner (activations, other: nobody holds them), the category whose
        named owner differs most between the two ranks (an uneven gradient partition under a
        heavier activation peak); None where the cause names its owner or no owner differs."""
        cause = self.cause
        if cause is None or cause.owner is not None:
            return None
        held = [g for g in self.gaps if g.owner is not None and (g.owner_difference or 0) > 0]
        return max(held, key=lambda g: g.owner_difference or 0, default=None)

    def _estimate_words(self, cause: CategoryGap) -> str:
        if self.estimate_tells_apart is None:
            return ""
        if not self.estimate_tells_apart:
            return f"; the estimate gives ranks {self.heavier_rank} and {self.lighter_rank} one layout: no difference"
        said = (f"; estimated {cause.category}: {format_bytes(cause.estimated_heavier or 0)} vs "
                f"{format_bytes(cause.estimated_lighter or 0)} ({_signed(cause.estimated_difference or 0)})")
        other = self.estimated_cause
        if other is not None and other.category != cause.category:
            said += f"; the estimate puts its largest difference in {other.category} ({_signed(other.estimated_difference or 0)})"
        return said

    def to_json(self) -> dict[str, Any]:
        cause = self.cause
        held = self.held_cause
        return dict(asdict(self), spread=self.spread, words=self.words(),
                    cause=None if cause is None else cause.category,
                    cause_owner=None if cause is None else cause.owner,
                    held_owner=None if held is None else {"category": held.category, "owner": held.owner,
                                                          "difference": held.owner_difference})


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "-") + format_bytes(abs(n))


def _owner_gap(heavier: dict[str, Any], lighter: dict[str, Any], category: str) -> tuple[str | None, int | None]:
    """The owner of ``category`` whose bytes differ most between two phase records (by the
    optional :data:`PEAK_OWNERS_KEY`), or (None, None) where the run records no owners."""
    def owners(record: dict[str, Any]) -> dict[str, int]:
        return ((record.get(PEAK_OWNERS_KEY) or {}).get("device") or {}).get(category) or {}

    h, lo = owners(heavier), owners(lighter)
    if not h and not lo:
        return None, None
    diffs = {o: int(h.get(o, 0)) - int(lo.get(o, 0)) for o in set(h) | set(lo)}
    owner = max(sorted(diffs), key=lambda o: diffs[o])
    return (owner, diffs[owner]) if diffs[owner] > 0 else (None, None)


def _difference_at(phase: str, heavy: tuple[int, dict[str, Any]], light: tuple[int, dict[str, Any]],
                   estimate: dict[str, Any] | None) -> RankDifference:
    (h_rank, h_step), (l_rank, l_step) = heavy, light
    h_rec, l_rec = h_step["phases"][phase], l_step["phases"][phase]
    est_h, est_l = estimate_for_rank(estimate, h_rank), estimate_for_rank(estimate, l_rank)

    def est_bytes(est: dict[str, Any] | None, cat: str) -> int | None:
        peak = (((est or {}).get("phases") or {}).get(phase) or {}).get("peak")
        return None if peak is None else int((peak.get("device") or {}).get(cat, 0))

    gaps = []
    for cat in CATEGORIES:
        gap = CategoryGap(cat, int(h_rec["peak"]["device"].get(cat, 0)), int(l_rec["peak"]["device"].get(cat, 0)),
                          est_bytes(est_h, cat), est_bytes(est_l, cat))
        if gap.difference or gap.estimated_difference:
            gap.owner, gap.owner_difference = _owner_gap(h_rec, l_rec, cat)
            gaps.append(gap)
    gaps.sort(key=lambda g: (-g.difference, CATEGORIES.index(g.category)))
    listed = {int(r["rank"]) for r in (estimate or {}).get("ranks") or []}
    tells_apart = None if est_h is None else (h_rank in listed and l_rank in listed)
    return RankDifference(phase, h_rank, l_rank, int(h_rec["peak_total"]), int(l_rec["peak_total"]),
                          int(h_step["step"]), int(l_step["step"]), gaps, tells_apart)


def rank_differences(run_doc: dict[str, Any], estimate: dict[str, Any] | None = None) -> list[RankDifference]:
    """Per phase (in order), where the ranks' peaks (each rank's :func:`peak_snapshots` of its
    steady cycle, as the peak rows read) differ by more than :data:`RANK_SPREAD` of the lighter:
    the heaviest rank (the lowest on a tie) against the lightest, category by category.
    ``estimate``: the run's stored one when not given."""
    estimate = run_doc.get("estimate") if estimate is None else estimate
    gas = run_gas(run_doc)
    snapshots = {}
    for entry in run_doc["ranks"]:
        cycle = steady_cycle(entry, gas)
        if cycle:
            snapshots[int(entry["rank"])] = peak_snapshots(cycle)
    out = []
    for phase in PHASES:
        peaks = sorted((int(s[phase]["phases"][phase]["peak_total"]), rank) for rank, s in snapshots.items())
        if len(peaks) < 2:
            continue
        (low, l_rank), high = peaks[0], max(peaks, key=lambda p: (p[0], -p[1]))
        if high[0] - low <= RANK_SPREAD * low:
            continue
        out.append(_difference_at(phase, (high[1], snapshots[high[1]][phase]), (l_rank, snapshots[l_rank][phase]),
                                  estimate))
    return out
