"""The run files, read and written in one place, and the names of everything in a run folder.

Layout of a run folder ``<out>/`` (the names: :data:`RUN_FILE_NAME`, :func:`rank_file_name`,
:data:`REPORT_FILE_NAME`):

* ``rank<R>.jsonl`` -- written by rank R as it goes, one JSON object per line, flushed after every
  record so a rank that dies loses nothing already measured (fsynced when the run ends). Line kinds (``"type"``):

  - ``header``: ``{"type": "header", "schema_version", "rank", "host", "device", "run": {...}}``
  - ``step``:   ``{"type": "step", "step", "loss", "micro_step"?, "boundary"?, "phases": {phase: PhaseRecord}}``
                 -- one per micro-batch (per ``engine.step()`` call). ``micro_step``: its index in
                 the gradient-accumulation cycle; ``boundary``: true when the optimizer stepped at
                 its end (every ``step`` phase is recorded; off the boundary DeepSpeed's
                 ``engine.step()`` updates nothing). Both absent in files written before they
                 existed (and for plain-torch loops that do not pass them): read them with
                 :func:`step_is_boundary` / :func:`step_micro_index`, which treat that as micro-step
                 0 on a boundary (gradient accumulation 1).
  - ``oom``:    ``{"type": "oom", "step", "phase", "breakdown": Breakdown, "total_bytes",
                   "budget_bytes", "message"}`` (simulated budget exceeded or a real CUDA OOM)
  - ``end``:    ``{"type": "end", "peak_host_rss_bytes", "diagnostics": {...}}`` (the profiler's
                   self-checks: ``negative_clamps``, ``untracked_owned_bytes_max``, ...)

  A ``PhaseRecord`` is ``{"end": Breakdown, "peak": Breakdown, "peak_total": int,
  "end_total": int, "host_rss_bytes": int, "cuda": {...}?, "peak_owners": {...}?}`` where a Breakdown is
  ``{"device": {category: bytes}, "host": {category: bytes}}`` (see :mod:`memprof.categories`),
  ``peak`` is the breakdown at the moment of the phase's peak and ``peak_total`` its device total.
  ``cuda`` (CUDA runs only) holds the caching allocator's counters for the phase:
  ``allocated_bytes``, ``reserved_bytes``, ``peak_allocated_bytes``, ``alloc_retries``.
  ``peak_owners`` (optional: absent in files written before it existed) says who holds the
  model-state bytes at the peak: ``{location: {category: {owner: bytes}}}``, the largest owners
  of each category (memprof.measure.backends.PEAK_OWNERS_TOP), the rest as ``"(others)"``, and
  the category's bytes no owner was named for as ``"(unnamed)"``.

* ``memprof.json`` -- written atomically by rank 0 at the end after gathering every rank over
  torch.distributed::

    {"schema_version": 1,
     "run": {"model", "n_params", "world_size", "nodes", "zero_stage", "optimizer", "precision",
             "micro_batch", "seq_len", "steps", "device_type", "versions": {...},
             "deepspeed_config": {...}, "model_config": {...},
             "cuda_capability": "9.0", "cuda_device_name": ... (CUDA runs only), ...},
     "ranks": [{"rank", "host", "device", "steps": [StepRecord...], "oom": OomRecord|null,
                "complete": bool, "peak_host_rss_bytes": int|null, "diagnostics": {...}?}],
     "missing_ranks": [int, ...],
     "estimate": {...} | null}          # memprof.estimate's JSON for the run's own setup

* ``report.html`` -- the HTML report of the run (:mod:`memprof.report`), written by rank 0 after
  ``memprof.json``.

:func:`load_run` reads either form and always returns the ``memprof.json`` shape.
"""

from __future__ import annotations

import gc
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from memprof.errors import MemprofError

SCHEMA_VERSION = 1


def offload_param_of(run: dict) -> str:
    """A run's parameter offload device. Files written before memprof 0.3 spell the key
    ``offload_params``; they are read alike."""
    return str(run.get("offload_param", run.get("offload_params", "none")))
RUN_FILE_NAME = "memprof.json"
REPORT_FILE_NAME = "report.html"
RANK_FILE_PATTERN = "rank<R>.jsonl"
"""How messages name the rank files as a family."""
_RANK_FILE_RE = re.compile(r"^rank(\d+)\.jsonl$")


def rank_file_name(rank: int) -> str:
    """The file rank ``rank`` writes its records to (:class:`RankWriter`)."""
    return f"rank{rank}.jsonl"


def step_is_boundary(step: dict[str, Any]) -> bool:
    """Whether a step record's micro-step ended with an optimizer step (older files: always)."""
    return bool(step.get("boundary", True))


def step_micro_index(step: dict[str, Any]) -> int:
    """A step record's index in its gradient-accumulation cycle (older files: 0)."""
    return int(step.get("micro_step", 0))


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector. Reading a big run and building its report make
    millions of small dicts and lists and no reference cycles; meanwhile every full collection walks
    all of them again (64 ranks x 1,000 steps: json.loads 4.0 s -> 1.0 s, the report build 2-4x
    faster with it paused). Restores the collector's previous state."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename, so a reader
    never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


class RankWriter:
    """Appends one rank's records to ``rank<R>.jsonl``; every record is flushed, the file fsynced at close."""

    def __init__(self, out_dir: str | os.PathLike, rank: int, header: dict[str, Any]):
        self.path = Path(out_dir) / rank_file_name(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] | None = open(self.path, "w", encoding="utf-8")
        self.write({"type": "header", "schema_version": SCHEMA_VERSION, "rank": rank, **header})

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            raise RuntimeError(f"{self.path} is already closed")
        self._f.write(json.dumps(record) + "\n")
        # Flushed to the OS at once: a rank that dies (OOM-killed, SIGKILL, a crash) loses nothing
        # already written. No fsync per record: it would sit on the training hot path (a disk
        # round trip per step) and only guards against the whole machine going down.
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def read_rank_lines(path: str | os.PathLike, rank: int | None = None) -> list[dict[str, Any]]:
    """Records of one ``rank<R>.jsonl``. A torn last line (the rank died mid-write) is dropped;
    a corrupt line elsewhere is an error. ``rank``: the rank the file name gives (default: parsed
    from the name when it is ``rank<R>.jsonl``); the header's ``rank`` must match it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MemprofError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise MemprofError(f"{path} is not UTF-8 text: the rank file is corrupted; re-run or delete it") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn final line: the rank died while writing it
            raise MemprofError(f"{path}:{i + 1} is not valid JSON: the file is corrupted") from None
        if not isinstance(rec, dict) or "type" not in rec:
            raise MemprofError(f"{path}:{i + 1} is not a memprof record")
        records.append(rec)
    if not records or records[0].get("type") != "header":
        raise MemprofError(f"{path} has no header line: it is not a memprof rank file")
    _check_version(records[0].get("schema_version"), path)
    header_rank = records[0].get("rank")
    if not isinstance(header_rank, int) or isinstance(header_rank, bool) or header_rank < 0:
        raise MemprofError(
            f"{path}: the header's rank is {header_rank!r}, not a rank number: the rank file is corrupted; re-run or delete it"
        )
    if rank is None and (m := _RANK_FILE_RE.match(path.name)) is not None:
        rank = int(m.group(1))
    if rank is not None and header_rank != rank:
        raise MemprofError(
            f"{path}: the header says rank {header_rank} but the file name says rank {rank}: "
            f"rename it to {rank_file_name(header_rank)} or re-run"
        )
    return records


def rank_entry_from_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``ranks[i]`` entry of memprof.json built from one rank's records."""
    header = records[0]
    entry: dict[str, Any] = {
        "rank": header["rank"],
        "host": header.get("host"),
        "device": header.get("device"),
        "steps": [],
        "oom": None,
        "complete": False,
        "peak_host_rss_bytes": None,
    }
    for rec in records[1:]:
        kind = rec.get("type")
        if kind == "step":
            entry["steps"].append({k: v for k, v in rec.items() if k != "type"})
        elif kind == "oom":
            entry["oom"] = {k: v for k, v in rec.items() if k != "type"}
        elif kind == "end":
            entry["complete"] = True
            entry["peak_host_rss_bytes"] = rec.get("peak_host_rss_bytes")
            if "diagnostics" in rec:
                entry["diagnostics"] = rec["diagnostics"]
    return entry


def assemble_run(
    run: dict[str, Any],
    rank_records: dict[int, list[dict[str, Any]]],
    estimate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """memprof.json from the run's metadata and each rank's records (rank -> records)."""
    world_size = int(run.get("world_size") or (max(rank_records) + 1 if rank_records else 0))
    ranks = [rank_entry_from_records(rank_records[r]) for r in sorted(rank_records)]
    present = {r["rank"] for r in ranks}
    return {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "ranks": ranks,
        "missing_ranks": [r for r in range(world_size) if r not in present],
        "estimate": estimate,
    }


def _check_version(version: Any, path: Path) -> None:
    if not isinstance(version, int):
        raise MemprofError(f"{path} has no schema_version: it is not a memprof run file")
    if version > SCHEMA_VERSION:
        raise MemprofError(
            f"{path} has schema_version {version}, newer than this memprof understands "
            f"({SCHEMA_VERSION}): upgrade memprof"
        )


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run: a ``memprof.json`` file, or a folder holding ``memprof.json`` or
    ``rank<R>.jsonl`` files. Returns the memprof.json shape; raises MemprofError on bad input."""
    path = Path(path)
    if not path.exists():
        raise MemprofError(f"{path} does not exist: pass a memprof.json or a run folder")
    if path.is_dir():
        if (path / RUN_FILE_NAME).is_file():
            return load_run(path / RUN_FILE_NAME)
        rank_files: dict[int, Path] = {}
        for p in sorted(path.iterdir()):
            if (m := _RANK_FILE_RE.match(p.name)) is None:
                continue
            rank = int(m.group(1))
            if rank in rank_files:  # rank7.jsonl and rank07.jsonl: keeping either would hide the other
                raise MemprofError(
                    f"{path} holds two files for rank {rank} ({rank_files[rank].name}, {p.name}): remove the stray one"
                )
            rank_files[rank] = p
        if not rank_files:
            raise MemprofError(f"{path} holds neither memprof.json nor rank<R>.jsonl files")
        records = {r: read_rank_lines(p, r) for r, p in rank_files.items()}
        run = dict(records[min(records)][0].get("run") or {})
        return assemble_run(run, records)
    try:
        text = path.read_text(encoding="utf-8")
        with collector_paused():
            data = json.loads(text)
    except OSError as e:
        raise MemprofError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MemprofError(f"{path} is not valid JSON (truncated or corrupted): re-run or re-gather it") from None
    if not isinstance(data, dict):
        raise MemprofError(f"{path} is not a memprof run file")
    _check_version(data.get("schema_version"), path)
    if not isinstance(data.get("ranks"), list) or not isinstance(data.get("run"), dict):
        raise MemprofError(f"{path} lacks 'run' or 'ranks': it is not a complete memprof run file")
    data.setdefault("missing_ranks", [])
    data.setdefault("estimate", None)
    return data
