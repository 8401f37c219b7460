"""Resident categories of real 2-rank DeepSpeed runs, checked against numbers derived here.

One ``deepspeed --num_gpus 2`` launch (the session's ``resident_harness_runs``, shared with the
Llama-family twin tests/test_ownership_deepspeed_llama.py) runs every case below one after another in
tests/ds_harness/resident.py: a fresh seeded gpt2-tiny model and engine per case, two
training steps, then ``owned_breakdown(owned_storages(engine))`` per rank. Each expected number is
derived in this file from the layer shapes, the dtypes and ZeRO's partitioning rules (each rule
cites the DeepSpeed 0.19.8 source line it comes from), never copied from the walk's output.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from precision_support import precision_of, skip_unless_cpu_supports, unsupported_reason

from memprof.categories import CATEGORIES, LOCATIONS, Breakdown
from memprof.models import PRESETS

N = 2  # ranks
FP32, HALF = 4, 2  # bytes per element (bf16 and fp16 are both 2)
RBS = 4096  # reduce_bucket_size (elements) in every ZeRO config: keeps buckets tiny and exact
PERSIST = 256  # stage3_param_persistence_threshold (elements)

TINY: dict[str, Any] = dict(PRESETS["gpt2-tiny"])
# Same architecture with n_embd odd and one layer: P = 101,595 is not a multiple of 2N and every
# LayerNorm has an odd numel, so both ZeRO padding rules below actually pad.
ODD: dict[str, Any] = {**TINY, "n_embd": 65, "n_head": 5, "n_layer": 1}


def gpt2_param_numels(cfg: dict[str, Any]) -> list[int]:
    """numel of every parameter tensor of GPT2LMHeadModel, from the layer shapes."""
    v, t, e, layers = cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"]
    inner = cfg.get("n_inner") or 4 * e
    numels = [v * e, t * e]  # wte, wpe
    for _ in range(layers):
        numels += [e, e]  # ln_1 weight, bias
        numels += [e * 3 * e, 3 * e]  # attn.c_attn (Conv1D weight, bias)
        numels += [e * e, e]  # attn.c_proj
        numels += [e, e]  # ln_2
        numels += [e * inner, inner]  # mlp.c_fc
        numels += [inner * e, e]  # mlp.c_proj
    numels += [e, e]  # ln_f
    return numels  # lm_head.weight is tied to wte: no tensor of its own


def zero12_padded(p: int) -> int:
    """Elements of the ZeRO-1/2 flat buffer: the param group padded to a multiple of 2 * N.

    stage_1_and_2.py:441 ``alignment = self.nccl_start_alignment_factor * world_size`` with
    ``nccl_start_alignment_factor = 2`` (:387); runtime/utils.py:994 ``align_dense_tensors`` pads the
    group to a multiple of it. Per-parameter padding is off (``parameter_alignment`` defaults to
    False, zero/config.py:317). The same rule builds BF16_Optimizer's flat buffer
    (bf16_optimizer.py:166-168).
    """
    return math.ceil(p / (2 * N)) * 2 * N


def zero3_partition(numel: int) -> int:
    """Elements of one ZeRO-3 partition: numel padded to a multiple of N, split in N
    (partition_parameters.py:1690-1696 ``_aligned_size``/``_padding_size``, :1816-1817)."""
    return math.ceil(numel / N)


class Derived:
    """Counts that the expectations are written in."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.numels = gpt2_param_numels(cfg)
        self.P = sum(self.numels)
        self.Pp = zero12_padded(self.P)
        self.part = self.Pp // N  # ZeRO-1/2: this rank's partition (equal sizes: Pp % N == 0)
        self.largest = max(self.numels)
        self.s3 = sum(zero3_partition(n) for n in self.numels)  # ZeRO-3 partitions, all params
        # Persistent params (parameter_offload.py:317 mark_persistent_parameters: numel <=
        # stage3_param_persistence_threshold) stay gathered; a gathered param is a view of an
        # all-gather buffer of partition * N elements (partition_parameters.py:1966-1982).
        self.s3_persist_gathered = sum(zero3_partition(n) * N for n in self.numels if n <= PERSIST)
        self.persistent_numels = sorted(n for n in self.numels if n <= PERSIST)


TINY_D, ODD_D = Derived(TINY), Derived(ODD)


def bd(device: dict[str, int] | None = None, host: dict[str, int] | None = None) -> Breakdown:
    out = {loc: {cat: 0 for cat in CATEGORIES} for loc in LOCATIONS}
    out["device"].update(device or {})
    out["host"].update(host or {})
    return out


def adam(**params: Any) -> dict[str, Any]:
    return {"type": "Adam", "params": {"lr": 1e-3, **params}}


def zero(stage: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"stage": stage, "reduce_bucket_size": RBS, "overlap_comm": False}
    if stage == 3:
        cfg.update(stage3_prefetch_bucket_size=RBS, stage3_param_persistence_threshold=PERSIST)
    cfg.update(extra)
    return cfg


BF16 = {"bf16": {"enabled": True}}
# static loss scale: a dynamic scaler skips the first steps on overflow, leaving no Adam state
FP16 = {"fp16": {"enabled": True, "loss_scale": 1.0}}
OFFLOAD_CPU = {"device": "cpu"}

T = TINY_D
# Scalar step counters: torch Adam/AdamW/RMSprop/Adagrad keep `step` as a 0-dim float32 tensor
# (torch/optim/*.py, `_get_scalar_dtype()`), one storage of 4 bytes per optimized tensor; ZeRO's
# inner optimizer sees one flat partition, so one step tensor. DeepSpeed FusedAdam and
# DeepSpeedCPUAdam keep `step` as a Python int (ops/adam/fused_adam.py:153).
STEP = 4

# name -> (model cfg, ds_config, expected resident breakdown per rank)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], Breakdown]] = {
    # ZeRO-0 fp32: the torch optimizer itself; engine.step() zero_grads with set_to_none.
    "s0_fp32_sgd_momentum": (TINY, {"optimizer": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}}},
                             bd({"params": FP32 * T.P, "optimizer_state": FP32 * T.P})),
    "s0_fp32_adam": (TINY, {"optimizer": adam()},
                     bd({"params": FP32 * T.P, "optimizer_state": 2 * FP32 * T.P})),
    # ZeRO-0 bf16: FP16_Optimizer (fused, as FusedAdam is used) flattens the params without padding
    # (fp16/fused_optimizer.py:94) and keeps a full fp32 master copy (:100).
    "s0_bf16_adam": (TINY, {"optimizer": adam(), **BF16},
                     bd({"params": HALF * T.P, "master_params": FP32 * T.P, "optimizer_state": 2 * FP32 * T.P})),
    # ZeRO-1/2: flat padded compute copy, fp32 master partition, state over the partition.
    "s1_fp32_adam": (TINY, {"optimizer": adam(), "zero_optimization": zero(1)},
                     bd({"params": FP32 * T.Pp, "master_params": FP32 * T.part,
                         "optimizer_state": 2 * FP32 * T.part})),
    "s1_fp32_sgd_nesterov": (TINY, {"optimizer": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9,
                                                                               "nesterov": True}},
                                    "zero_optimization": zero(1)},
                             bd({"params": FP32 * T.Pp, "master_params": FP32 * T.part,
                                 "optimizer_state": FP32 * T.part})),
    "s2_fp32_adam": (TINY, {"optimizer": adam(), "zero_optimization": zero(2, contiguous_gradients=True)},
                     bd({"params": FP32 * T.Pp, "master_params": FP32 * T.part,
                         "optimizer_state": 2 * FP32 * T.part})),
    "s2_fp32_sgd": (TINY, {"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}, "zero_optimization": zero(2)},
                    bd({"params": FP32 * T.Pp, "master_params": FP32 * T.part})),
    "s2_bf16_adam": (TINY, {"optimizer": adam(), "zero_optimization": zero(2), **BF16},
                     bd({"params": HALF * T.Pp, "master_params": FP32 * T.part,
                         "optimizer_state": 2 * FP32 * T.part})),
    "s2_fp16_adam": (TINY, {"optimizer": adam(), "zero_optimization": zero(2), **FP16},
                     bd({"params": HALF * T.Pp, "master_params": FP32 * T.part,
                         "optimizer_state": 2 * FP32 * T.part})),
    "s2_fp32_adam_odd": (ODD, {"optimizer": adam(), "zero_optimization": zero(2)},
                         bd({"params": FP32 * ODD_D.Pp, "master_params": FP32 * ODD_D.part,
                             "optimizer_state": 2 * FP32 * ODD_D.part})),
    "s2_fp32_rmsprop": (TINY, {"optimizer": {"type": "RMSprop", "params": {"lr": 1e-3}}, "zero_optimization": zero(2)},
                        bd({"params": FP32 * T.Pp, "master_params": FP32 * T.part,
                            "optimizer_state": FP32 * T.part + STEP})),
    # Adagrad initializes `sum` at construction; ZeRO-1/2 then builds a second Adagrad over the fp32
    # partition (stage_1_and_2.py:946-947), but engine.basic_optimizer keeps the first one, with a
    # full-size fp32 `sum` and a step tensor per model parameter, alive for the whole run.
    "s2_fp32_adagrad": (TINY, {"optimizer": {"type": "Adagrad", "params": {"lr": 1e-3}}, "zero_optimization": zero(2)},
                        bd({"params": FP32 * T.Pp, "master_params": FP32 * T.part,
                            "optimizer_state": (FP32 * T.part + STEP) + (FP32 * T.P + STEP * len(T.numels))})),
    "s2_fp32_adam_amsgrad": (TINY, {"optimizer": adam(amsgrad=True, torch_adam=True), "zero_optimization": zero(2)},
                             bd({"params": FP32 * T.Pp, "master_params": FP32 * T.part,
                                 "optimizer_state": 3 * FP32 * T.part + STEP})),
    # BF16_Optimizer (ZeRO-1 + bf16 + fp32 grad accumulation, engine.py:2305-2310): its fp32
    # gradient accumulator covers the WHOLE flat group (bf16_optimizer.py:191), not a partition.
    "s1_bf16_fp32accum_adam": (TINY, {"optimizer": adam(), "zero_optimization": zero(1), **BF16,
                                      "data_types": {"grad_accum_dtype": "fp32"}},
                               bd({"params": HALF * T.Pp, "master_params": FP32 * T.part, "grads": FP32 * T.Pp,
                                   "optimizer_state": 2 * FP32 * T.part})),
    # ZeRO-3: partitions + persistent params gathered; a separate fp32 master copy even in fp32
    # (stage3.py:1162 compares a torch.device with the string 'cpu'/'cuda:0', never equal), fp32
    # (grad_accum_dtype) gradient partitions kept for the run (stage3.py:791), one IPG bucket
    # (stage3.py:781-784).
    "s3_fp32_adam": (TINY, {"optimizer": adam(), "zero_optimization": zero(3)},
                     bd({"params": FP32 * (T.s3 + T.s3_persist_gathered), "master_params": FP32 * T.s3,
                         "grads": FP32 * T.s3, "optimizer_state": 2 * FP32 * T.s3, "comm_buffers": FP32 * RBS})),
    "s3_fp32_adam_odd": (ODD, {"optimizer": adam(), "zero_optimization": zero(3)},
                         bd({"params": FP32 * (ODD_D.s3 + ODD_D.s3_persist_gathered),
                             "master_params": FP32 * ODD_D.s3, "grads": FP32 * ODD_D.s3,
                             "optimizer_state": 2 * FP32 * ODD_D.s3, "comm_buffers": FP32 * RBS})),
    # bf16 ZeRO-3: grad partitions in grad_accum_dtype = bf16 (engine.get_data_types), bucket bf16.
    "s3_bf16_adam": (TINY, {"optimizer": adam(), "zero_optimization": zero(3), **BF16},
                     bd({"params": HALF * (T.s3 + T.s3_persist_gathered), "master_params": FP32 * T.s3,
                         "grads": HALF * T.s3, "optimizer_state": 2 * FP32 * T.s3, "comm_buffers": HALF * RBS})),
    # ZeRO-2 offload (DeepSpeedCPUAdam): master, its fp32 grad, Adam state on the host; staging
    # buffers: a model-dtype copy of the partition (stage_1_and_2.py:561-575) and two
    # largest-param-sized gradient transfer buffers, host and device (:653-661).
    "s2_fp32_adam_offload": (TINY, {"optimizer": adam(), "zero_optimization": zero(2, offload_optimizer=OFFLOAD_CPU)},
                             bd({"params": FP32 * T.Pp, "comm_buffers": FP32 * T.largest},
                                {"master_params": FP32 * T.part, "grads": FP32 * T.part,
                                 "optimizer_state": 2 * FP32 * T.part,
                                 "comm_buffers": FP32 * T.part + FP32 * T.largest})),
    # ZeRO-3 offload_param + offload_optimizer: every partition (persistent ones too) in one CPU
    # flat buffer (stage3.py:975-1001), persistent params gathered on the device; host fp32
    # grads twice: grad_partitions_flat_buffer and the per-sub-group master .grad (stage3.py:1337-1342).
    "s3_fp32_adam_offload": (TINY, {"optimizer": adam(),
                                    "zero_optimization": zero(3, offload_optimizer=OFFLOAD_CPU, offload_param=OFFLOAD_CPU)},
                             bd({"params": FP32 * T.s3_persist_gathered, "comm_buffers": FP32 * RBS},
                                {"params": FP32 * T.s3, "master_params": FP32 * T.s3, "grads": 2 * FP32 * T.s3,
                                 "optimizer_state": 2 * FP32 * T.s3})),
}
MID_BACKWARD = {"s2_fp32_adam", "s3_fp32_adam"}

# Storages reachable from the engine that no category claims must be scalars only
# (e.g. _global_grad_norm, FusedAdam's _dummy_overflow_buf, ZeRO-3's inf_or_nan_tracker).
SCALAR_BYTES = 8


def launchable() -> list[str]:
    """The cases whose precision DeepSpeed's CPU accelerator has here (the others skip, with the reason)."""
    return [name for name, (_, ds_config, _) in CASES.items() if unsupported_reason(precision_of(ds_config)) is None]


def skip_if_unlaunchable(name: str) -> None:
    skip_unless_cpu_supports(precision_of(CASES[name][1]))


def resident_spec() -> list[dict[str, Any]]:
    """This module's cases for the session's one launch of the harness (tests/conftest.py)."""
    return [{"name": name, "model": CASES[name][0], "ds_config": CASES[name][1], "mid_backward": name in MID_BACKWARD}
            for name in launchable()]


@pytest.fixture(scope="module")
def runs(resident_harness_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each rank's results of this module's cases."""
    return [{**run, "cases": {k: v for k, v in run["cases"].items() if k in CASES}} for run in resident_harness_runs]


def test_launch_covers_every_case(runs: list[dict[str, Any]]) -> None:
    for rank, run in enumerate(runs):
        assert run["world_size"] == N and run["rank"] == rank
        errors = {name: case["error"] for name, case in run["cases"].items() if "error" in case}
        assert not errors
        assert set(run["cases"]) == set(launchable())


def test_parameter_count_derivation_matches_the_model(runs: list[dict[str, Any]]) -> None:
    # The launched model's own count vs. the count derived from the layer shapes here.
    assert runs[0]["cases"]["s0_fp32_adam"]["num_params"] == TINY_D.P == 149_248
    assert runs[0]["cases"]["s2_fp32_adam_odd"]["num_params"] == ODD_D.P
    # the odd model really exercises both padding rules
    assert ODD_D.Pp != ODD_D.P and ODD_D.s3 * N != ODD_D.P


@pytest.mark.parametrize("name", list(CASES))
def test_resident_breakdown_matches_derivation(runs: list[dict[str, Any]], name: str) -> None:
    skip_if_unlaunchable(name)
    expected = CASES[name][2]
    for run in runs:
        got = run["cases"][name]["resident"]
        assert got == expected, f"{name} rank {run['rank']}: got {_nonzero(got)}, expected {_nonzero(expected)}"


@pytest.mark.parametrize("name", list(CASES))
def test_nothing_large_reachable_from_the_engine_is_unowned(runs: list[dict[str, Any]], name: str) -> None:
    skip_if_unlaunchable(name)
    for run in runs:
        missed = [(path, nbytes) for path, nbytes in run["cases"][name]["unowned_reachable"] if nbytes > SCALAR_BYTES]
        assert not missed, f"{name}: storages reachable from the engine but not attributed: {missed[:5]}"


def test_wrapper_classes_are_the_ones_the_walk_expects(runs: list[dict[str, Any]]) -> None:
    for name in ("s0_bf16_adam", "s1_bf16_fp32accum_adam"):
        skip_if_unlaunchable(name)
    cases = runs[0]["cases"]
    assert cases["s0_fp32_adam"]["engine_optimizer"] == "FusedAdam"
    assert cases["s0_bf16_adam"]["engine_optimizer"] == "FP16_Optimizer"
    assert cases["s2_fp32_adam"]["engine_optimizer"] == "DeepSpeedZeroOptimizer"
    assert cases["s1_bf16_fp32accum_adam"]["engine_optimizer"] == "BF16_Optimizer"
    assert cases["s3_fp32_adam"]["engine_optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert cases["s2_fp32_adam_offload"]["inner_optimizer"] == "DeepSpeedCPUAdam"
    assert cases["s2_fp32_adam_amsgrad"]["inner_optimizer"] == "AdamW"  # DeepSpeed "Adam" = AdamW


def test_zero3_persistent_params_stay_gathered(runs: list[dict[str, Any]]) -> None:
    for name, derived in (("s3_fp32_adam", TINY_D), ("s3_fp32_adam_odd", ODD_D), ("s3_fp32_adam_offload", TINY_D)):
        report = runs[0]["cases"][name]["zero3_params"]
        assert report["persistent_numels"] == derived.persistent_numels
        assert report["gathered_numel_persistent"] == sum(derived.persistent_numels)
        assert report["gathered_numel_other"] == 0  # at rest every other param is released
        assert sorted(report["partition_numels"]) == sorted(zero3_partition(n) for n in derived.numels)


def test_reduce_buckets_are_found_during_backward(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        s2 = run["cases"]["s2_fp32_adam"]
        mid, rest = s2["mid_backward"]["device"], s2["resident"]["device"]
        # ZeRO-2 contiguous_gradients: one reduce_bucket_size fp32 IPG buffer (no overlap_comm)
        # exists only inside backward (setup_buckets ... _release_ipg_buffers)...
        assert mid["comm_buffers"] == FP32 * RBS and rest["comm_buffers"] == 0
        # ...next to gradients (param.grad / the contiguous partition) that are gone at rest.
        assert 0 < mid["grads"] <= FP32 * (TINY_D.P + TINY_D.part) and rest["grads"] == 0
        s3 = run["cases"]["s3_fp32_adam"]
        mid3, rest3 = s3["mid_backward"]["device"], s3["resident"]["device"]
        assert mid3["comm_buffers"] == FP32 * RBS  # ZeRO-3 keeps its IPG bucket for the whole run
        # params gathered for backward count as params while they are gathered
        assert mid3["params"] > rest3["params"]
        assert mid3["params"] <= FP32 * (TINY_D.s3 + N * TINY_D.s3)


def _nonzero(b: Breakdown) -> dict[str, dict[str, int]]:
    return {loc: {c: v for c, v in cats.items() if v} for loc, cats in b.items()}
