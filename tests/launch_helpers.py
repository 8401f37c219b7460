"""Shared by the tests that launch real DeepSpeed runs: ports, deadlines, process-group handling, a launch wrapper.

Every launch runs in its own session (process group) so that a timeout kills the launcher *and* its
ranks: a rank left spinning in a gloo collective would otherwise steal the two CPU cores from every
later test. A timeout fails the test saying what it waited for and how long, with each rank's last
lines, so a hang says where. A launch whose rendezvous port was taken between choosing it and
binding it (another job on the machine) is started again on a fresh port, once or twice.

Launches are the suite's cost (~10-15 s each on 2 idle cores, nearly all of it interpreter, torch /
DeepSpeed / transformers start-up and DeepSpeed's launcher, not steps), so: a run several tests read
is launched once (module fixtures; :class:`SharedLaunches` across modules, one per session), a
fixture launches only the cases the session selected (:func:`selected_params`), and independent
launches go two side by side (:func:`side_by_side`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from memprof.run.deepspeed_shm import SEGMENT_PREFIX, SHM_DIR
from memprof.train.ports import free_local_port as free_port
from memprof.train.ports import lost_port_race

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
# `accelerate launch --use_deepspeed` (or a config file with distributed_type DEEPSPEED) starts one
# process per rank through torchrun (accelerate/commands/launch.py `deepspeed_launcher`)
ACCELERATE = Path(sys.executable).parent / "accelerate"

# Deadlines: a floor for start-up (imports, DeepSpeed's op loading, rendezvous: most of a small
# launch) plus seconds per rank-step by model size, both as measured on 2 idle cores with margin,
# then stretched by how busy the machine is when the launch starts (load average per core, capped).
DEADLINE_FLOOR_S = 240.0
SECONDS_PER_RANK_STEP = {"gpt2-tiny": 10.0, "llama-tiny": 15.0, "qwen2-tiny": 15.0}
DEFAULT_SECONDS_PER_RANK_STEP = 30.0  # a model not listed: assume bigger
MAX_LOAD_STRETCH = 4.0
PORT_ATTEMPTS = 3  # a launch that lost its rendezvous port to another process is started again


@dataclass(frozen=True)
class Deadline:
    """How long a launch may take, and what it is waiting for (said in the failure)."""

    seconds: float
    what: str

    def __str__(self) -> str:
        return f"{self.what} (deadline {self.seconds:.0f} s)"


def load_stretch() -> float:
    """How much slower than idle this machine runs now: the 1-minute load average per core, at
    least 1, at most MAX_LOAD_STRETCH."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 1.0
    return min(MAX_LOAD_STRETCH, max(1.0, load))


def launch_deadline(ranks: int, steps: int, model: str = "gpt2-tiny", *, what: str = "", extra_s: float = 0.0) -> Deadline:
    """The deadline of a launch of ``ranks`` ranks x ``steps`` steps of ``model``: the start-up
    floor plus each rank-step, stretched by the machine's load now."""
    per_step = SECONDS_PER_RANK_STEP.get(model, DEFAULT_SECONDS_PER_RANK_STEP)
    stretch = load_stretch()
    seconds = (DEADLINE_FLOOR_S + ranks * steps * per_step + extra_s) * stretch
    label = what or "launch"
    return Deadline(seconds, f"{label}: {ranks} ranks x {steps} steps of {model}, load stretch x{stretch:.1f}")


def _as_deadline(timeout: float | Deadline, procs: Sequence[subprocess.Popen]) -> Deadline:
    if isinstance(timeout, Deadline):
        return timeout
    what = "; ".join(" ".join(map(str, p.args))[:200] for p in procs)
    return Deadline(float(timeout), what)


_RANK_PREFIX = re.compile(r"^\[(?:default)?rank(\d+)\]:?\s?")  # torch's "[rank1]: ..." lines
# the launchers' lines naming a rank's exit: DeepSpeed's launcher ("... --local_rank=1 ... exits with
# return code = -6") and torchrun's error summary ("local_rank: 1 (pid: ...) ... exitcode: -6")
_RANK_EXIT = re.compile(r"--local_rank=(\d+).*return code = (-?\d+)|local_rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)")


def rank_tails(output: str, lines: int = 15) -> str:
    """Each rank's last lines in a launch's output (torch prefixes a rank's uncaught errors with
    "[rankN]:"), how each rank exited where the launcher says so, then the output's own tail."""
    by_rank: dict[int, list[str]] = {}
    exits: dict[int, str] = {}
    for line in output.splitlines():
        m = _RANK_PREFIX.match(line)
        if m:
            by_rank.setdefault(int(m.group(1)), []).append(line[m.end():])
        e = _RANK_EXIT.search(line)
        if e:
            rank = e.group(1) or e.group(3)
            exits[int(rank)] = e.group(2) or e.group(4)
    parts = []
    for rank in sorted(set(by_rank) | set(exits)):
        status = f"exit code {exits[rank]}" if rank in exits else "exit code not reported"
        body = "\n".join(by_rank.get(rank, [])[-lines:]) or "(no lines prefixed with its rank)"
        parts.append(f"--- rank {rank} ({status}) ---\n{body}")
    tail = "\n".join(output.splitlines()[-3 * lines:])
    return "\n".join([*parts, f"--- last {3 * lines} lines of the launch ---", tail])


def launch_failure(res: subprocess.CompletedProcess, what: str = "") -> str:
    """The message for a launch that exited non-zero: what it was, its exit code, each rank's last lines."""
    cmd = " ".join(map(str, res.args))[:300]
    return f"{what or cmd} exited {res.returncode}\n{rank_tails(res.stdout + chr(10) + res.stderr)}"




_LIVE: set[subprocess.Popen] = set()  # started and not yet finished: killed on an interrupt (side_by_side)
_LIVE_LOCK = threading.Lock()


def start_group(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start ``cmd`` in a new session with captured text output."""
    proc = subprocess.Popen(list(cmd), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process's group and every live descendant (torchrun starts each rank in a session
    of its own, out of reach of the group kill)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def finish_groups(procs: Sequence[subprocess.Popen], timeout: float | Deadline) -> list[subprocess.CompletedProcess]:
    """Wait for every process (one shared deadline); past it kill all their groups and fail saying
    what was waited for, for how long, and each rank's last lines."""
    deadline = _as_deadline(timeout, procs)
    start = time.monotonic()
    done: list[subprocess.CompletedProcess] = []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, start + deadline.seconds - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    _kill_group(p)
                try:
                    out, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:  # a stray holder of the pipes: report without its output
                    out, err = "", ""
                raise AssertionError(
                    f"waited {time.monotonic() - start:.0f} s for {deadline}; not finished, killed.\n"
                    f"{rank_tails(out + chr(10) + err)}"
                ) from None
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for p in procs:  # ranks orphaned by a launcher that exited early must not outlive the test
            _kill_group(p)
        with _LIVE_LOCK:
            _LIVE.difference_update(procs)
    return done


def _with_fresh_port(cmd: Sequence[str]) -> list[str] | None:
    """``cmd`` with its ``--master_port N`` replaced by a fresh free port; None when it names none."""
    cmd = list(map(str, cmd))
    if "--master_port" not in cmd:
        return None
    i = cmd.index("--master_port") + 1
    return [*cmd[:i], str(free_port()), *cmd[i + 1:]]


def run_group(cmd: Sequence[str], *, timeout: float | Deadline, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` for launches: own process group, killed whole past the deadline. A launch
    that failed because its ``--master_port`` was taken before rank 0 bound it (another job on this
    machine) is started again on a fresh port, up to PORT_ATTEMPTS times in all."""
    for _ in range(PORT_ATTEMPTS - 1):
        res = finish_groups([start_group(cmd, **kwargs)], timeout)[0]
        retry = _with_fresh_port(cmd) if res.returncode != 0 and lost_port_race(res.stdout + res.stderr) else None
        if retry is None:
            return res
        cmd = retry
    return finish_groups([start_group(cmd, **kwargs)], timeout)[0]


def memprof_in_process(*argv: str) -> subprocess.CompletedProcess:
    """``memprof ARGV`` run in this process (memprof.cli.main), its output captured: for tests that
    read what a command computes (``compare --json``) rather than how the process behaves (those
    start ``python -m memprof``). Spares an interpreter start per call."""
    from memprof.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return subprocess.CompletedProcess(["memprof", *argv], code, out.getvalue(), err.getvalue())


RESIDENT_HARNESS = REPO / "tests" / "ds_harness" / "resident.py"


def launch_resident_harness(work: Path, cases: Sequence[dict[str, Any]], ranks: int = 2) -> list[dict[str, Any]]:
    """One ``deepspeed --num_gpus N tests/ds_harness/resident.py`` launch running ``cases`` one after
    another (a fresh model and engine each); every rank's results (``{"rank", "world_size", "cases"}``)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps({"cases": list(cases)}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port), str(RESIDENT_HARNESS),
           "--spec", str(work / "spec.json"), "--out", str(work / "out")]
    # ~2 s a case after ~10 s of start-up; `make install` compiled DeepSpeed's ops (a cold cache would add minutes)
    deadline = launch_deadline(ranks, len(cases), what=f"{len(cases)} cases of tests/ds_harness/resident.py")
    proc = run_group(cmd, cwd=REPO, env=env, timeout=deadline)
    assert proc.returncode == 0, launch_failure(proc, f"tests/ds_harness/resident.py over {len(cases)} cases")
    assert leaked_shm_segments(int(proc.args[proc.args.index("--master_port") + 1])) == []
    return [json.loads((work / "out" / f"rank{r}.json").read_text()) for r in range(ranks)]


def leaked_shm_segments(port: int) -> list[str]:
    """DeepSpeed CPU shm segments still in /dev/shm for a launch on ``port`` (see memprof.run.deepspeed_shm)."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.glob(f"{SEGMENT_PREFIX}_*_{port}_*"))


def launch_deepspeed(
    n_ranks: int, ds_config: dict[str, Any], out: Path, *, steps: int = 3, seq_len: int = 32, model: str = "gpt2-tiny",
    timeout: float | Deadline | None = None, extra: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Run launch/train.py under `deepspeed --num_gpus N` on CPU ranks with the given DS config.
    Deadline: :func:`launch_deadline` of what it launches unless ``timeout`` is given."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / f"{out.name}.ds.json"
    cfg.write_text(json.dumps(ds_config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [
        str(DEEPSPEED), "--num_gpus", str(n_ranks), "--master_port", str(free_port()), str(TRAIN),
        "--deepspeed_config", str(cfg), "--model", model, "--steps", str(steps), "--seq-len", str(seq_len),
        "--out", str(out), *extra,
    ]
    if timeout is None:
        timeout = launch_deadline(n_ranks, steps, model, what=f"deepspeed launch/train.py -> {out.name}")
    return run_group(cmd, cwd=REPO, env=env, timeout=timeout)


# -- launching less, and side by side ------------------------------------------------------------

# Independent launches a fixture runs at once. A single small launch leaves part of 2 cores idle
# (its launchers' serial start-up, DeepSpeed's 1 s exit poll, rendezvous): four gpt2-tiny 2-rank
# launches took 45.5 s one after another and 36-40 s two at a time on this 2-core machine, with every
# measured byte identical (peaks and phase ends). Deadlines stretch with the load this adds.
LAUNCH_LANES = 2
T = TypeVar("T")


def side_by_side(jobs: Mapping[str, Callable[[], T]], lanes: int = LAUNCH_LANES) -> dict[str, T | BaseException]:
    """Run each job (a launch: it waits on subprocesses, so threads suffice), ``lanes`` at a time;
    returns each job's result, or the exception it raised (a deadline failure fails only the
    tests that read that run)."""

    def attempt(job: Callable[[], T]) -> T | BaseException:
        try:
            return job()
        except Exception as e:  # handed to the tests of this run
            return e

    if len(jobs) <= 1:
        return {name: attempt(job) for name, job in jobs.items()}
    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="launch")
    try:
        futures = {name: pool.submit(attempt, job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}
    except BaseException:  # an interrupt (Ctrl-C) lands here, in the main thread: end every launch now
        pool.shutdown(wait=False, cancel_futures=True)
        with _LIVE_LOCK:
            live = list(_LIVE)
        for proc in live:
            _kill_group(proc)
        raise
    finally:
        pool.shutdown(wait=True)


def selected_params(request: Any, argname: str) -> list[Any]:
    """The values of the parameter ``argname`` over the tests of the requesting module that this
    session runs (after ``-k`` / node-id selection), each once, in test order: what a module
    fixture must launch, and no more."""
    seen: list[Any] = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is request.module and argname in params and params[argname] not in seen:
            seen.append(params[argname])
    return seen


def selected_runs(request: Any, runs: Sequence[str], argname: str = "which") -> list[str]:
    """The runs among ``runs`` that the selected tests of the requesting module read: as fixtures
    of those names (asked for directly or through other fixtures) or as the value of the parameter
    ``argname`` (a test that calls ``request.getfixturevalue(which)``)."""
    wanted: set[str] = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        wanted.update(name for name in getattr(item, "fixturenames", ()) if name in runs)
        value = getattr(getattr(item, "callspec", None), "params", {}).get(argname)
        if value in runs:
            wanted.add(value)
    return [name for name in runs if name in wanted]


@dataclass(frozen=True)
class DeepSpeedRun:
    """One `deepspeed --num_gpus N launch/train.py` run, as :func:`launch_deepspeed` takes it; equal
    runs are one launch (:class:`SharedLaunches`)."""

    ranks: int
    config_json: str  # the DeepSpeed JSON, canonical (sorted keys), so equal configs compare equal
    steps: int = 3
    seq_len: int = 32
    model: str = "gpt2-tiny"
    extra: tuple[str, ...] = ()

    @classmethod
    def of(cls, ranks: int, config: dict[str, Any], **kwargs: Any) -> DeepSpeedRun:
        return cls(ranks, json.dumps(config, sort_keys=True), **kwargs)

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)


@dataclass
class Launched:
    """A finished launch: its folder, and what the launcher returned (or why there is nothing)."""

    out: Path
    result: subprocess.CompletedProcess | None = None
    error: BaseException | None = None
    what: str = field(default="")

    def ok(self) -> Path:
        """The run folder; fails the calling test, with each rank's last lines, if the launch failed."""
        if self.error is not None:
            raise AssertionError(f"{self.what}: {self.error}") from self.error
        assert self.result is not None and self.result.returncode == 0, launch_failure(self.result, self.what)
        return self.out

    @property
    def port(self) -> int:
        assert self.result is not None
        args = list(map(str, self.result.args))
        return int(args[args.index("--master_port") + 1])


class SharedLaunches:
    """The session's DeepSpeed launches, shared by every test that reads the same run (one instance:
    the ``shared_launches`` fixture of tests/conftest.py). Each distinct :class:`DeepSpeedRun` is
    launched once, in a folder named after the first name it was asked for; the runs one call asks
    for and nobody launched yet go side by side."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[DeepSpeedRun, Launched] = {}

    def deepspeed(self, runs: Mapping[str, DeepSpeedRun]) -> dict[str, Launched]:
        todo: dict[DeepSpeedRun, Path] = {}
        for name, run in runs.items():
            if run not in self._done and run not in todo:
                out = self.root / name
                while out.exists() or out in todo.values():
                    out = out.with_name(out.name + "_")
                todo[run] = out
        jobs = {str(out): (lambda run=run, out=out: launch_deepspeed(run.ranks, run.config, out, steps=run.steps,
                                                                   seq_len=run.seq_len, model=run.model, extra=run.extra))
                for run, out in todo.items()}
        results = side_by_side(jobs)
        for run, out in todo.items():
            res = results[str(out)]
            what = f"deepspeed --num_gpus {run.ranks} launch/train.py -> {out.name}"
            if isinstance(res, BaseException):
                self._done[run] = Launched(out, error=res, what=what)
            else:
                self._done[run] = Launched(out, result=res, what=what)
        return {name: self._done[run] for name, run in runs.items()}
