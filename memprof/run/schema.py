"""Shape check of a run doc (the memprof.json shape of :mod:`memprof.run.files`) before
``memprof compare`` or the report reads it, so a malformed file is one clear line.

:func:`memprof.run.files.load_run` already checks the envelope (valid JSON, schema version, ``run`` and
``ranks`` present); :func:`check_run_doc` checks, with pydantic, every field compare and the report
read, so the message names the exact place (``ranks.0.steps.3.phases.step.peak_total``). Two passes
keep it fast on big runs (64 ranks x 1,000 steps): every step's number, loss and phase peak totals,
which the charts read, then the full breakdowns only of the steps the tables show (each rank's last
complete step, :func:`memprof.compare.last_complete_step`). :func:`check_phase_records` checks the
full breakdowns of further steps a reader uses (the report's stacked timeline).
Extra keys are allowed: newer writers may add fields within the same schema version.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from memprof.categories import PHASES
from memprof.compare import last_complete_step_index
from memprof.errors import MemprofError

# Lax ints on purpose: a JSON writer may emit 1.0e6 for a byte count; pydantic rejects fractions.
Breakdown = dict[str, dict[str, int]]


class _PhasePeak(TypedDict):
    peak_total: int


class _StepSeries(TypedDict):
    step: int
    loss: NotRequired[float | None]
    phases: dict[str, _PhasePeak]


class _Oom(TypedDict):
    step: NotRequired[int | None]
    phase: NotRequired[str | None]
    breakdown: NotRequired[Breakdown | None]
    total_bytes: NotRequired[int | None]
    budget_bytes: NotRequired[int | None]
    message: NotRequired[str | None]


class _Rank(TypedDict):
    rank: int
    host: NotRequired[str | None]
    device: NotRequired[str | None]
    steps: list[_StepSeries]
    oom: NotRequired[_Oom | None]
    complete: NotRequired[bool]
    peak_host_rss_bytes: NotRequired[int | None]


class _EstimatePhase(TypedDict):
    peak_total: int
    peak: NotRequired[Breakdown]  # the breakdown at the phase's peak moment


class _EstimateRank(TypedDict):
    rank: int
    device: dict[str, int]
    host: NotRequired[dict[str, int]]
    phases: NotRequired[dict[str, _EstimatePhase]]


class _Estimate(TypedDict):
    ranks: list[_EstimateRank]
    assumptions: NotRequired[list[str]]
    overhead: NotRequired[dict[str, Any]]
    device_total_bytes: NotRequired[int | None]
    peak_device_bytes: NotRequired[int | None]


_Count = Annotated[int, Field(ge=0)] | None


class _RunMeta(TypedDict):
    """The run metadata fields the report and ``compare --fresh-estimate`` do arithmetic with
    (the others are only shown). Extra keys pass."""

    world_size: NotRequired[_Count]
    nodes: NotRequired[_Count]
    zero_stage: NotRequired[Annotated[int, Field(ge=0, le=3)] | None]
    micro_batch: NotRequired[_Count]
    seq_len: NotRequired[_Count]
    n_params: NotRequired[_Count]
    memory_budget_bytes: NotRequired[_Count]


class _RunDoc(TypedDict):
    schema_version: int
    run: _RunMeta
    ranks: list[_Rank]
    missing_ranks: NotRequired[list[int]]
    estimate: NotRequired[_Estimate | None]


class _ShownPhase(TypedDict):
    end: Breakdown
    peak: Breakdown
    peak_total: int
    # who holds the peak's bytes (memprof.compare.PEAK_OWNERS_KEY), where the profiler recorded it
    peak_owners: NotRequired[dict[str, dict[str, dict[str, Annotated[int, Field(ge=0)]]]]]


_DOC = TypeAdapter(_RunDoc)
_SHOWN_PHASE = TypeAdapter(_ShownPhase)


def _fail(source: str, prefix: str, e: ValidationError) -> MemprofError:
    err = e.errors()[0]
    where = ".".join([prefix, *(str(p) for p in err["loc"])] if prefix else [str(p) for p in err["loc"]])
    return MemprofError(
        f"{source}: {where or 'the top level'}: {err['msg']} ({e.error_count()} problem(s) there): "
        "the run file does not follow memprof's schema; re-run or re-gather it"
    )


def _check_phases(doc: dict[str, Any], source: str, rank_index: int, step_index: int) -> None:
    phases = doc["ranks"][rank_index]["steps"][step_index]["phases"]
    for p in PHASES:
        if p not in phases:
            continue
        try:
            _SHOWN_PHASE.validate_python(phases[p])
        except ValidationError as e:
            raise _fail(source, f"ranks.{rank_index}.steps.{step_index}.phases.{p}", e) from None


def check_run_doc(doc: Any, source: str) -> None:
    """Raise MemprofError naming ``source`` and the first bad field when ``doc`` is malformed."""
    try:
        _DOC.validate_python(doc)
    except ValidationError as e:
        raise _fail(source, "", e) from None
    for i, rank in enumerate(doc["ranks"]):
        j = last_complete_step_index(rank)  # the step compare and the tables read
        if j is not None:
            _check_phases(doc, source, i, j)


def check_phase_records(doc: dict[str, Any], source: str, rank_index: int, step_indices: Any) -> None:
    """After :func:`check_run_doc`: the full phase records (``end``, ``peak``, ``peak_total``) of
    the steps ``step_indices`` of ``doc["ranks"][rank_index]``."""
    for j in step_indices:
        _check_phases(doc, source, rank_index, j)
