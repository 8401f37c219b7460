"""Gradient accumulation 2 on 2 CPU ranks under the deepspeed launcher: every micro-step is
profiled, and the records say which micro-steps are accumulation boundaries. One launch."""

from __future__ import annotations

import json
from pathlib import Path

from launch_helpers import REPO, launch_deepspeed

from memprof.run.files import load_run, step_is_boundary, step_micro_index

GAS, STEPS = 2, 4


def test_every_micro_step_profiled_and_boundaries_marked(tmp_path: Path) -> None:
    ds = json.loads((REPO / "configs" / "stage0_adamw.json").read_text())
    ds["gradient_accumulation_steps"] = GAS
    out = tmp_path / "run"
    result = launch_deepspeed(2, ds, out, steps=STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = load_run(out)
    n_params = run["run"]["n_params"]
    assert [r["rank"] for r in run["ranks"]] == [0, 1]
    for entry in run["ranks"]:
        steps = entry["steps"]
        assert [s["step"] for s in steps] == list(range(STEPS)), entry["rank"]
        # one record per micro-batch, each with its forward, backward and engine.step() call
        assert all(set(s["phases"]) == {"forward", "backward", "step"} for s in steps)
        assert [s["micro_step"] for s in steps] == [i % GAS for i in range(STEPS)]
        assert [s["boundary"] for s in steps] == [i % GAS == GAS - 1 for i in range(STEPS)]
        # Independent of the flag: AdamW's state (two fp32 moments per element at stage 0) is
        # created by the first optimizer step, so it appears at the end of the first boundary's
        # step phase and not before; micro-step 0's engine.step() updated nothing.
        opt_state = [s["phases"]["step"]["end"]["device"]["optimizer_state"] for s in steps]
        assert opt_state[0] == 0, opt_state
        assert all(o >= 2 * 4 * n_params for o in opt_state[1:]), (opt_state, n_params)
        # stage 0 keeps the accumulated .grad between micro-steps: still there after micro-step 0
        assert steps[0]["phases"]["step"]["end"]["device"]["grads"] >= 4 * n_params


def test_older_step_records_read_as_boundaries() -> None:
    # files written before micro_step / boundary existed: gradient accumulation 1
    old = {"step": 3, "loss": 1.0, "phases": {}}
    assert step_is_boundary(old) is True and step_micro_index(old) == 0
    assert step_is_boundary({**old, "boundary": False}) is False
    assert step_micro_index({**old, "micro_step": 1}) == 1
