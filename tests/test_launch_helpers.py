"""The launch helpers themselves: a port lost to another process is retried, a deadline failure says
what it waited for, each rank's last lines are shown, launches go side by side and equal runs are
launched once. No DeepSpeed launch: stand-in commands."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import launch_helpers
import pytest
from launch_helpers import (
    Deadline,
    DeepSpeedRun,
    SharedLaunches,
    finish_groups,
    launch_deadline,
    launch_failure,
    rank_tails,
    run_group,
    side_by_side,
    start_group,
)

from memprof.train.ports import ANY_FREE_PORT, lost_port_race

# binds 127.0.0.1:<--master_port> as a rendezvous store would; fails as the OS says when it is taken
BIND_PORT = (
    "import socket, sys\n"
    "port = int(sys.argv[sys.argv.index('--master_port') + 1])\n"
    "s = socket.socket(); s.bind(('127.0.0.1', port)); s.listen(); print('bound', port)\n"
)


def test_a_launch_whose_port_was_taken_runs_again_on_a_fresh_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        res = run_group([sys.executable, "-c", BIND_PORT, "--master_port", str(busy)], timeout=120)
    assert res.returncode == 0, res.stderr
    port = int(res.args[res.args.index("--master_port") + 1])
    assert port != busy and res.stdout.strip() == f"bound {port}"


def test_a_failure_that_is_not_the_port_is_not_retried() -> None:
    res = run_group([sys.executable, "-c", "import sys; print('ran'); sys.exit(3)", "--master_port", "1"], timeout=120)
    assert res.returncode == 3 and res.stdout.count("ran") == 1 and res.args[-1] == "1"


def test_lost_port_race_reads_torch_and_os_messages() -> None:
    torch_says = ("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network "
                  "address. port: 29500, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")
    assert lost_port_race(torch_says) and lost_port_race("OSError: [Errno 98] Address already in use")
    assert not lost_port_race("RuntimeError: injected failure") and ANY_FREE_PORT == 0


def test_a_deadline_failure_says_what_it_waited_for() -> None:
    # blocks on a pipe nobody writes: a hang, not a sleep
    hang = start_group([sys.executable, "-c", "import os; print('[rank1]: still in step 2', flush=True); r, w = os.pipe(); os.read(r, 1)"])
    with pytest.raises(AssertionError) as failure:
        finish_groups([hang], Deadline(3, "a hanging stand-in rank"))
    message = str(failure.value)
    assert "for a hanging stand-in rank (deadline 3 s)" in message and "killed" in message
    assert "--- rank 1 (exit code not reported) ---\nstill in step 2" in message
    assert hang.poll() is not None  # killed with its group


def test_deadline_scales_with_ranks_steps_and_model() -> None:
    small, big = launch_deadline(2, 2, "gpt2-tiny"), launch_deadline(3, 6, "qwen2-tiny")
    assert big.seconds > small.seconds >= 240
    assert launch_deadline(2, 2, "some-7b").seconds > small.seconds  # an unknown model is assumed bigger
    assert "2 ranks x 2 steps of gpt2-tiny" in small.what


def test_rank_tails_groups_lines_by_rank_with_exit_codes() -> None:
    out = "\n".join([
        "[rank0]: Traceback (most recent call last):", "[rank0]: RuntimeError: boom", "[rank1]: waiting",
        "[2026-01-01] [ERROR] [launch.py:341:sigkill_handler] ['python3', '-u', 'train.py', '--local_rank=0'] exits with return code = 1",
        "  local_rank: 1 (pid: 42)\n  exitcode  : -6 (pid: 42)",
    ])
    tails = rank_tails(out)
    assert "--- rank 0 (exit code 1) ---\nTraceback (most recent call last):\nRuntimeError: boom" in tails
    assert "--- rank 1 (exit code not reported) ---\nwaiting" in tails
    res = subprocess.CompletedProcess(["deepspeed", "x"], 1, out, "")
    assert launch_failure(res, "a 2-rank launch").startswith("a 2-rank launch exited 1\n--- rank 0")


def test_side_by_side_runs_jobs_at_once_and_hands_back_each_failure() -> None:
    # two jobs that can only finish together: one lane at a time would leave the first waiting
    both = threading.Barrier(2, timeout=60)
    met = side_by_side({"a": lambda: both.wait() is not None, "b": lambda: both.wait() is not None})
    assert met == {"a": True, "b": True}

    def deadline() -> None:
        raise AssertionError("waited 480 s for a launch")

    results = side_by_side({"ok": lambda: 1, "hung": deadline})
    assert results["ok"] == 1 and isinstance(results["hung"], AssertionError)


def test_equal_runs_are_launched_once_per_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[str] = []

    def stand_in(ranks: int, config: dict, out: Path, **kwargs: object) -> subprocess.CompletedProcess:
        launched.append(out.name)
        out.mkdir(parents=True)
        code = 1 if ranks == 3 else 0
        return subprocess.CompletedProcess(["deepspeed", "--master_port", "29500"], code, "", "[rank1]: boom")

    monkeypatch.setattr(launch_helpers, "launch_deepspeed", stand_in)
    shared = SharedLaunches(tmp_path)
    run = DeepSpeedRun.of(2, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    same = DeepSpeedRun.of(2, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})  # key order aside
    three = DeepSpeedRun.of(3, run.config)
    first = shared.deepspeed({"z2": run, "z2_again": same, "z2_n3": three})
    later = shared.deepspeed({"z2_elsewhere": same})
    assert sorted(launched) == ["z2", "z2_n3"]
    assert first["z2_again"] is first["z2"] and later["z2_elsewhere"] is first["z2"]
    assert first["z2"].ok() == tmp_path / "z2" and first["z2"].port == 29500
    with pytest.raises(AssertionError, match="exited 1"):
        first["z2_n3"].ok()
