"""Resident categories of real 2-rank DeepSpeed runs of Llama-family models, derived here.

The Llama-family twin of tests/test_ownership_deepspeed.py: one ``deepspeed --num_gpus 2`` launch
of tests/ds_harness/resident.py (the session's ``resident_harness_runs``, shared with the GPT-2 cases)
runs every case (a fresh seeded model and engine, two training
steps, then ``owned_breakdown(owned_storages(engine))`` per rank). llama-tiny has grouped-query
attention (4 query heads share 2 key/value heads) and an untied lm_head; qwen2-tiny has tied
embeddings and q/k/v biases. Every expected number is derived in this file from the layer shapes
of modeling_llama.py / modeling_qwen2.py, the dtypes and ZeRO's partition rules (the GPT-2 file
cites the DeepSpeed 0.19.8 lines), never copied from the walk's output.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from memprof.categories import CATEGORIES, LOCATIONS, Breakdown
from memprof.models import PRESETS

N = 2
FP32, HALF = 4, 2
RBS = 4096
PERSIST = 256
STEP = 4  # torch optimizers' 0-dim float32 step tensor, one per optimized tensor


def llama_family_numels(cfg: dict[str, Any]) -> list[int]:
    """numel of every parameter tensor in registration order, from the layer shapes:
    embed_tokens; per layer q_proj, k_proj, v_proj (nn.Linear (out, in) weights, Qwen2: + biases),
    o_proj, gate_proj, up_proj, down_proj, input_layernorm, post_attention_layernorm (RMSNorm
    weights); norm; lm_head when untied."""
    v, h, i = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    a, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // a
    qkv_bias = cfg["model_type"] == "qwen2"
    numels = [v * h]
    for _ in range(cfg["num_hidden_layers"]):
        for out in (a * d, kv * d, kv * d):
            numels += [out * h] + ([out] if qkv_bias else [])
        numels += [h * a * d]
        numels += [i * h, i * h, h * i]
        numels += [h, h]
    numels += [h]
    if not cfg.get("tie_word_embeddings", False):
        numels += [v * h]
    return numels


class Derived:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.numels = llama_family_numels(cfg)
        self.P = sum(self.numels)
        self.Pp = math.ceil(self.P / (2 * N)) * 2 * N  # ZeRO-1/2 flat group, padded to 2N
        self.part = self.Pp // N
        self.s3 = sum(math.ceil(n / N) for n in self.numels)  # ZeRO-3 partitions
        self.s3_persist_gathered = sum(math.ceil(n / N) * N for n in self.numels if n <= PERSIST)
        # LlamaRotaryEmbedding's inv_freq and original_inv_freq buffers (head_dim / 2 each), kept
        # fp32 by DeepSpeed under bf16 (engine._configure_distributed_model casts params only)
        d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.buffers = 2 * (d // 2) * FP32


LLAMA: dict[str, Any] = dict(PRESETS["llama-tiny"])
QWEN2: dict[str, Any] = dict(PRESETS["qwen2-tiny"])
# One layer, odd hidden size with an explicit head_dim (RoPE needs it even), multi-query attention
# (1 key/value head for 7 query heads of 10): P is not a multiple of 2N and the embedding, the
# norms and the MLP have odd numels.
ODD: dict[str, Any] = {**LLAMA, "vocab_size": 257, "hidden_size": 63, "intermediate_size": 95, "num_hidden_layers": 1,
                       "num_attention_heads": 7, "num_key_value_heads": 1, "head_dim": 10}
L, Q, O = Derived(LLAMA), Derived(QWEN2), Derived(ODD)


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
SGD_MOMENTUM = {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}}

# name -> (preset, ds_config, expected resident breakdown per rank); "odd_*" cases build ODD
CASES: dict[str, tuple[str, dict[str, Any], Breakdown]] = {
    "odd_s2_fp32_adam": ("llama-tiny", {"optimizer": adam(), "zero_optimization": zero(2)},
                         bd({"params": FP32 * O.Pp + O.buffers, "master_params": FP32 * O.part,
                             "optimizer_state": 2 * FP32 * O.part})),
    "odd_s3_fp32_adam": ("llama-tiny", {"optimizer": adam(), "zero_optimization": zero(3)},
                         bd({"params": FP32 * (O.s3 + O.s3_persist_gathered) + O.buffers, "master_params": FP32 * O.s3,
                             "grads": FP32 * O.s3, "optimizer_state": 2 * FP32 * O.s3, "comm_buffers": FP32 * RBS})),
    "llama_s0_fp32_adam": ("llama-tiny", {"optimizer": adam()},
                           bd({"params": FP32 * L.P + L.buffers, "optimizer_state": 2 * FP32 * L.P})),
    "qwen2_s0_bf16_adam": ("qwen2-tiny", {"optimizer": adam(), **BF16},
                           bd({"params": HALF * Q.P + Q.buffers, "master_params": FP32 * Q.P,
                               "optimizer_state": 2 * FP32 * Q.P})),
    "qwen2_s1_fp32_momentum": ("qwen2-tiny", {"optimizer": SGD_MOMENTUM, "zero_optimization": zero(1)},
                               bd({"params": FP32 * Q.Pp + Q.buffers, "master_params": FP32 * Q.part,
                                   "optimizer_state": FP32 * Q.part})),
    "llama_s2_bf16_adam": ("llama-tiny", {"optimizer": adam(), "zero_optimization": zero(2), **BF16},
                           bd({"params": HALF * L.Pp + L.buffers, "master_params": FP32 * L.part,
                               "optimizer_state": 2 * FP32 * L.part})),
    "llama_s2_fp32_adamw_torch": ("llama-tiny", {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                                                 "zero_optimization": zero(2, contiguous_gradients=True)},
                                  bd({"params": FP32 * L.Pp + L.buffers, "master_params": FP32 * L.part,
                                      "optimizer_state": 2 * FP32 * L.part + STEP})),
    "llama_s3_fp32_adam": ("llama-tiny", {"optimizer": adam(), "zero_optimization": zero(3)},
                           bd({"params": FP32 * (L.s3 + L.s3_persist_gathered) + L.buffers, "master_params": FP32 * L.s3,
                               "grads": FP32 * L.s3, "optimizer_state": 2 * FP32 * L.s3, "comm_buffers": FP32 * RBS})),
    "qwen2_s3_bf16_adam": ("qwen2-tiny", {"optimizer": adam(), "zero_optimization": zero(3), **BF16},
                           bd({"params": HALF * (Q.s3 + Q.s3_persist_gathered) + Q.buffers, "master_params": FP32 * Q.s3,
                               "grads": HALF * Q.s3, "optimizer_state": 2 * FP32 * Q.s3, "comm_buffers": HALF * RBS})),
    "llama_s1_bf16_fp32accum_adam": ("llama-tiny", {"optimizer": adam(), "zero_optimization": zero(1), **BF16,
                                                    "data_types": {"grad_accum_dtype": "fp32"}},
                                     bd({"params": HALF * L.Pp + L.buffers, "master_params": FP32 * L.part,
                                         "grads": FP32 * L.Pp, "optimizer_state": 2 * FP32 * L.part})),
}
SCALAR_BYTES = 8


def resident_spec() -> list[dict[str, Any]]:
    """This module's cases for the session's one launch of the harness (tests/conftest.py)."""
    return [{"name": name, "preset": preset, "ds_config": ds_config, "mid_backward": name == "llama_s2_fp32_adamw_torch",
             "model": ODD if name.startswith("odd_") else {}}
            for name, (preset, ds_config, _) in CASES.items()]


@pytest.fixture(scope="module")
def runs(resident_harness_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each rank's results of this module's cases."""
    return [{**run, "cases": {k: v for k, v in run["cases"].items() if k in CASES}} for run in resident_harness_runs]


def test_launch_covers_every_case(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        errors = {name: case["error"] for name, case in run["cases"].items() if "error" in case}
        assert not errors
        assert set(run["cases"]) == set(CASES)


def test_parameter_counts_match_the_models(runs: list[dict[str, Any]]) -> None:
    assert runs[0]["cases"]["llama_s0_fp32_adam"]["num_params"] == L.P == 158_016
    assert runs[0]["cases"]["qwen2_s0_bf16_adam"]["num_params"] == Q.P == 119_360
    assert runs[0]["cases"]["odd_s2_fp32_adam"]["num_params"] == O.P
    # the odd model really exercises both padding rules (the tiny presets need none)
    assert O.Pp != O.P and O.s3 * N != O.P


@pytest.mark.parametrize("name", list(CASES))
def test_resident_breakdown_matches_derivation(runs: list[dict[str, Any]], name: str) -> None:
    expected = CASES[name][2]
    for run in runs:
        got = run["cases"][name]["resident"]
        assert got == expected, f"{name} rank {run['rank']}: got {_nonzero(got)}, expected {_nonzero(expected)}"


@pytest.mark.parametrize("name", list(CASES))
def test_nothing_large_reachable_from_the_engine_is_unowned(runs: list[dict[str, Any]], name: str) -> None:
    for run in runs:
        missed = [(path, nbytes) for path, nbytes in run["cases"][name]["unowned_reachable"] if nbytes > SCALAR_BYTES]
        assert not missed, f"{name}: storages reachable from the engine but not attributed: {missed[:5]}"


def test_zero3_persistent_params_are_the_norms_and_biases(runs: list[dict[str, Any]]) -> None:
    for name, derived in (("llama_s3_fp32_adam", L), ("qwen2_s3_bf16_adam", Q), ("odd_s3_fp32_adam", O)):
        report = runs[0]["cases"][name]["zero3_params"]
        assert report["persistent_numels"] == sorted(n for n in derived.numels if n <= PERSIST)
        assert report["gathered_numel_other"] == 0
        assert sorted(report["partition_numels"]) == sorted(math.ceil(n / N) for n in derived.numels)


def test_the_embedding_hook_fires_mid_backward(runs: list[dict[str, Any]]) -> None:
    """The harness finds the input embedding of any family (get_input_embeddings) and snapshots
    inside backward, after every decoder layer's gradients: gradients exist there, not at rest."""
    for run in runs:
        case = run["cases"]["llama_s2_fp32_adamw_torch"]
        mid, rest = case["mid_backward"]["device"], case["resident"]["device"]
        assert 0 < mid["grads"] <= FP32 * (L.P + L.part) and rest["grads"] == 0
        assert rest["comm_buffers"] == 0  # the reduce bucket is released after backward


def _nonzero(b: Breakdown) -> dict[str, dict[str, int]]:
    return {loc: {c: v for c, v in cats.items() if v} for loc, cats in b.items()}
