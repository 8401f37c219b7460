"""MemprofCallback, unchanged, in TRL's SFTTrainer and DPOTrainer with a PEFT LoRA model.

Two launches of tests/hf_harness/trl_run.py (tiny Llama from the llama-tiny preset, LoRA r=4 on
q_proj / v_proj, a tokenizer built in memory, TRL's config defaults: bf16 and gradient
checkpointing on), ``deepspeed --num_gpus 2`` on CPU ranks, micro-batch 2, gradient accumulation 2,
2 optimizer steps:

* SFTTrainer with the ZeRO-2 "auto" config;
* DPOTrainer with the ZeRO-3 "auto" config and an explicit reference model (TRL prepares it as a
  second DeepSpeed engine, trl/models/utils.py ``prepare_deepspeed``);
* DPOTrainer with the ZeRO-3 "auto" config and no reference model (PEFT: the reference is the
  policy with its adapters disabled, called outside the engine).

Resident master / optimizer bytes are derived from the adapter shapes (``r * (in + out)`` per target
module, read from the model by the harness) and ZeRO's partition rules (tests/test_ownership_deepspeed.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import DEEPSPEED, REPO, free_port, leaked_shm_segments, run_group
from test_launch_lora import base_numels
from test_ownership_deepspeed import zero3_partition, zero12_padded

from memprof.categories import PHASES, Category

HARNESS = REPO / "tests" / "hf_harness" / "trl_run.py"
CONFIGS = REPO / "tests" / "hf_harness"
N, MICRO_BATCH, GAS, STEPS, SEQ = 2, 2, 2, 2, 32
FP32, BF16 = 4, 2
ADAM_STATES = 2  # exp_avg, exp_avg_sq (DeepSpeed's Adam keeps `step` as a Python int)


def _launch(out: Path, trainer: str, config: str, *extra: str) -> Path:
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(DEEPSPEED), "--num_gpus", str(N), "--master_port", str(port), str(HARNESS), "--trainer", trainer,
           "--out", str(out), "--deepspeed", str(CONFIGS / config), "--steps", str(STEPS),
           "--micro-batch", str(MICRO_BATCH), "--gas", str(GAS), "--seq-len", str(SEQ), *extra]
    proc = run_group(cmd, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert leaked_shm_segments(port) == []
    return out


@pytest.fixture(scope="module")
def sft_z2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _launch(tmp_path_factory.mktemp("trl") / "sft_z2", "sft", "ds_zero2_auto.json")


@pytest.fixture(scope="module")
def dpo_z3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _launch(tmp_path_factory.mktemp("trl") / "dpo_z3", "dpo", "ds_zero3_auto.json", "--ref-model")


@pytest.fixture(scope="module")
def dpo_z3_peft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _launch(tmp_path_factory.mktemp("trl") / "dpo_z3_peft", "dpo", "ds_zero3_auto.json")


def _doc(out: Path) -> dict[str, Any]:
    return json.loads((out / "memprof.json").read_text())


def _adapter_numels(out: Path) -> list[int]:
    """LoRA's A (r x in) and B (out x r) of every target module, in the model's order."""
    lora = json.loads((out / "lora.json").read_text())
    return [n for t in lora["targets"] for n in (lora["r"] * t["in"], t["out"] * lora["r"])]


def _end(rank: dict[str, Any]) -> dict[str, int]:
    return rank["steps"][-1]["phases"]["step"]["end"]["device"]


@pytest.mark.parametrize("which,trainer", [("sft_z2", "SFTTrainer"), ("dpo_z3", "DPOTrainer")])
def test_trl_run_files_and_micro_steps(which: str, trainer: str, request: pytest.FixtureRequest) -> None:
    out = request.getfixturevalue(which)
    doc = _doc(out)
    run = doc["run"]
    assert run["trainer"]["trainer_class"] == trainer and run["trainer"]["bf16"] is True  # TRL's default
    assert run["precision"] == "bf16" and run["activation_checkpointing"] is True  # TRL's default too
    assert run["n_trainable_params"] == sum(_adapter_numels(out))
    assert [r["rank"] for r in doc["ranks"]] == list(range(N)) and doc["missing_ranks"] == []
    for rank in doc["ranks"]:
        steps = rank["steps"]
        assert rank["complete"] and [s["boundary"] for s in steps] == [i % GAS == GAS - 1 for i in range(STEPS * GAS)]
        assert all(set(s["phases"]) == (set(PHASES) if s["boundary"] else {"forward", "backward"}) for s in steps)
    assert (out / "rank1.jsonl").is_file() and (out / "report.html").is_file()


@pytest.mark.parametrize("which", ["sft_z2", "dpo_z3", "dpo_z3_peft"])
def test_master_and_optimizer_state_are_the_adapters_only(which: str, request: pytest.FixtureRequest) -> None:
    out = request.getfixturevalue(which)
    numels = _adapter_numels(out)
    # ZeRO-2: the trainable group's flat buffer padded to 2N, one N-th per rank (stage_1_and_2.py);
    # ZeRO-3: each trainable parameter's own partition (partition_parameters.py); frozen ones get none
    part = zero12_padded(sum(numels)) // N if which == "sft_z2" else sum(zero3_partition(n) for n in numels)
    for rank in _doc(out)["ranks"]:
        end = _end(rank)
        assert end[Category.MASTER_PARAMS.value] == FP32 * part
        assert end[Category.OPTIMIZER_STATE.value] == ADAM_STATES * FP32 * part


def test_dpo_reference_model_is_params_not_other(dpo_z3: Path) -> None:
    doc = _doc(dpo_z3)
    ref = doc["run"]["reference_model"]
    policy_base = doc["run"]["n_params"] - doc["run"]["n_trainable_params"]
    assert ref["n_params"] == policy_base and ref["same_config_as_policy"] is True
    assert ref["zero_stage"] == 3 and ref["trainable"] is False and ref["dtype"] == "bfloat16"
    ref_partition = BF16 * policy_base // N
    for rank in doc["ranks"]:
        end = _end(rank)
        # both models' bf16 partitions are params; what is left in `other` is far below one model's
        assert end[Category.PARAMS.value] >= 2 * ref_partition
        assert end[Category.OTHER.value] < ref_partition // 4


HF_PERSISTENCE = 10 * 64  # HF's "auto" stage3_param_persistence_threshold: 10 x hidden_size (llama-tiny: 64)
DS_DEFAULT_PERSISTENCE = 100_000  # DeepSpeed 0.19.8 runtime/zero/config.py param_persistence_threshold default
ROTARY_BUFFERS = 2 * 8 * 4  # LlamaRotaryEmbedding inv_freq + original_inv_freq, head_dim/2 fp32 each


@pytest.mark.parametrize("which", ["dpo_z3", "dpo_z3_peft"])
def test_dpo_zero3_params_at_rest_are_derived(which: str, request: pytest.FixtureRequest) -> None:
    """Params after the last optimizer step, from the shapes and ZeRO-3's rules: each parameter's
    bf16 partition; the policy's persistent ones (<= HF's 10*hidden) gathered again after the step;
    the reference engine's threshold is DeepSpeed's default (TRL prepares it before HF resolves the
    config's "auto"), so every parameter of the tiny reference stays gathered once its forward
    fetched it, and nothing (no optimizer step) releases them."""
    out = request.getfixturevalue(which)
    doc = _doc(out)
    policy = base_numels("llama-tiny") + _adapter_numels(out)
    want = BF16 * (sum(zero3_partition(n) for n in policy) + sum(N * zero3_partition(n) for n in policy
                                                                if n <= HF_PERSISTENCE)) + ROTARY_BUFFERS
    if which == "dpo_z3":
        assert doc["run"]["reference_model"]["param_persistence_threshold"] == DS_DEFAULT_PERSISTENCE
        ref = base_numels("llama-tiny")
        assert max(ref) <= DS_DEFAULT_PERSISTENCE
        want += BF16 * sum(zero3_partition(n) + N * zero3_partition(n) for n in ref) + ROTARY_BUFFERS
    else:
        assert "reference_model" not in doc["run"]
    for rank in doc["ranks"]:
        assert _end(rank)[Category.PARAMS.value] == want, f"rank {rank['rank']}"


@pytest.mark.parametrize("which", ["sft_z2", "dpo_z3"])
def test_log_history_carries_the_last_optimizer_steps_peaks(which: str, request: pytest.FixtureRequest) -> None:
    out = request.getfixturevalue(which)
    history = json.loads((out / "log_history.json").read_text())
    logged = [h for h in history if "loss" in h]
    assert len(logged) == STEPS  # logging_steps=1
    rank0 = _doc(out)["ranks"][0]["steps"]
    for entry in logged:
        k = entry["memprof/optimizer_step"]
        assert k == entry["step"] - 1
        records = [s for s in rank0 if s["optimizer_step"] == k]
        for phase in PHASES:
            top = max((s["phases"][phase] for s in records if phase in s["phases"]), key=lambda r: r["peak_total"])
            assert entry[f"memprof/peak_{phase}_total_bytes"] == top["peak_total"]
            for category in Category:
                assert entry[f"memprof/peak_{phase}_{category.value}_bytes"] == top["peak"]["device"][category.value]


def _peak_errors(out: Path) -> list[str]:
    """Each phase peak of a fresh estimate of the run (``memprof compare --fresh-estimate``: TRL's
    fused head from the recorded trainer class, the LoRA activation terms) against the measurement."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "memprof", "compare", str(out), "--fresh-estimate", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = []
    for r in json.loads(res.stdout)["rows"]:
        if r["what"] == "peak" and r["measured"]:
            err = (r["estimated"] - r["measured"]) / r["measured"]
            lines.append(f"rank {r['rank']} {r['name']}: measured {r['measured']} estimated {r['estimated']} ({err:+.2%})")
    return lines


def test_sft_phase_peaks_within_3_percent_of_the_estimate(sft_z2: Path) -> None:
    lines = _peak_errors(sft_z2)
    print("\n".join(lines))
    bad = [line for line in lines if abs(float(line.rsplit("(", 1)[1].rstrip("%)"))) > 3.0]
    assert not bad, "\n".join(lines)


@pytest.mark.parametrize("which", ["dpo_z3", "dpo_z3_peft"])
def test_dpo_phase_peaks_within_3_percent_of_the_estimate(which: str, request: pytest.FixtureRequest) -> None:
    """DPO's terms (memprof.estimate.trainer_terms: 2B rows through the policy and its fused head, the
    reference forward, the reference engine's own persistence threshold; with the PEFT reference at
    ZeRO-3, the coordinator's trace reset by the reference forward every micro-step)."""
    lines = _peak_errors(request.getfixturevalue(which))
    print("\n".join(lines))
    bad = [line for line in lines if abs(float(line.rsplit("(", 1)[1].rstrip("%)"))) > 3.0]
    assert not bad, "\n".join(lines)
