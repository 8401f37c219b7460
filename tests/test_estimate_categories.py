"""Which category the estimate gives a byte at a phase peak (issue 17: the estimator agrees with the
profiler category by category). Expected bytes are derived here from gpt2-tiny's / llama-tiny's
layer shapes and DeepSpeed 0.19.8's code, not read from the estimator.

The naming both sides keep: a reduce bucket is ``comm_buffers`` even while its slices are
parameters' ``.grad`` views (ZeRO-2's hook, stage_1_and_2.py:1450-1454, points ``.grad`` into the
bucket); the flattened gradient copies a ZeRO ``step()`` makes are ``grads``; the torch optimizer's
temporaries inside ``step()`` are ``optimizer_state``.
"""

from __future__ import annotations

import math

from memprof.estimate import estimate, inputs_from_run
from memprof.estimate.layout import model_state_layout
from memprof.estimate.model_shapes import shape_of
from memprof.models import preset_config

# gpt2-tiny (memprof/models.py): vocab 512, n_positions 256, n_embd 64, 2 layers, tied lm_head
V, NPOS, H, L = 512, 256, 64, 2
BLOCK = [H, H, H * 3 * H, 3 * H, H * H, H, H, H, H * 4 * H, 4 * H, 4 * H * H, H]
NUMELS = [V * H, NPOS * H] + BLOCK * L + [H, H]
P = sum(NUMELS)
assert P == 149_248


def run_doc(stage: int, bf16: bool, seq: int = 32, **zero: object) -> dict:
    ds = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
          "zero_optimization": {"stage": stage, **zero}}
    if bf16:
        ds["bf16"] = {"enabled": True}
    return {"model_config": preset_config("gpt2-tiny"), "world_size": 2, "seq_len": seq, "device_type": "cpu",
            "deepspeed_config": ds, "data_tensor_bytes": 249_528}


def layout(doc: dict, rank: int = 0):
    inp = inputs_from_run(doc)
    return model_state_layout(inp, shape_of(inp), rank, "cpu")


def test_stage2_bucket_is_comm_buffers_while_grads_view_it():
    # ZeRO-2, fp32, reduce_bucket_size 50,000 (the tests' buckets): 50,000 x 4 bytes. At the first
    # hook (ln_f.bias, 64 elements) the hook copies the gradient into the bucket and points .grad
    # there; the bucket is still the bucket: comm_buffers, at the first hook and at backward's end
    bucket = 50_000 * 4
    for rank in (0, 1):
        lay = layout(run_doc(2, False, reduce_bucket_size=50_000), rank)
        assert lay.backward_extra == {"comm_buffers": bucket}
        assert lay.backward_end_extra["comm_buffers"] == bucket


def test_stage2_default_bucket_is_comm_buffers_at_the_backward_peak():
    # configs/stage2_adamw_bf16.json leaves reduce_bucket_size at DeepSpeed's 5e8 elements
    # (runtime/zero/config.py): in bf16 a 1,000,000,000-byte bucket, the backward peak's largest
    # term (gpt2-tiny, seq 64, 2 ranks); main's profiler named it grads (its .grad views won the
    # ownership walk), the profiler's claim rule names it comm_buffers as the estimate does
    for r in estimate(inputs_from_run(run_doc(2, True, seq=64))).ranks:
        peak = r.phases["backward"]["device"]
        assert peak["comm_buffers"] == 500_000_000 * 2
        assert peak["grads"] < 500_000_000


def test_stage12_step_flatten_is_grads_and_temporaries_are_optimizer_state():
    # ZeRO-1 fp32 FusedAdam, 2 ranks, buckets 5e4: the flat group padded to 2N = 4 elements,
    # p = Ppad / 2 per rank. At the step peak (flatten: stage_1_and_2.py:3117, the fp32 copy of a
    # fp32 flat is the same tensor) the flattened partition (4p bytes) is grads beside the held
    # gradients; FusedAdam has no temporaries (optimizer_state = the resident 8p only)
    p = math.ceil(P / 4) * 4 // 2
    assert p == 74_624
    for r in estimate(inputs_from_run(run_doc(1, False, reduce_bucket_size=50_000))).ranks:
        step, rest = r.phases["step"]["device"], r.rest["device"]
        assert step["optimizer_state"] == rest["optimizer_state"] == 8 * p
        assert step["grads"] - rest["grads"] >= 4 * p  # the flat partition, beside what is held
        assert step["other"] == rest["other"]  # nothing of the step is left unnamed


def test_torch_adam_step_temporaries_are_optimizer_state():
    # ZeRO-1 fp32 torch AdamW (torch_adam: the single-tensor loop on CPU, adam.py
    # _single_tensor_adam: exp_avg_sq.sqrt() and the division, 2 temporaries the size of the one
    # flat fp32 partition, p elements): optimizer_state at the in-optimizer moment = resident 8p
    # + a 4-byte step tensor + 2 x 4p
    p = math.ceil(P / 4) * 4 // 2
    doc = run_doc(1, False, reduce_bucket_size=50_000)
    doc["deepspeed_config"]["optimizer"]["params"]["torch_adam"] = True
    for r in estimate(inputs_from_run(doc)).ranks:
        lay = layout(doc, r.rank)
        in_optimizer = [m for m in lay.step_moments if m.get("optimizer_state")]
        assert in_optimizer and in_optimizer[-1]["optimizer_state"] == 2 * 4 * p
        assert in_optimizer[-1]["grads"] == 4 * p  # the master's flat fp32 .grad beside them


# llama-tiny (memprof/models.py): vocab 512, hidden 64, intermediate 176, 4 heads / 2 kv heads (head 16),
# 2 layers, untied lm_head; LlamaDecoderLayer registers self_attn (q, k, v, o), mlp (gate, up, down),
# input_layernorm, post_attention_layernorm
LAYER = [64 * 64, 32 * 64, 32 * 64, 64 * 64, 176 * 64, 176 * 64, 64 * 176, 64, 64]
LLAMA = [512 * 64] + LAYER * 2 + [64, 512 * 64]
assert sum(LLAMA) == 158_016


def test_stage1_reduction_walk_frees_the_bucketed_grads_before_grads_in_partition():
    # ZeRO-1 fp32, no overlap_comm, 2 ranks, reduce_bucket_size 50,000, llama-tiny. Rank 0's
    # partition is [0, 79,008) (158,016 padded to 2N = 4 is itself; half each); the params touching
    # it run to layer 1's q_proj (starts at 78,976): held = 83,072. reduce_gradients walks the params
    # in forward order: embed_tokens (32,768) and layer 0's q, k, v, o (45,056 in all) go into the
    # bucket (their own .grad storage freed, stage_1_and_2.py:1450-1454); gate_proj (11,264) would
    # overflow it (:1422), so that reduction, holding rank-0 params, allocates grads_in_partition
    # (:2184) beside every other param's .grad: (P - 45,056 + 83,072) x 4 bytes, beside the bucket
    P_L = sum(LLAMA)
    held = sum(n for i, n in enumerate(LLAMA) if sum(LLAMA[:i]) < 79_008)
    assert held == 83_072
    doc = run_doc(1, False, reduce_bucket_size=50_000)
    doc["model_config"] = preset_config("llama-tiny")
    doc["deepspeed_config"]["activation_checkpointing"] = {}
    lay = layout(doc, 0)
    assert lay.backward_end_extra == {"grads": (P_L - 45_056 + held) * 4, "comm_buffers": 50_000 * 4}
    # measured on 2 CPU ranks (launch/train.py, micro-batch 2 x seq 32, activation checkpointing,
    # GAS 1, benchmarks/category_survey.py llama-z1-adamw-fp32-ckpt): backward peak 2,836,624 B on
    # rank 0 (2,836,616 on rank 1), inside a block's backward; the end-of-reduction moment, counted
    # before as (P + held) x 4 with the bucket (+5.57%), is below it
    est = estimate(inputs_from_run(doc))
    for r, measured in zip(est.ranks, (2_836_624, 2_836_616)):
        assert abs(r.phase_total("backward") - measured) <= 16, r.rank


def test_tied_embedding_sum_shares_are_activations_at_stage0_and_stage1():
    # gpt2-tiny ties lm_head to wte (V x H = 32,768 elements). Where every param.grad is kept
    # through backward (ZeRO-0; ZeRO-1 without overlap_comm), backward's last moment is autograd
    # summing the tied weight's two gradient shares (lm_head's, waiting in the AccumulateGrad
    # node's input buffer since the loss's backward, and the embedding backward's output) out of
    # place: the sum becomes wte's .grad (in the 4P of every param.grad), the two shares
    # (2 x V*H*4 = 262,144 B) are autograd's, not any parameter's .grad: activations. Measured so
    # on a 1-rank ZeRO-0 fp32 HF run (tests/test_integration_recorder.py's accelerate run:
    # backward peak grads 596,992 B, activations 262,144 B)
    shares = 2 * V * H * 4
    assert shares == 262_144
    doc = run_doc(0, False)
    doc["world_size"] = 1  # one rank: no all-reduce copy, the tied sum is the end moment
    assert layout(doc).backward_end_extra == {"grads": 4 * P, "activations": shares}
    # ZeRO-1 fp32, no overlap_comm, 2 ranks, 50,000-element buckets: reduce_gradients runs after
    # loss.backward() returned (stage_1_and_2.py:958), so the tied sum happens beside every
    # param.grad (4P; P = 149,248 is a multiple of 2N = 4: no zero tail) and the bucket
    # (50,000 x 4 B, allocated at the first hook); it is above the later moment when
    # grads_in_partition is allocated (at most P - 32,768 + P/2 elements of gradient: the first
    # reduction holds wte, 32,768 elements, freed into the bucket), so the same naming holds
    assert (P - V * H + P // 2) * 4 < 4 * P + shares
    for rank in (0, 1):
        z1 = layout(run_doc(1, False, reduce_bucket_size=50_000), rank)
        assert z1.backward_end_extra == {"grads": 4 * P, "comm_buffers": 200_000, "activations": shares}
