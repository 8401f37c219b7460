"""Shared by the tests that launch real DeepSpeed runs: a free port, process-group handling, a launch wrapper.

Every launch runs in its own session (process group) so that a timeout kills the launcher *and* its
ranks: a rank left spinning in a gloo collective would otherwise steal the two CPU cores from every
later test. A timeout fails the test with the tail of what the launch printed, so a hang says where.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from memprof.run.deepspeed_shm import SEGMENT_PREFIX, SHM_DIR
from memprof.train.ports import free_local_port as free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
# `accelerate launch --use_deepspeed` (or a config file with distributed_type DEEPSPEED) starts one
# process per rank through torchrun (accelerate/commands/launch.py `deepspeed_launcher`)
ACCELERATE = Path(sys.executable).parent / "accelerate"


def start_group(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start ``cmd`` in a new session with captured text output."""
    return subprocess.Popen(list(cmd), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


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


def finish_groups(procs: Sequence[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Wait for every process (one shared deadline); on timeout kill all their groups and fail with output tails."""
    deadline = time.monotonic() + timeout
    done: list[subprocess.CompletedProcess] = []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    _kill_group(p)
                try:
                    out, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:  # a stray holder of the pipes: report without its output
                    out, err = "", ""
                raise AssertionError(
                    f"{' '.join(map(str, proc.args))[:300]} did not finish in {timeout:.0f} s; killed.\n"
                    f"--- stdout tail ---\n{out[-4000:]}\n--- stderr tail ---\n{err[-4000:]}"
                ) from None
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for p in procs:  # ranks orphaned by a launcher that exited early must not outlive the test
            _kill_group(p)
    return done


def run_group(cmd: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` for launches: own process group, killed whole on timeout."""
    return finish_groups([start_group(cmd, **kwargs)], timeout)[0]


def leaked_shm_segments(port: int) -> list[str]:
    """DeepSpeed CPU shm segments still in /dev/shm for a launch on ``port`` (see memprof.run.deepspeed_shm)."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.glob(f"{SEGMENT_PREFIX}_*_{port}_*"))


def launch_deepspeed(
    n_ranks: int, ds_config: dict[str, Any], out: Path, *, steps: int = 3, seq_len: int = 32, model: str = "gpt2-tiny", timeout: int = 420,
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Run launch/train.py under `deepspeed --num_gpus N` on CPU ranks with the given DS config."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / f"{out.name}.ds.json"
    cfg.write_text(json.dumps(ds_config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [
        str(DEEPSPEED), "--num_gpus", str(n_ranks), "--master_port", str(free_port()), str(TRAIN),
        "--deepspeed_config", str(cfg), "--model", model, "--steps", str(steps), "--seq-len", str(seq_len),
        "--out", str(out), *extra,
    ]
    return run_group(cmd, cwd=REPO, env=env, timeout=timeout)
