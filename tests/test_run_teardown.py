"""memprof.run_teardown: gloo ranks that end with shutdown_distributed() never abort at exit, and
multi-rank CPU runs get the allocator hook by default.

The rank script is the plain torch.distributed reproducer of docs/launcher.md ("Rank aborts at exit")
made as likely to abort as it can be: both ranks on one CPU, and a switch interval of 1 s, so gloo's
worker thread waiting for the GIL to free the last collective's tensors gets it only when the main
thread blocks, i.e. after interpreter shutdown has begun. Without the teardown about one rank exit
in three aborted on the dev machine; with it, none may. The launches go two side by side, each
launch's two ranks on a CPU of their own (the other launch's is another one where there is one).
"""

from __future__ import annotations

import os
import sys

from launch_helpers import REPO, Deadline, finish_groups, free_port, side_by_side, start_group

RANK_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(os.environ["TEARDOWN_TEST_CPU"])})
dist.init_process_group("gloo")
sys.setswitchinterval(1.0)
for _ in range(50):
    t = torch.ones(1024)
    dist.all_reduce(t)
    del t  # the worker thread may still hold it: its Python object now belongs to the tensor
if sys.argv[1] == "teardown":
    from memprof.run_teardown import shutdown_distributed
    shutdown_distributed(destroy=sys.argv[2] == "destroy")
"""
LAUNCHES = 3


def _launch(mode: str, cpu: int) -> list[int]:
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TEARDOWN_TEST_CPU": str(cpu)}
        procs.append(start_group([sys.executable, "-c", RANK_SCRIPT, "teardown", mode], cwd=REPO, env=env))
    results = finish_groups(procs, Deadline(240, "two plain gloo ranks of 50 all-reduces"))
    for res in results:
        assert "terminate called" not in res.stderr, res.stderr[-2000:]
    return [res.returncode for res in results]


def test_gloo_ranks_ending_with_the_teardown_exit_cleanly() -> None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    launches = side_by_side({str(i): (lambda i=i: _launch("destroy" if i % 2 else "keep", cpus[i % len(cpus)]))
                             for i in range(LAUNCHES)})
    codes = []
    for result in launches.values():
        if isinstance(result, BaseException):
            raise result
        codes += result
    assert codes == [0] * (2 * LAUNCHES)


def test_without_a_process_group_the_teardown_does_nothing() -> None:
    from memprof.run_teardown import settle_gloo_workers, shutdown_distributed

    assert settle_gloo_workers() is False
    shutdown_distributed(destroy=True)  # no process group: no error


def test_multi_rank_cpu_runs_default_to_the_allocator_hook(monkeypatch) -> None:
    from memprof.measure import native
    from memprof.measure.backends import new_cpu_tracker

    monkeypatch.delenv(native.TRACKER_ENV, raising=False)
    try:
        native.load(quiet=True)
    except native.HookUnavailable as e:  # no compiler here: the fallback is tested in test_tracker.py
        import pytest

        pytest.skip(f"allocator hook unavailable: {e}")
    diagnostics: dict = {}
    new_cpu_tracker(None, diagnostics, multi_rank=True)
    assert diagnostics["cpu_tracker"] == "allocator hook"
