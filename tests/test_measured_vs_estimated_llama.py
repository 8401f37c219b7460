"""Llama-family runs measured and estimated: real 2- and 3-rank CPU DeepSpeed launches of
launch/train.py with llama-tiny (grouped-query attention, untied lm_head) and qwen2-tiny (tied
embeddings, q/k/v biases), ZeRO 0-3, fp32 and bf16, SGD / momentum / AdamW.

Checked two ways, as tests/test_measured_vs_estimated.py does for GPT-2:
1. resident model states after the last step against numbers derived here from the layer shapes
   (modeling_llama.py / modeling_qwen2.py) and ZeRO's partition rules;
2. the estimator's prediction for the run's own setup (``memprof compare --fresh-estimate``):
   resident params/master_params/optimizer_state within 0.5% and every phase peak within 3%
   (tighter than compare's own 5%).

One launch per case, 2 steps, micro-batch 2 x seq 32; the last step is compared (steady state).
Only the selected cases are launched, two side by side (tests/launch_helpers.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from launch_helpers import DeepSpeedRun, Launched, SharedLaunches, leaked_shm_segments, memprof_in_process, selected_params

from memprof.models import PRESETS

BUFFER_BYTES = {"llama-tiny": 2 * 8 * 4, "qwen2-tiny": 2 * 8 * 4}  # rotary inv_freq + original_inv_freq, head_dim 16, fp32


def param_numels(preset: str) -> list[int]:
    """Parameter tensors of LlamaForCausalLM / Qwen2ForCausalLM in registration order."""
    cfg = PRESETS[preset]
    v, h, i, a, kv = (cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                        "num_key_value_heads"))
    d = h // a
    bias = cfg["model_type"] == "qwen2"  # Qwen2Attention: bias on q/k/v only
    layer = []
    for out in (a * d, kv * d, kv * d):
        layer += [out * h] + ([out] if bias else [])
    layer += [h * a * d, i * h, i * h, h * i, h, h]  # o_proj, gate, up, down, two RMSNorms
    numels = [v * h] + layer * cfg["num_hidden_layers"] + [h]
    return numels if cfg["tie_word_embeddings"] else numels + [v * h]


assert sum(param_numels("llama-tiny")) == 158_016 and sum(param_numels("qwen2-tiny")) == 119_360


def _optimizer(kind: str) -> dict:
    return {
        "sgd": {"type": "SGD", "params": {"lr": 1e-3}},
        "momentum": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}},
        "adamw": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    }[kind]


SMALL_BUCKETS = {"reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000}
Z3 = {**SMALL_BUCKETS, "stage3_param_persistence_threshold": 256, "stage3_prefetch_bucket_size": 50_000}


def _config(stage: int, opt: str, bf16: bool, **zero: object) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**6,
        "optimizer": _optimizer(opt),
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, **zero},
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def expected(preset: str, stage: int, opt: str, bf16: bool, n: int) -> dict[str, int]:
    """Resident params / master_params / optimizer_state per rank (device + host)."""
    numels = param_numels(preset)
    P, b, k = sum(numels), 2 if bf16 else 4, {"sgd": 0, "momentum": 1, "adamw": 2}[opt]
    buffers = BUFFER_BYTES[preset]
    if stage == 0:
        # fp32: the torch optimizer / FusedAdam itself; bf16: FP16_Optimizer's fp32 master copy
        return {"params": b * P + buffers, "master_params": 4 * P if bf16 else 0, "optimizer_state": 4 * k * P}
    if stage in (1, 2):
        p = math.ceil(P / (2 * n)) * 2 * n // n  # flat group padded to 2N, split in N
        return {"params": b * p * n + buffers, "master_params": 4 * p, "optimizer_state": 4 * k * p}
    s = sum(math.ceil(m / n) for m in numels)
    g = sum(n * math.ceil(m / n) for m in numels if m <= 256)
    return {"params": b * (s + g) + buffers, "master_params": 4 * s, "optimizer_state": 4 * k * s}


CASES = {
    # name: (preset, ranks, stage, optimizer, bf16, extra zero settings)
    "llama-z0-sgd-fp32-n2": ("llama-tiny", 2, 0, "sgd", False, {}),
    "qwen2-z0-adamw-bf16-n2": ("qwen2-tiny", 2, 0, "adamw", True, {}),
    "qwen2-z1-momentum-fp32-n2": ("qwen2-tiny", 2, 1, "momentum", False, SMALL_BUCKETS),
    "llama-z2-adamw-bf16-n3": ("llama-tiny", 3, 2, "adamw", True, SMALL_BUCKETS),
    "llama-z3-adamw-fp32-n2": ("llama-tiny", 2, 3, "adamw", False, Z3),
    "qwen2-z3-momentum-bf16-n3": ("qwen2-tiny", 3, 3, "momentum", True, Z3),
    # gradient accumulation (issue 8) with and without HF activation checkpointing (the JSON block)
    "llama-z1-adamw-fp32-gas2-ckpt-n2": ("llama-tiny", 2, 1, "adamw", False, SMALL_BUCKETS),
    "qwen2-z2-adamw-bf16-gas2-n2": ("qwen2-tiny", 2, 2, "adamw", True, SMALL_BUCKETS),
}
# top-level settings beside zero_optimization, by case (gradient accumulation, checkpointing)
TOP = {
    "llama-z1-adamw-fp32-gas2-ckpt-n2": {"gradient_accumulation_steps": 2, "activation_checkpointing": {}},
    "qwen2-z2-adamw-bf16-gas2-n2": {"gradient_accumulation_steps": 2},
}
RESIDENT_TOLERANCE, PEAK_TOLERANCE = 0.005, 0.03


def case_run(name: str) -> DeepSpeedRun:
    preset, ranks, stage, opt, bf16, zero = CASES[name]
    top = TOP.get(name, {})
    # two whole accumulation cycles: compare's steady cycle is then not the first optimizer step
    steps = 2 * top.get("gradient_accumulation_steps", 1)
    return DeepSpeedRun.of(ranks, {**_config(stage, opt, bf16, **zero), **top}, steps=steps, model=preset)


@pytest.fixture(scope="module")
def launches(request: pytest.FixtureRequest, shared_launches: SharedLaunches) -> dict[str, Launched]:
    """Every case the session selected, launched once (two side by side)."""
    return shared_launches.deepspeed({name: case_run(name) for name in selected_params(request, "name")})


@pytest.fixture
def run(launches: dict[str, Launched], name: str) -> Path:
    launched = launches[name]
    out = launched.ok()
    assert leaked_shm_segments(launched.port) == [], name
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_resident_model_states_match_partition_rules(run, name):
    preset, ranks, stage, opt, bf16, _ = CASES[name]
    doc = json.loads((run / "memprof.json").read_text())
    assert doc["run"]["model"] == preset and [r["rank"] for r in doc["ranks"]] == list(range(ranks))
    want = expected(preset, stage, opt, bf16, ranks)
    for entry in doc["ranks"]:
        rest = entry["steps"][-1]["phases"]["step"]["end"]
        got = {cat: rest["device"][cat] + rest["host"][cat] for cat in want}
        assert got == want, f"{name} rank {entry['rank']}"


def _compare(run: Path) -> dict:
    res = memprof_in_process("compare", str(run), "--fresh-estimate", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_within_tolerance_of_measurement(run, name):
    cmp = _compare(run)
    rows = [r for r in cmp["rows"] if r["ok"] is not None]
    ranks = CASES[name][1]
    assert len(rows) == ranks * (3 * 2 + 3)  # 3 resident categories x 2 locations + 3 phase peaks, per rank
    bad = []
    for r in rows:
        tolerance = PEAK_TOLERANCE if r["what"] == "peak" else RESIDENT_TOLERANCE
        err = abs(r["estimated"] - r["measured"]) / r["measured"] if r["measured"] else abs(r["estimated"])
        if err > tolerance:
            bad.append(f"rank {r['rank']} {r['what']} {r['location']} {r['name']}: measured {r['measured']} "
                       f"estimated {r['estimated']} ({err:.3%})")
    assert not bad, "\n".join(bad)
    # the estimate modelled the activations (fits can be computed)
    doc = json.loads((run / "memprof.json").read_text())
    assert doc["run"]["model_config"]["model_type"] in ("llama", "qwen2")
