"""The estimate a report shows beside a run's measurements: the one its file stores, or, for a run
that stores none (a MemoryProfiler in the user's own loop: ``profiler.finish()`` records no
estimate), the estimate of the setup the run recorded, computed now as ``memprof compare`` does
(:func:`memprof.estimate.inputs_from_run`). The page says which it shows."""

from __future__ import annotations

from typing import Any

from memprof.errors import MemprofError

STORED, COMPUTED = "stored", "computed"


def with_estimate(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(doc, origin)``: ``doc`` itself when it stores an estimate; else a shallow copy holding the
    estimate of its recorded setup. ``origin["kind"]``: ``"stored"``, ``"computed"`` or None (none
    stored and none could be computed: ``origin["why"]`` says why, in one line)."""
    if doc.get("estimate"):
        return doc, {"kind": STORED, "why": None}
    run = doc.get("run")
    if not isinstance(run, dict):
        return doc, {"kind": None, "why": "the run records no setup"}
    from memprof.estimate import estimate, inputs_from_run

    try:
        est = estimate(inputs_from_run(run)).to_json()
    except (MemprofError, ValueError, TypeError, KeyError) as e:  # a setup the estimator cannot take
        return doc, {"kind": None, "why": f"the run's recorded setup cannot be estimated: {e}".splitlines()[0]}
    return {**doc, "estimate": est}, {"kind": COMPUTED, "why": None}
