"""The profiler's measurements of real multi-rank CPU DeepSpeed runs, checked two ways:

1. resident model states (after `engine.step()`) against numbers derived here, in the test, from
   gpt2-tiny's layer shapes, dtypes and ZeRO's partitioning rules (DeepSpeed 0.19.8:
   stage 1/2 pad the flat group to a multiple of 2*N elements (stage_1_and_2.py, alignment =
   nccl_start_alignment_factor(2) * world size) and give each rank Pp/N; stage 3 gives each
   parameter its own ceil(numel/N) partition (partition_parameters.py, _partition_param) and keeps
   parameters of at most stage3_param_persistence_threshold elements gathered);
2. the estimator's prediction for the run's own setup (`memprof compare --fresh-estimate`):
   resident params/master_params/optimizer_state within 0.5%, per-phase peak totals within 3%.

One launch per case (2 or 3 CPU ranks, gloo), 2 steps each; the last step is compared (steady state:
the second step's records equal a third's, byte for byte, in every case here). With gradient
accumulation (k micro-steps per optimizer step, one step record each) a case runs two cycles (2k
micro-steps): the resident states after the last boundary, and each phase's peak over the last
cycle's micro-steps (the worst micro-step, which the estimate models), are compared. A setup (stage,
optimizer, precision, world size, buckets) is launched with accumulation or without it, not both:
the boundary micro-step runs the same forward, backward and optimizer step as a step without
accumulation, with the earlier micro-steps' leftovers beside it, which the estimate adds to the
same per-phase terms (estimate/layout/deepspeed_zero.py). Runs are shared for the session
(tests/launch_helpers.py SharedLaunches; tests/test_launch_accumulation.py reads one) and only the
selected cases are launched.
"""

from __future__ import annotations

import json
import math

import pytest
from launch_helpers import DeepSpeedRun, Launched, SharedLaunches, leaked_shm_segments, memprof_in_process, selected_params

# gpt2-tiny (memprof/models.py): vocab 512, n_positions 256, n_embd 64, 2 layers, tied lm_head
V, NPOS, H, LAYERS = 512, 256, 64, 2


def param_numels() -> list[int]:
    """Every parameter tensor of GPT2LMHeadModel(gpt2-tiny), lm_head tied to wte (counted once)."""
    per_layer = [
        H, H,  # ln_1 weight, bias
        H * 3 * H, 3 * H,  # attn.c_attn (Conv1D weight, bias)
        H * H, H,  # attn.c_proj
        H, H,  # ln_2
        H * 4 * H, 4 * H,  # mlp.c_fc
        4 * H * H, H,  # mlp.c_proj
    ]
    return [V * H, NPOS * H] + per_layer * LAYERS + [H, H]  # wte, wpe, blocks, ln_f


P = sum(param_numels())
assert P == 149_248  # the count docs/launcher.md quotes for gpt2-tiny


def zero12_partition(n: int) -> int:
    """Elements per rank of the stage 1/2 flat group: padded to a multiple of 2*N, split in N."""
    return math.ceil(P / (2 * n)) * 2 * n // n


def zero3(n: int, threshold: int) -> tuple[int, int]:
    """(S, G): this rank's partition elements, and the elements of persistent (gathered) params."""
    s = sum(math.ceil(k / n) for k in param_numels())
    g = sum(n * math.ceil(k / n) for k in param_numels() if k <= threshold)
    return s, g


def _optimizer(kind: str) -> dict:
    if kind == "sgd":
        return {"type": "SGD", "params": {"lr": 1e-3}}
    if kind == "momentum":
        return {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}}
    if kind == "adamw":
        return {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}
    if kind == "adagrad":
        return {"type": "Adagrad", "params": {"lr": 1e-3}}
    if kind == "amsgrad":  # FusedAdam refuses amsgrad: DeepSpeed's torch Adam path
        return {"type": "Adam", "params": {"lr": 1e-4, "amsgrad": True, "torch_adam": True}}
    raise ValueError(kind)


def _config(stage: int, opt: str, bf16: bool, gas: int = 1, **zero: object) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10**6,
        "optimizer": _optimizer(opt),
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, **zero},
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


SMALL_BUCKETS = {"reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000}
Z3 = {**SMALL_BUCKETS, "stage3_param_persistence_threshold": 256, "stage3_prefetch_bucket_size": 50_000}


def expected_stage0_sgd(n: int) -> dict:
    return {"params": 4 * P, "master_params": 0, "optimizer_state": 0}


def expected_stage0_adamw(n: int) -> dict:
    # FusedAdam over the fp32 params: exp_avg + exp_avg_sq (fp32), a Python-int step
    return {"params": 4 * P, "master_params": 0, "optimizer_state": 8 * P}


def expected_stage0_adamw_bf16(n: int) -> dict:
    # FP16_Optimizer over FusedAdam: bf16 params, an fp32 master of each, exp_avg + exp_avg_sq (fp32)
    return {"params": 2 * P, "master_params": 4 * P, "optimizer_state": 8 * P}


def expected_stage0_adagrad(n: int) -> dict:
    # torch Adagrad: `sum` (fp32) and a 4-byte fp32 step tensor per parameter tensor
    return {"params": 4 * P, "master_params": 0, "optimizer_state": 4 * P + 4 * len(param_numels())}


def expected_stage1_adamw(n: int) -> dict:
    p = zero12_partition(n)
    # FusedAdam keeps exp_avg and exp_avg_sq (fp32) and a Python-int step
    return {"params": 4 * p * n, "master_params": 4 * p, "optimizer_state": 8 * p}


def expected_stage2_amsgrad(n: int) -> dict:
    p = zero12_partition(n)
    # torch Adam(amsgrad): exp_avg, exp_avg_sq, max_exp_avg_sq + a 4-byte fp32 step tensor, for the
    # one flat fp32 partition the inner optimizer sees
    return {"params": 4 * p * n, "master_params": 4 * p, "optimizer_state": 12 * p + 4}


def expected_stage2_adamw_bf16(n: int) -> dict:
    p = zero12_partition(n)
    return {"params": 2 * p * n, "master_params": 4 * p, "optimizer_state": 8 * p}


def expected_stage1_adagrad_bf16(n: int) -> dict:
    p = zero12_partition(n)
    # the inner torch Adagrad over the fp32 partition: `sum` (fp32) + a 4-byte step; and the engine's
    # original Adagrad (engine.basic_optimizer), built over the bf16 model params with its state
    # made in the constructor: a bf16 `sum` of every param and a 4-byte fp32 step per tensor
    return {"params": 2 * p * n, "master_params": 4 * p,
            "optimizer_state": 4 * p + 4 + 2 * P + 4 * len(param_numels())}


def expected_stage1_adamw_bf16_fp32_accum(n: int) -> dict:
    p = zero12_partition(n)
    # BF16_Optimizer: the bf16 flat group, the fp32 master partition and AdamW's two fp32 states,
    # plus fp32 gradients for the whole padded group (fp32_groups_gradients_flat), kept for the run
    return {"params": 2 * p * n, "master_params": 4 * p, "optimizer_state": 8 * p, "grads": 4 * p * n}


def expected_stage2_adamw_bf16_fp32_accum(n: int) -> dict:
    # the fp32 gradient partition buffer lives from the first reduction to the step, none at rest
    return {**expected_stage2_adamw_bf16(n), "grads": 0}


def expected_stage3_adamw(n: int) -> dict:
    s, g = zero3(n, 256)
    return {"params": 4 * (s + g), "master_params": 4 * s, "optimizer_state": 8 * s}


def expected_stage3_adamw_bf16(n: int) -> dict:
    s, g = zero3(n, 256)
    return {"params": 2 * (s + g), "master_params": 4 * s, "optimizer_state": 8 * s}


def expected_stage3_momentum_bf16(n: int) -> dict:
    s, g = zero3(n, 256)
    return {"params": 2 * (s + g), "master_params": 4 * s, "optimizer_state": 4 * s}


CASES = {
    # name: (ranks, DeepSpeed config, derived resident model states per rank)
    "z0-sgd-fp32-n2": (2, _config(0, "sgd", False), expected_stage0_sgd),
    # (stage 0 AdamW bf16 is z0-adamw-bf16-gas2-n2 below; stage 1 AdamW fp32 is z1-adamw-fp32-gas3-n2)
    "z0-adagrad-fp32-n2": (2, _config(0, "adagrad", False), expected_stage0_adagrad),
    "z2-amsgrad-fp32-n3": (3, _config(2, "amsgrad", False, **SMALL_BUCKETS), expected_stage2_amsgrad),
    "z2-adamw-bf16-n2": (2, _config(2, "adamw", True, **SMALL_BUCKETS), expected_stage2_adamw_bf16),
    "z1-adagrad-bf16-n2": (2, _config(1, "adagrad", True, **SMALL_BUCKETS), expected_stage1_adagrad_bf16),
    # stage 1 + bf16 + fp32 gradient accumulation switches DeepSpeed to BF16_Optimizer, which has no
    # reduce buckets: default bucket sizes on purpose (a 5e8-element bucket would be 1 GB if counted)
    "z1-adamw-bf16-fp32acc-n2": (
        2, {**_config(1, "adamw", True), "data_types": {"grad_accum_dtype": "fp32"}}, expected_stage1_adamw_bf16_fp32_accum,
    ),
    # stage 2 + bf16 + fp32 accumulation: DeepSpeed's compact fp32 gradient-partition buffer path
    "z2-adamw-bf16-fp32acc-n2": (
        2, {**_config(2, "adamw", True, **SMALL_BUCKETS), "data_types": {"grad_accum_dtype": "fp32"}},
        expected_stage2_adamw_bf16_fp32_accum,
    ),
    "z3-adamw-fp32-n2": (2, _config(3, "adamw", False, **Z3), expected_stage3_adamw),
    "z3-momentum-bf16-n3": (3, _config(3, "momentum", True, **Z3), expected_stage3_momentum_bf16),
    # gradient accumulation (issue 8): what a non-boundary micro-step leaves alive (param.grad at
    # stage 0, param.grad + the reduce bucket at stage 1, the partition's reduced grads at stage 2,
    # a host copy under offload, nothing at stage 3) rides through the boundary micro-step
    "z0-adamw-bf16-gas2-n2": (2, _config(0, "adamw", True, 2), expected_stage0_adamw_bf16),
    "z1-adamw-fp32-gas3-n2": (2, _config(1, "adamw", False, 3, **SMALL_BUCKETS), expected_stage1_adamw),
    "z2-adamw-fp32-gas2-n3": (3, _config(2, "adamw", False, 2, **SMALL_BUCKETS), expected_stage1_adamw),
    "z2-adamw-bf16-offload-gas2-n2": (
        2, _config(2, "adamw", True, 2, **SMALL_BUCKETS, offload_optimizer={"device": "cpu"}), expected_stage2_adamw_bf16,
    ),
    "z3-adamw-bf16-gas3-n2": (2, _config(3, "adamw", True, 3, **Z3), expected_stage3_adamw_bf16),
    # ZeRO-2 with a reduce bucket smaller than most params (HF "auto": hidden^2 = 4096 elements):
    # rank 1 owns the last params, so the first reductions allocate its grads_in_partition while
    # the last block's activations live (before: its backward -6.3%, GAS 1 -6.9%)
    "z2-adamw-fp32-bucket4096-gas2-n2": (
        2, _config(2, "adamw", False, 2, reduce_bucket_size=4096, allgather_bucket_size=4096), expected_stage1_adamw,
    ),
    # activation checkpointing (the config's block: one checkpoint per block) with accumulation: the
    # first micro-step's param.grad (4P) rides through the boundary's forward and backward
    "z0-adamw-fp32-ckpt-gas2-n2": (
        2, {**_config(0, "adamw", False, 2), "activation_checkpointing": {"partition_activations": False}},
        expected_stage0_adamw,
    ),
}
RESIDENT_TOLERANCE = 0.005
PEAK_TOLERANCE = 0.03


def _steps(cfg: dict) -> int:
    gas = cfg["gradient_accumulation_steps"]
    return 2 * gas  # two whole accumulation cycles (two steps without accumulation): the second is steady


def case_run(name: str) -> DeepSpeedRun:
    """The launch of case ``name`` (tests/test_launch_accumulation.py reads one too)."""
    ranks, cfg, _ = CASES[name]
    return DeepSpeedRun.of(ranks, cfg, steps=_steps(cfg))


@pytest.fixture(scope="module")
def launches(request: pytest.FixtureRequest, shared_launches: SharedLaunches) -> dict[str, Launched]:
    """Every case the session selected, launched once (two side by side)."""
    return shared_launches.deepspeed({name: case_run(name) for name in selected_params(request, "name")})


@pytest.mark.parametrize("name", list(CASES))
def test_launch_leaves_no_shared_memory_behind(launches, name):
    # DeepSpeed's CPU shm op makes a ~67 MB /dev/shm segment per rank and never unlinks it; the
    # launcher removes its own. The op must really have been active for this to mean anything.
    launches[name].ok()
    assert "deepspeed_shm_comm_op built successfully" in launches[name].result.stdout
    assert leaked_shm_segments(launches[name].port) == []


@pytest.mark.parametrize("name", list(CASES))
def test_resident_model_states_match_partition_rules(launches, name):
    ranks, _, expected_fn = CASES[name]
    doc = json.loads((launches[name].ok() / "memprof.json").read_text())
    assert [r["rank"] for r in doc["ranks"]] == list(range(ranks))
    expected = expected_fn(ranks)
    for entry in doc["ranks"]:
        rest = entry["steps"][-1]["phases"]["step"]["end"]
        got = {cat: rest["device"][cat] + rest["host"][cat] for cat in expected}
        assert got == expected, f"{name} rank {entry['rank']}"
        assert min(rest["device"].values()) >= 0 and rest["device"]["other"] >= 0


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_within_tolerance_of_measurement(launches, name):
    run = launches[name].ok()
    res = memprof_in_process("compare", str(run), "--fresh-estimate", "--json")
    assert res.returncode == 0, res.stderr
    cmp = json.loads(res.stdout)
    checked = [r for r in cmp["rows"] if r["ok"] is not None]

    def within(r: dict) -> bool:
        if r["measured"] == r["estimated"]:
            return True
        limit = PEAK_TOLERANCE if r["what"] == "peak" else RESIDENT_TOLERANCE
        return r["measured"] != 0 and abs(r["estimated"] - r["measured"]) <= limit * r["measured"]

    bad = [
        f"rank {r['rank']} {r['what']} {r['location']} {r['name']}: measured {r['measured']} estimated {r['estimated']}"
        + (f" ({r['error']:+.2%})" if r["error"] is not None else "")
        for r in checked
        if not within(r)
    ]
    assert not bad, "\n".join(bad)
    # with accumulation, the peaks compared are the largest over the last cycle's micro-steps
    doc = json.loads((run / "memprof.json").read_text())
    gas = CASES[name][1]["gradient_accumulation_steps"]
    for entry in doc["ranks"]:
        cycle = [s for s in entry["steps"] if s["step"] >= len(entry["steps"]) - gas]
        assert len(cycle) == gas and (cycle[-1]["step"] + 1) % gas == 0
        for phase in ("forward", "backward", "step"):
            row = next(r for r in checked if r["rank"] == entry["rank"] and r["what"] == "peak" and r["name"] == phase)
            assert row["measured"] == max(s["phases"][phase]["peak_total"] for s in cycle), (name, entry["rank"], phase)
    # every rank: 3 resident categories x 2 locations + 3 phase peaks
    assert len(checked) == CASES[name][0] * (3 * 2 + 3)
