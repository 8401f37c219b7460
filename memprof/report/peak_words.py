"""The report's words for the highest peak ("rank 1's backward peak (step 5, 4.6 MiB): 41%
activations, 33% grads, ...") and for why one rank is heavier, as plain data the template prints.

The highest peak is the highest phase peak of the steps the peak-composition view shows (each
rank's steady cycle, the snapshots :func:`memprof.compare.peak_snapshots` picks), so the words
describe the bars beside them; why one rank is heavier is :func:`memprof.compare.rank_differences`'.
"""

from __future__ import annotations

from typing import Any

from memprof.categories import CATEGORIES, PHASES
from memprof.units import format_bytes


def share_words(share: float) -> str:
    """A share of the peak as a whole percent; "<1%" for a nonzero share that rounds to 0."""
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


def composition(device: dict[str, int], total: int) -> list[dict[str, Any]]:
    """The nonzero device categories of a peak, largest first: category, bytes, share of ``total``."""
    parts = [{"category": cat, "bytes": int(device[cat]), "share": device[cat] / total if total else 0.0}
             for cat in CATEGORIES if device.get(cat)]
    return sorted(parts, key=lambda p: (-p["bytes"], CATEGORIES.index(p["category"])))


def composition_words(parts: list[dict[str, Any]]) -> str:
    return ", ".join(f"{share_words(p['share'])} {p['category']}" for p in parts) or "nothing"


def highest_peak_story(ranks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest phase peak of the page's peak-composition view (the lowest rank, then the
    earliest phase, on a tie), what it is made of, measured and estimated, and its words. None when
    no rank has a complete step."""
    candidates = [(b["measured_total"], -r["rank"], -PHASES.index(b["phase"]), r, b)
                  for r in ranks for b in r["phase_breakdowns"]]
    if not candidates:
        return None
    *_, rank, b = max(candidates, key=lambda c: c[:3])
    total = b["measured_total"]
    parts = composition(b["measured"]["device"], total)
    est_total = b["estimated_total"]
    est_parts = None if b["estimated"] is None else composition(b["estimated"]["device"], est_total)
    words = (f"rank {rank['rank']}'s {b['phase']} peak (step {b['step']}, {format_bytes(total)}): "
             f"{composition_words(parts)}")
    return {
        "rank": rank["rank"], "phase": b["phase"], "step": b["step"], "total": total, "parts": parts,
        "estimated_total": est_total, "estimated_parts": est_parts, "words": words,
        "estimate_words": None if est_parts is None else
        f"the estimate ({format_bytes(est_total)}): {composition_words(est_parts)}",
    }
