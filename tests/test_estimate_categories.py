"""Which category the estimate gives a byte at a phase peak (issue 17: the estimator agrees with the
profiler category by category). Expected bytes are derived here from gpt2-tiny's / llama-tiny's
layer shapes and DeepSpeed 0.19.8's code, not read from the estimator.
"""

from __future__ import annotations

from memprof.estimate import estimate, inputs_from_run
from memprof.estimate.layout import model_state_layout
from memprof.estimate.model_shapes import shape_of
from memprof.models import preset_config

# gpt2-tiny: vocab 512, n_positions 256, n_embd 64; parameters() order wte, wpe, blocks, ln_f.weight, ln_f.bias
GPT2_WTE, GPT2_LN_F_BIAS = 512 * 64, 64
# llama-tiny: untied lm_head (vocab 512 x hidden 64) is its last parameter
LLAMA_LM_HEAD = 512 * 64


def run_doc(model: str, stage: int, bf16: bool, **zero: object) -> dict:
    ds = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
          "zero_optimization": {"stage": stage, **zero}}
    if bf16:
        ds["bf16"] = {"enabled": True}
    return {"model_config": preset_config(model), "world_size": 2, "seq_len": 32, "device_type": "cpu",
            "deepspeed_config": ds, "data_tensor_bytes": 249_528}


def layout(doc: dict, rank: int = 0):
    inp = inputs_from_run(doc)
    return model_state_layout(inp, shape_of(inp), rank, "cpu")


def test_stage2_bucket_backing_a_param_grad_is_grads_at_backward_moments():
    # ZeRO-2, fp32, reduce_bucket_size 50,000: the bucket is 50,000 x 4 bytes. The first hook is the
    # last parameter's (ln_f.bias, 64 elements <= 50,000): copied into the bucket and its .grad
    # pointed there (stage_1_and_2.py:1450-1454), so the bucket backs a param.grad: grads. The
    # last hook is wte's (32,768 elements <= 50,000): the bucket holds it at backward's end too.
    assert GPT2_LN_F_BIAS <= 50_000 and GPT2_WTE <= 50_000
    bucket = 50_000 * 4
    for rank in (0, 1):
        lay = layout(run_doc("gpt2-tiny", 2, False, reduce_bucket_size=50_000), rank)
        assert lay.backward_extra.get("comm_buffers", 0) == 0 and lay.backward_extra["grads"] == bucket
        assert lay.backward_end_extra.get("comm_buffers", 0) == 0
        assert lay.backward_end_extra["grads"] >= bucket
        # after the last block's mlp.c_proj hooks (weight 256 x 64 = 16,384 elements, in the bucket)
        assert lay.backward_after_mlp_out_hooks_extra.get("comm_buffers", 0) == 0


def test_stage2_default_bucket_is_grads_at_the_backward_peak():
    # the shipped stage-2 configs leave reduce_bucket_size at DeepSpeed's 5e8 elements: in bf16 a
    # 1,000,000,000-byte bucket; measured at the backward peak on 2 CPU ranks (gpt2-tiny, seq 64,
    # configs/stage2_adamw_bf16.json): grads 1,000,000,000, comm_buffers 0
    doc = run_doc("gpt2-tiny", 2, True)
    doc["seq_len"] = 64
    for r in estimate(inputs_from_run(doc)).ranks:
        peak = r.phases["backward"]["device"]
        assert peak["comm_buffers"] == 0
        assert peak["grads"] >= 500_000_000 * 2


def test_stage2_bucket_stays_comm_buffers_where_an_oversized_param_bypassed_it():
    # reduce_bucket_size 4,096: llama-tiny's first hook is lm_head's (32,768 elements > 4,096), which
    # bypasses the bucket (extra_large_param_to_reduce, :1443): the freshly allocated bucket backs
    # no gradient. gpt2-tiny's last hook, wte (32,768 > 4,096), reduces the bucket first (:1422) and
    # bypasses it too: at backward's end the bucket is comm_buffers; its first hook (ln_f.bias, 64)
    # is copied in: grads.
    bucket = 4_096 * 4
    llama = layout(run_doc("llama-tiny", 2, False, reduce_bucket_size=4_096))
    assert LLAMA_LM_HEAD > 4_096 and llama.backward_extra == {"comm_buffers": bucket}
    gpt2 = layout(run_doc("gpt2-tiny", 2, False, reduce_bucket_size=4_096))
    assert gpt2.backward_extra.get("grads") == bucket and gpt2.backward_extra.get("comm_buffers", 0) == 0
    assert gpt2.backward_end_extra["comm_buffers"] == bucket


def test_stage2_overlap_comm_and_stage1_buckets_stay_comm_buffers():
    # overlap_comm: two buffers swapped at each reduction (not relabelled); ZeRO-1 without
    # overlap_comm: the hooks copy nothing into the bucket during backward (process_gradients,
    # stage_1_and_2.py:2284), so at the first hook it backs no gradient
    over = layout(run_doc("gpt2-tiny", 2, False, reduce_bucket_size=50_000, overlap_comm=True))
    assert over.backward_extra == {"comm_buffers": 2 * 50_000 * 4}
    z1 = layout(run_doc("gpt2-tiny", 1, False, reduce_bucket_size=50_000))
    assert z1.backward_extra == {"comm_buffers": 50_000 * 4}

