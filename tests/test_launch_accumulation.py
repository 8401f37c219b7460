"""Gradient accumulation 2 on 2 CPU ranks under the deepspeed launcher: every micro-step is
profiled, and the records say which micro-steps are accumulation boundaries.

The run read is the stage-0 AdamW fp32, accumulation 2, 4 micro-steps case of
tests/test_measured_vs_estimated.py (its config also turns on activation checkpointing, which changes
no record checked here), launched once per session for both modules (launch_helpers.SharedLaunches)."""

from __future__ import annotations

from launch_helpers import SharedLaunches
from test_measured_vs_estimated import case_run

from memprof.run.files import load_run, step_is_boundary, step_micro_index

CASE = "z0-adamw-fp32-ckpt-gas2-n2"
GAS, STEPS = 2, 4


def test_every_micro_step_profiled_and_boundaries_marked(shared_launches: SharedLaunches) -> None:
    run_spec = case_run(CASE)
    cfg = run_spec.config
    assert (cfg["zero_optimization"]["stage"], cfg["optimizer"]["type"], cfg["gradient_accumulation_steps"]) == (0, "AdamW", GAS)
    assert run_spec.ranks == 2 and run_spec.steps == STEPS and "bf16" not in cfg
    out = shared_launches.deepspeed({CASE: run_spec})[CASE].ok()
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
