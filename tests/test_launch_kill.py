"""A rank SIGKILLed mid-run under the deepspeed launcher: every rank's records up to the death
stay readable, and the launcher reports the failure. One launch (2 CPU ranks)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from launch_helpers import free_port, launch_deadline, launch_failure, run_group

from memprof.run.files import load_run, read_rank_lines

REPO = Path(__file__).resolve().parents[1]
# launch/train.py's entry point with the fault patched in from outside the shipped loop
KILLING_TRAIN = REPO / "tests" / "kill_rank_after_forward.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
KILL_RANK, KILL_AT_STEP, STEPS = 1, 2, 4


def test_killed_rank_leaves_readable_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        # read by tests/kill_rank_after_forward.py: SIGKILL rank 1 after the forward of step 2
        "MEMPROF_KILL_RANK": str(KILL_RANK),
        "MEMPROF_KILL_AT_STEP": str(KILL_AT_STEP),
    }
    result = run_group(
        # a free port (the launcher's default 29500 is anyone's: another job's launch took it once
        # and this launch failed before the kill); run_group restarts a launch that loses a port race
        [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(KILLING_TRAIN),
         "--deepspeed_config", "configs/stage0_adamw.json",
         "--model", "gpt2-tiny", "--steps", str(STEPS), "--seq-len", "32", "--out", str(out)],
        cwd=REPO, env=env, timeout=launch_deadline(2, STEPS, what="the killed-rank launch"),
    )
    assert result.returncode != 0, "the launcher must report a rank that died"
    assert not (out / "memprof.json").exists()  # no gather happened: the files are all there is
    # a launch that failed before the kill (not the failure this test is about) says so with its ranks' lines
    assert sorted(p.name for p in out.glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"], \
        launch_failure(result, "the killed-rank launch")

    run = load_run(out)  # reads rank<R>.jsonl files; raises on anything unreadable
    assert [r["rank"] for r in run["ranks"]] == [0, 1] and run["missing_ranks"] == []
    for entry in run["ranks"]:
        # steps 0 and 1 finished everywhere. The dead rank never reached step 2's backward, and
        # the survivor cannot finish step 2 either: its gradient all-reduce needs the dead rank.
        assert [s["step"] for s in entry["steps"]] == list(range(KILL_AT_STEP)), entry["rank"]
        assert entry["complete"] is False
        assert all(set(s["phases"]) == {"forward", "backward", "step"} for s in entry["steps"])
    dead = read_rank_lines(out / f"rank{KILL_RANK}.jsonl")
    assert dead[0]["type"] == "header" and dead[0]["run"]["world_size"] == 2
